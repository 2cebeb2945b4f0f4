"""MetricLogger: the schedule and naming every ``report_to`` logger shares."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

import jax

from kithara.callbacks.base import Callback, StepInfo


def tagged(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` under ``prefix/`` (``train/loss``, ``eval/loss``): the names TensorBoard's
    tags have, which every logger uses."""
    return {f"{prefix}/{name}": float(value) for name, value in metrics.items()}


def require(module: str, extra: str, who: str) -> None:
    """Refuses, when a logger is built, an optional package that is not installed (looked up
    without importing it), naming the extra that installs it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: imports of it are blocked
        found = False
    if not found:
        raise ImportError(f'{who} needs the {module} package, which is not installed: pip install "kithara[{extra}]".')


class MetricLogger(Callback):
    """Sends training metrics somewhere, on the schedule ``TensorBoardLogger`` keeps: train
    metrics every ``every`` steps and at the last step, eval metrics at every evaluation during
    training, each under ``train/`` or ``eval/`` with the optimizer step as the x axis. Only
    process 0 logs.

    A run is opened in ``on_train_begin`` and closed in ``on_train_end`` (each ``train()`` call
    is one run); ``trainer.evaluate()`` called outside ``train()`` is recorded in
    ``trainer.eval_history`` but not sent. Subclasses implement ``start``, ``log`` and ``finish``.
    """

    def __init__(self, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}.")
        self.every = every
        self._running = False

    def start(self, info: StepInfo) -> None:
        """Opens the run (process 0 only)."""
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Sends named metrics of ``step``."""
        raise NotImplementedError

    def finish(self, error: BaseException | None) -> None:
        """Closes the run; ``error`` is the exception training ended with, if any."""
        raise NotImplementedError

    def on_train_begin(self, info: StepInfo) -> None:
        if jax.process_index() == 0 and not self._running:
            self.start(info)
            self._running = True

    def on_step_end(self, info: StepInfo) -> None:
        if self._running and (info.step % self.every == 0 or info.step == info.total_steps):
            self.log(tagged("train", info.metrics), info.step)

    def on_eval_end(self, info: StepInfo) -> None:
        if self._running:
            self.log(tagged("eval", info.metrics), info.step)

    def on_train_end(self, info: StepInfo) -> None:
        if self._running:
            self._running = False
            self.finish(info.error)


def import_module(module: str) -> Any:
    """``module``, imported when a run starts (wandb and mlflow take seconds to import)."""
    return importlib.import_module(module)
