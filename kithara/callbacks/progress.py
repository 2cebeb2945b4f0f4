"""Training progress on process 0: a live rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time

import jax
from rich.console import Console
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

_PLAIN_LINES = 20  # off a terminal, ``every=None`` prints about this many lines per run


class ProgressBar(Callback):
    """Shows steps done, loss and tokens/s on process 0.

    On a terminal (or in Jupyter) this is a live bar. Elsewhere (output to a log file, a
    pipe, CI) a live bar would only be drawn when training ends, so it prints one plain line
    every ``every`` steps instead, and at the first and the last step.

    Args:
        every: steps between plain lines; ``None``: about 20 lines a run.
        console: where to write (default: a rich ``Console`` on stdout).

    Example:
        >>> trainer = Trainer(..., progress_bar=False, callbacks=[ProgressBar(every=50)])
    """

    def __init__(self, every: int | None = None, console: Console | None = None) -> None:
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 (or None), got {every}.")
        self.every = every
        self._console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._plain: _PlainProgress | None = None

    def on_train_begin(self, info: StepInfo) -> None:
        if jax.process_index() != 0:
            return
        console = self._console or Console()
        if not (console.is_terminal or console.is_jupyter):
            every = self.every or max(1, (info.total_steps - info.start_step) // _PLAIN_LINES)
            self._plain = _PlainProgress(console, every, info.start_step, info.total_steps)
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=info.total_steps, completed=info.start_step, info="")

    def on_step_end(self, info: StepInfo) -> None:
        m = info.metrics
        text = f"loss {m['loss']:.4f}  {m.get('tokens_per_second', 0.0):,.0f} tok/s"
        if self._plain is not None:
            self._plain.step(info.step, text)
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=info.step, info=text)

    def on_eval_end(self, info: StepInfo) -> None:
        console = self._plain.console if self._plain is not None else None
        if self._progress is not None:
            console = self._progress.console
        if console is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in info.metrics.items())
            console.print(f"eval @ step {info.step}: {shown}", markup=False, highlight=False, soft_wrap=True)

    def on_train_end(self, info: StepInfo) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._plain = None


class _PlainProgress:
    """One line per ``every`` steps: step, percentage, the caller's text, elapsed and ETA.
    The ETA uses the steps after this run's first, whose time includes compilation."""

    def __init__(self, console: Console, every: int, start_step: int, total_steps: int) -> None:
        self.console, self.every, self.start_step, self.total_steps = console, every, start_step, total_steps
        self._began = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first step done

    def step(self, step: int, text: str) -> None:
        now = time.monotonic()
        first = self._first is None
        if self._first is None:
            self._first = (step, now)
        last = step >= self.total_steps
        if not (first or last or (step - self.start_step) % self.every == 0):
            return
        shown = [f"train step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)", text]
        shown.append(f"elapsed {_clock(now - self._began)}")
        first_step, first_time = self._first
        if not last and step > first_step:
            shown.append(f"eta {_clock((now - first_time) / (step - first_step) * (self.total_steps - step))}")
        self.console.print("  ".join(shown), markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RichProgressCallback(ProgressBar):
    """TRL's name for the progress bar: ``ProgressBar`` under the name TRL users know (a
    live rich bar of steps, loss and tokens/s on a terminal, plain lines elsewhere; eval
    metrics printed as they come). The Trainer already shows one unless ``progress_bar=False``
    (or ``args.disable_tqdm``); add this one instead to choose ``every`` or the console.

    Args:
        every: steps between plain lines off a terminal; ``None``: about 20 lines a run.
        console: where to write (default: a rich ``Console`` on stdout).

    Example:
        >>> trainer = Trainer(..., progress_bar=False, callbacks=[RichProgressCallback()])
    """
