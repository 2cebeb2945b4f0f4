"""A rich progress bar with the latest loss and throughput."""

from __future__ import annotations

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

from kithara.callbacks.base import Callback, StepInfo


class ProgressBar(Callback):
    """Shows steps done, loss and tokens/s on process 0."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def on_train_begin(self, info: StepInfo) -> None:
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
        self._task = self._progress.add_task("train", total=info.total_steps, completed=info.start_step, info="")

    def on_step_end(self, info: StepInfo) -> None:
        if self._progress is not None and self._task is not None:
            m = info.metrics
            text = f"loss {m['loss']:.4f}  {m.get('tokens_per_second', 0.0):,.0f} tok/s"
            self._progress.update(self._task, completed=info.step, info=text)

    def on_eval_end(self, info: StepInfo) -> None:
        if self._progress is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in info.metrics.items())
            self._progress.console.print(f"eval @ step {info.step}: {shown}")

    def on_train_end(self, info: StepInfo) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
