"""WandbLogger: training metrics to Weights & Biases (``report_to="wandb"``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kithara.callbacks.base import StepInfo
from kithara.callbacks.metric_logger import MetricLogger, import_module, require

DEFAULT_PROJECT = "kithara"


class WandbLogger(MetricLogger):
    """Logs train and eval metrics to a Weights & Biases run, under the names TensorBoard gets
    (``train/loss``, ``eval/loss``, ...) with the optimizer step as wandb's ``step``.

    The run is opened when training begins, with ``config`` as its config, and finished when
    it ends (exit code 1 when training raised). A run the caller opened already
    (``wandb.init()`` before ``train()``) is logged into and left open. wandb's own environment
    variables apply: ``WANDB_MODE=offline`` writes the run under ``WANDB_DIR`` (default
    ``./wandb``) with no network, to upload later with ``wandb sync``; ``WANDB_API_KEY``,
    ``WANDB_ENTITY``, ``WANDB_RUN_ID`` with ``WANDB_RESUME``, and so on. Needs the ``wandb``
    extra (``pip install "kithara[wandb]"``).

    Args:
        every: log train metrics every this many steps (and at the last step).
        project: the wandb project; ``None`` reads ``WANDB_PROJECT``, else ``"kithara"``.
        run_name: the run's name; ``None`` lets wandb pick one.
        config: the run's config (``report_to`` passes the ``TrainingConfig``'s fields).
        **init_kwargs: more ``wandb.init`` arguments (``entity``, ``tags``, ``group``, ``dir``, ...).

    Example:
        >>> trainer = kithara.Trainer(..., callbacks=[WandbLogger(every=10, project="sft")])
        >>> # or: kithara.SFTConfig(report_to="wandb", project="sft", run_name="lr3e-4")
    """

    def __init__(
        self,
        every: int = 1,
        *,
        project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(every)
        require("wandb", "wandb", "WandbLogger (report_to='wandb')")
        self.project = project
        self.run_name = run_name
        self.config = dict(config or {})
        self.init_kwargs = init_kwargs
        self.run: Any = None  # the wandb Run while training
        self._owns_run = False

    def start(self, info: StepInfo) -> None:
        wandb = import_module("wandb")
        if wandb.run is not None:
            self.run, self._owns_run = wandb.run, False
            self.run.config.update(self.config, allow_val_change=True)
            return
        project = self.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.run = wandb.init(project=project, name=self.run_name, config=self.config, **self.init_kwargs)
        self._owns_run = True

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, error: BaseException | None) -> None:
        if self._owns_run:
            self.run.finish(exit_code=0 if error is None else 1)
        self.run = None
