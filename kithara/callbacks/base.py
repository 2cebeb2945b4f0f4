"""The callback interface: where side effects of training live."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kithara.trainer.trainer import Trainer


class Callback:
    """Hooks the Trainer calls on process-local host values.

    ``on_step_end`` receives the metrics of step ``step`` (1-based count of optimizer
    updates). They arrive one step late, while the next step already runs, unless
    ``needs_sync(step)`` is true: then the trainer waits for that step and calls the hook
    before dispatching the next one, so ``trainer.state`` is exactly the state after
    ``step`` (checkpointing and profiling need that).
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step (after the state is built)."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After step ``step`` completed, with its host metrics."""

    def on_eval_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation run at training step ``step``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After training ends; ``trainer.error`` is set when it ended with an exception."""

    def needs_sync(self, step: int) -> bool:
        """Whether ``on_step_end(step)`` must see the state of exactly that step."""
        return False
