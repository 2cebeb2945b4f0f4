"""Dynamic loss scaling for float16 compute (``precision="mixed_float16"``, TRL's ``fp16``).

float16 has 5 exponent bits: gradients below about 6e-8 flush to zero and values past
65504 overflow. The train step multiplies the loss by a scale before differentiating (so
small gradients stay representable in the float16 backward pass) and divides the gradients
by it again in float32; ``dynamic_loss_scale`` wraps the optimizer and owns the scale. Its
semantics are those of ``torch.cuda.amp.GradScaler``, Keras' ``LossScaleOptimizer`` and
``jmp.DynamicLossScale``: a step whose gradients hold an inf or NaN is skipped (parameters
and the inner optimizer's state, its step count and schedule position included, stay as
they were) and the scale is multiplied by ``backoff_factor``; after ``growth_interval``
finite steps in a row it is multiplied by ``growth_factor``. The scale lives in the
optimizer state, so checkpoints save it and a resumed run continues with it exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

logger = logging.getLogger(__name__)


class LossScaleState(NamedTuple):
    """The wrapper's state around the inner optimizer's.

    Attributes:
        scale: float32 scalar the next step's loss is multiplied by.
        good_steps: int32, finite steps in a row since the scale last changed.
        skipped_steps: int32, updates skipped so far (non-finite gradients).
        inner_state: the wrapped optimizer's state.
    """

    scale: jax.Array
    good_steps: jax.Array
    skipped_steps: jax.Array
    inner_state: Any


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with a dynamic loss scale: updates with non-finite gradients are skipped.

    The train step (``kithara.trainer.step.train_step``) finds the scale in the optimizer
    state (``loss_scale``), multiplies the loss by it and hands this transformation the
    gradients already divided by it, in float32. ``update`` then:

    - all gradients finite: runs ``inner``; after ``growth_interval`` such steps in a row
      multiplies the scale by ``growth_factor`` (kept finite in float32);
    - any inf or NaN: returns zero updates and ``inner``'s state unchanged (its step count
      and learning-rate schedule do not advance, as in torch's ``GradScaler`` with
      transformers' Trainer), multiplies the scale by ``backoff_factor`` (never below
      ``min_scale``) and counts the step in ``skipped_steps``.

    The trainer wraps its optimizer (built or given) in this with the defaults when the
    model computes in float16; pass an optimizer already wrapped to choose other settings.

    Args:
        inner: the optimizer to run on finite steps.
        initial_scale: the first scale: 2**15, Keras' default (torch's ``GradScaler`` starts
            at 2**16; either backs off within a step or two when too high).
        growth_interval: finite steps in a row before the scale grows (torch's 2000; Keras
            and jmp use 2000 too).
        growth_factor: the growth multiplier, > 1.
        backoff_factor: the multiplier after a non-finite step, in (0, 1).
        min_scale: the floor of the scale, > 0 (jmp's 1.0: below it scaling would shrink
            gradients instead of protecting them).

    Example:
        >>> tx = kithara.trainer.loss_scale.dynamic_loss_scale(
        ...     kithara.optimizers.adamw(1e-4), initial_scale=2.0**16, growth_interval=1000)
    """
    _check(initial_scale, growth_interval, growth_factor, backoff_factor, min_scale)
    inner = optax.with_extra_args_support(inner)
    largest = float(jnp.finfo(jnp.float32).max)

    def init(params: Any) -> LossScaleState:
        zero = jnp.zeros((), jnp.int32)
        return LossScaleState(jnp.asarray(initial_scale, jnp.float32), zero, zero, inner.init(params))

    def update(grads: Any, state: LossScaleState, params: Any = None, **extra_args: Any) -> tuple[Any, LossScaleState]:
        finite = all_finite(grads)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state)
        grow = finite & (state.good_steps + 1 >= growth_interval)
        grown = jnp.where(state.scale * growth_factor <= largest, state.scale * growth_factor, state.scale)
        backed_off = jnp.maximum(state.scale * backoff_factor, min_scale)
        scale = jnp.where(finite, jnp.where(grow, grown, state.scale), backed_off)
        good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
        skipped_steps = state.skipped_steps + (~finite).astype(jnp.int32)
        return updates, LossScaleState(scale.astype(jnp.float32), good_steps, skipped_steps, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every array in ``tree`` is finite (a bool scalar)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def loss_scale_state(opt_state: Any) -> LossScaleState | None:
    """The ``dynamic_loss_scale`` state inside an optimizer state, or None when the
    optimizer has no loss scaling (the train step then compiles as without it)."""
    is_state = lambda x: isinstance(x, LossScaleState)  # noqa: E731
    return next((node for node in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(node)), None)


def loss_scale(opt_state: Any) -> jax.Array | None:
    """The scale the next step multiplies its loss by, or None without loss scaling."""
    found = loss_scale_state(opt_state)
    return None if found is None else found.scale


def unscale(grads: Any, scale: jax.Array) -> Any:
    """Gradients of the scaled loss divided by ``scale``, in float32."""
    return jax.tree.map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)


def metrics(before: LossScaleState, new_opt_state: Any) -> dict[str, jax.Array]:
    """A step's loss-scaling metrics from its scale state ``before`` and the optimizer state
    its update returned: ``loss_scale``, the scale its loss was multiplied by; ``skipped``,
    1.0 when its update was skipped; ``skipped_steps``, the running count."""
    after = cast(LossScaleState, loss_scale_state(new_opt_state))  # update keeps the state's structure
    return {
        "loss_scale": before.scale,
        "skipped": (after.skipped_steps - before.skipped_steps).astype(jnp.float32),
        "skipped_steps": after.skipped_steps.astype(jnp.float32),
    }


def describe(scale: float) -> str:
    """A scale for a log line: ``2**40`` for a power of two, else ``%g``."""
    exponent = math.log2(scale) if scale > 0 and math.isfinite(scale) else 0.5
    return f"2**{int(exponent)}" if exponent.is_integer() else f"{scale:g}"


def with_loss_scaling(
    tx: optax.GradientTransformation, param_shapes: Mapping[str, jax.ShapeDtypeStruct]
) -> optax.GradientTransformation:
    """``tx`` wrapped in ``dynamic_loss_scale`` with the defaults, unless its state already
    holds a loss scale (an optimizer the caller wrapped with settings of their own)."""
    if loss_scale_state(jax.eval_shape(tx.init, dict(param_shapes))) is not None:
        return tx
    logger.info("float16 compute: dynamic loss scaling (initial scale 2**15, growth every 2000 finite steps)")
    return dynamic_loss_scale(tx)


def _check(initial_scale: float, growth_interval: int, growth_factor: float, backoff_factor: float, min_scale: float):
    problems = []
    if not (isinstance(initial_scale, (int, float)) and math.isfinite(initial_scale) and initial_scale >= min_scale):
        problems.append(f"initial_scale={initial_scale!r} must be a finite number >= min_scale ({min_scale!r})")
    if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
        problems.append(f"growth_interval={growth_interval!r} must be a positive int")
    if not growth_factor > 1:
        problems.append(f"growth_factor={growth_factor!r} must be > 1")
    if not 0 < backoff_factor < 1:
        problems.append(f"backoff_factor={backoff_factor!r} must be in (0, 1)")
    if not min_scale > 0:
        problems.append(f"min_scale={min_scale!r} must be > 0")
    if problems:
        raise ValueError(f"dynamic_loss_scale: {'; '.join(problems)}.")
