"""The callback interface and the ``StepInfo`` the Trainer hands to it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from kithara.naming import suggest

if TYPE_CHECKING:
    from kithara.trainer.state import TrainState

STOP_REASONS = ("callback", "preempted")
HOOKS = ("on_train_begin", "on_step_end", "on_eval_end", "on_train_end")
# transformers' TrainerCallback names that mean a kithara hook: the Trainer calls them as it.
HOOK_ALIASES: Mapping[str, str] = {"on_evaluate": "on_eval_end"}
_EVERY_STEP = "on_step_end(info) runs after every step, with its metrics in info.metrics"
# What to write instead of transformers' (and Keras') other hooks.
_INSTEAD: Mapping[str, str] = {
    "on_log": f"{_EVERY_STEP}; keep the steps with info.step % logging_steps == 0.",
    "on_save": "kithara.Checkpointer saves the checkpoints; subclass it, or return True from needs_sync(step) "
    "on your save steps and save in on_step_end.",
    "on_epoch_begin": f"{_EVERY_STEP} and info.epoch; a new epoch begins when info.epoch changes.",
    "on_epoch_end": f"{_EVERY_STEP} and info.epoch; an epoch ended when info.epoch changes.",
    "on_step_begin": "nothing runs before a step (the next step is dispatched while the last one's hooks run); "
    "use on_step_end of the step before.",
    "on_init_end": "set up in the callback's __init__ or on_train_begin.",
    "on_predict": "evaluation metrics come to on_eval_end(info).",
    "on_prediction_step": "evaluation metrics come to on_eval_end(info), once per evaluation.",
    "on_substep_end": f"micro-batches run inside the compiled step; {_EVERY_STEP}.",
    "on_pre_optimizer_step": f"the optimizer update runs inside the compiled step; {_EVERY_STEP}.",
    "on_optimizer_step": f"the optimizer update runs inside the compiled step; {_EVERY_STEP}.",
    "on_batch_end": f"(Keras' name) {_EVERY_STEP}.",
    "on_train_batch_end": f"(Keras' name) {_EVERY_STEP}.",
    "on_test_end": "(Keras' name) evaluation metrics come to on_eval_end(info).",
}


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


def _defines(callback: object, name: str) -> bool:
    """Whether ``callback``'s class has its own ``name`` (not ``Callback``'s empty default)."""
    method = inspect.getattr_static(type(callback), name, None)
    return method is not None and method is not inspect.getattr_static(Callback, name, None)


def hook(callback: object, event: str) -> Callable[[StepInfo], None]:
    """The method the Trainer calls for ``event`` (one of ``HOOKS``): the callback's own, or
    the transformers-named one that means it (``on_evaluate`` for ``on_eval_end``)."""
    for alias, target in HOOK_ALIASES.items():
        if target == event and _defines(callback, alias):
            return cast(Callable[[StepInfo], None], getattr(callback, alias))
    return cast(Callable[[StepInfo], None], getattr(callback, event))


def check_hooks(callback: object) -> None:
    """Refuses, when the Trainer is built, what it would silently never call: methods named
    ``on_*`` that are not kithara hooks (transformers' ``on_log``, a misspelling), a hook
    under both its names, and hooks that do not take one ``StepInfo``."""
    name = type(callback).__name__
    known = f"kithara's hooks are {', '.join(HOOKS)} (and transformers' on_evaluate, called as on_eval_end)"
    for method in dir(type(callback)):
        if not method.startswith("on_") or method in HOOKS or not callable(getattr(type(callback), method)):
            continue
        if method in HOOK_ALIASES:
            if _defines(callback, HOOK_ALIASES[method]):
                raise TypeError(
                    f"{name} defines both {method} and {HOOK_ALIASES[method]}, the same hook under transformers' "
                    "and kithara's names; keep one."
                )
            continue
        hint = suggest(method, (*HOOKS, *HOOK_ALIASES))
        instead = _INSTEAD.get(method) or (f"Did you mean {hint}?" if hint else "Rename it to one of them.")
        raise TypeError(
            f"{name}.{method} is not a callback hook, so the Trainer would never call it; {known}. {instead}"
        )
    for event in HOOKS:
        function = hook(callback, event)
        parameters = inspect.signature(function).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters) and len(parameters) != 1:
            title = getattr(function, "__name__", event)
            raise TypeError(
                f"{name}.{title} takes {len(parameters)} arguments; callbacks now get one "
                f"kithara.StepInfo: def {title}(self, info). See docs/trainer.md, 'Callbacks'."
            )
