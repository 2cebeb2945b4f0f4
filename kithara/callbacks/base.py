"""The callback interface and the ``StepInfo`` the Trainer hands to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kithara.trainer.state import TrainState

STOP_REASONS = ("callback", "preempted")


@dataclasses.dataclass
class StepInfo:
    """What a callback sees of training: never the Trainer itself.

    Attributes:
        step: optimizer steps done (1-based for ``on_step_end``; the starting step in
            ``on_train_begin``; the last completed step in ``on_train_end``).
        epoch: the epoch of ``step``.
        total_steps: the steps this run trains to.
        start_step: the step training started (or resumed) from.
        restored_step: the checkpoint step restored when the run began, else None.
        metrics: the step's (or evaluation's) host metrics; empty for begin/end.
        log_dir: the TensorBoard directory of the run, if any.
        error: the exception training ended with (``on_train_end`` only), else None.

    ``state`` and ``data_state()`` read the training state and the data position without
    copying; in ``on_step_end`` they are exactly those after ``step`` only when the
    callback's ``needs_sync(step)`` returned True (otherwise the next step may already run).
    A callback ends training with ``request_stop()``: no step after the next is dispatched
    (none at all when its ``needs_sync(step)`` was true for this step).
    """

    step: int
    epoch: int
    total_steps: int
    start_step: int
    restored_step: int | None
    metrics: Mapping[str, float]
    log_dir: str | None
    error: BaseException | None
    _state: Callable[[], TrainState | None]
    _data_state: Callable[[], dict[str, Any]]
    stop_reason: str | None = None

    @property
    def state(self) -> TrainState | None:
        """The training state (read it, never modify or keep it: the next step donates it)."""
        return self._state()

    def data_state(self) -> dict[str, Any]:
        """The data position a checkpoint of this step records (JSON-able)."""
        return self._data_state()

    def request_stop(self, reason: str = "callback") -> None:
        """Ends training: no further step is dispatched (one already running completes).
        ``"preempted"``: the run was preempted and saved."""
        if reason not in STOP_REASONS:
            raise ValueError(f"reason must be one of {STOP_REASONS}, got {reason!r}.")
        if self.stop_reason != "preempted":
            self.stop_reason = reason


class Callback:
    """Hooks the Trainer calls with a ``StepInfo`` of process-local host values.

    ``on_step_end`` receives the metrics of step ``info.step`` (1-based count of optimizer
    updates). They arrive one step late, while the next step already runs, unless
    ``needs_sync(step)`` is true: then the trainer waits for that step and calls the hook
    before dispatching the next one, so ``info.state`` is exactly the state after ``step``
    (checkpointing and profiling need that).
    """

    def on_train_begin(self, info: StepInfo) -> None:
        """Before the first step (after the state is built or restored)."""

    def on_step_end(self, info: StepInfo) -> None:
        """After step ``info.step`` completed, with its host metrics."""

    def on_eval_end(self, info: StepInfo) -> None:
        """After an evaluation run at training step ``info.step`` (``info.metrics``)."""

    def on_train_end(self, info: StepInfo) -> None:
        """After training ends; ``info.error`` is set when it ended with an exception."""

    def needs_sync(self, step: int) -> bool:
        """Whether ``on_step_end`` of ``step`` must see the state of exactly that step."""
        return False
