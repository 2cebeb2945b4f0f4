"""``trainer.state``: training progress as TRL users read it (``log_history`` and friends)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """A snapshot of training progress, shaped like TRL's (transformers') ``TrainerState``.

    Attributes:
        global_step: optimizer steps done.
        epoch: epochs done, fractional (``global_step / steps_per_epoch``).
        max_steps: the steps this run trains to.
        log_history: one dict per logged training step (``step``, ``epoch`` and the step's
            metrics: ``loss``, ``grad_norm``, ``learning_rate``, ...) and per evaluation
            (``step``, ``epoch`` and ``eval_``-prefixed metrics), in order.

    The device-side state (variables, optimizer state) is ``trainer.train_state``.
    """

    global_step: int
    epoch: float
    max_steps: int
    log_history: list[dict[str, Any]]


def log_history(
    history: Sequence[Mapping[str, float]], eval_history: Sequence[Mapping[str, float]], steps_per_epoch: int
) -> list[dict[str, Any]]:
    """Train and eval records merged in step order (an evaluation after its step's record)."""
    records: list[tuple[int, int, dict[str, Any]]] = []
    for entry in history:
        step = int(entry["step"])
        values = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
        records.append((step, 0, {"step": step, "epoch": step / steps_per_epoch, **values}))
    for entry in eval_history:
        step = int(entry["step"])
        values = {f"eval_{k}": v for k, v in entry.items() if k != "step"}
        records.append((step, 1, {"step": step, "epoch": step / steps_per_epoch, **values}))
    return [record for _, _, record in sorted(records, key=lambda r: (r[0], r[1]))]
