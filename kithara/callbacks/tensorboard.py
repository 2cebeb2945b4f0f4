"""TensorBoard scalars through tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from kithara.callbacks.base import Callback, StepInfo


class TensorBoardLogger(Callback):
    """Writes train metrics every ``every`` steps and every evaluation to ``log_dir``
    (a local directory or a ``gs://`` path), under ``train/`` and ``eval/`` tags.
    Only process 0 writes.

    Example:
        >>> trainer = Trainer(..., callbacks=[TensorBoardLogger("runs/exp1", every=10)])
    """

    def __init__(self, log_dir: str, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.log_dir = log_dir
        self.every = every
        self._writer: Any = None  # a tensorboardX SummaryWriter, opened on the first write

    def on_train_begin(self, info: StepInfo) -> None:
        self._open()

    def on_step_end(self, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.step == info.total_steps:
            self._write("train", info.step, info.metrics)

    def on_eval_end(self, info: StepInfo) -> None:
        self._write("eval", info.step, info.metrics)

    def on_train_end(self, info: StepInfo) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self) -> None:
        if self._writer is None and jax.process_index() == 0:
            # Imported here: tensorboardX imports torch when it is installed (about 2 s).
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.log_dir)

    def _write(self, prefix: str, step: int, metrics: Mapping[str, float]) -> None:
        self._open()
        if self._writer is None:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._writer.flush()
