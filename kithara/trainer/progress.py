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
        log_history: as TRL's: one dict every ``logging_steps`` steps and at the last step
            (``step``, fractional ``epoch``, ``loss`` averaged over the steps since the
            previous one, and that step's ``grad_norm``, ``learning_rate``, ...), and one per
            evaluation (``step``, ``epoch`` and ``eval_``-prefixed metrics), in order. Every
            step's own metrics are in ``trainer.history``.

    The device-side state (variables, optimizer state) is ``trainer.train_state``.
    """

    global_step: int
    epoch: float
    max_steps: int
    log_history: list[dict[str, Any]]


def log_history(
    history: Sequence[Mapping[str, float]],
    eval_history: Sequence[Mapping[str, float]],
    *,
    steps_per_epoch: int,
    logging_steps: int,
    total_steps: int,
) -> list[dict[str, Any]]:
    """TRL's log: a record every ``logging_steps`` steps (and at the last step) whose ``loss``
    is the mean over the steps since the previous record and whose other metrics are the
    step's own; an evaluation's record after its step's."""
    records: list[tuple[int, int, dict[str, Any]]] = []
    window: list[float] = []
    for entry in history:
        step = int(entry["step"])
        window.append(entry["loss"])
        if step % logging_steps and step != total_steps:
            continue
        values = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
        values["loss"] = sum(window) / len(window)
        window = []
        records.append((step, 0, {"step": step, "epoch": step / steps_per_epoch, **values}))
    for entry in eval_history:
        step = int(entry["step"])
        values = {f"eval_{k}": v for k, v in entry.items() if k != "step"}
        records.append((step, 1, {"step": step, "epoch": step / steps_per_epoch, **values}))
    return [record for _, _, record in sorted(records, key=lambda r: (r[0], r[1]))]
