"""A rich progress bar with the latest loss and throughput."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kithara.callbacks.base import Callback

if TYPE_CHECKING:
    from kithara.trainer.trainer import Trainer


class ProgressBar(Callback):
    """Shows steps done, loss and tokens/s on process 0."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if jax.process_index() != 0:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=trainer.total_steps, completed=trainer.start_step, info="")

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self._progress is not None and self._task is not None:
            info = f"loss {metrics['loss']:.4f}  {metrics.get('tokens_per_second', 0.0):,.0f} tok/s"
            self._progress.update(self._task, completed=step, info=info)

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self._progress is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self._progress.console.print(f"eval @ step {step}: {shown}")

    def on_train_end(self, trainer: Trainer) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
