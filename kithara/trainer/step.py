"""The pure, jitted train and eval steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kithara.models.model import ModelVariables
from kithara.trainer import loss_scale as loss_scale_lib
from kithara.trainer.losses import LossOutput
from kithara.trainer.optimizers import learning_rate
from kithara.trainer.state import TrainState

Batch = Mapping[str, jax.Array]
# (variables, batch, rng) -> (loss, new non-trainable variables)
LossFn = Callable[[ModelVariables, Batch, jax.Array], tuple[LossOutput, dict[str, jax.Array]]]


def train_step(
    state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from ``batch``, whose arrays are ``[micro_batches, batch, ...]``.

    Gradients of each micro-batch's loss *sum* are added up and divided by the total weight
    at the end, so K micro-batches give the same update as one K-times-larger batch. With
    one micro-batch the mean is differentiated directly (same gradient, one pass fewer).

    When ``tx`` has a dynamic loss scale (``kithara.trainer.loss_scale``; float16 compute)
    the differentiated loss is multiplied by the scale in its state, and the summed
    gradients are divided by it once, in float32, before ``tx`` sees them; the metrics
    then hold ``loss_scale``, ``skipped`` and ``skipped_steps``. Without one the program
    is the plain step's.
    """
    rng, step_rng = jax.random.split(state.rng)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    scaling = loss_scale_lib.loss_scale_state(state.opt_state)
    scale = None if scaling is None else scaling.scale

    def micro_step(carry: tuple[Any, LossOutput, dict[str, jax.Array]], inputs: tuple[Batch, jax.Array]):
        grads_sum, loss_sum, non_trainable = carry
        micro_batch, index = inputs

        def total_loss(trainable: dict[str, jax.Array]) -> tuple[jax.Array, tuple[LossOutput, dict[str, jax.Array]]]:
            variables = ModelVariables(trainable, non_trainable)
            out, new_non_trainable = loss_fn(variables, micro_batch, jax.random.fold_in(step_rng, index))
            return _scaled(out.total, scale), (out, new_non_trainable)

        grads, (out, new_non_trainable) = jax.grad(total_loss, has_aux=True)(state.model.trainable)
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        loss_sum = jax.tree.map(jnp.add, loss_sum, out)
        return (grads_sum, loss_sum, new_non_trainable), None

    if num_micro == 1:
        grads, loss, non_trainable = _mean_loss_grads(state, batch, loss_fn, step_rng, scale)
        weight = jnp.maximum(loss.weight, 1.0)
    else:
        zero_grads = jax.tree.map(jnp.zeros_like, state.model.trainable)
        zero_loss = jax.eval_shape(lambda: loss_fn(state.model, jax.tree.map(lambda x: x[0], batch), step_rng)[0])
        zero_loss = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_loss)
        (grads_sum, loss, non_trainable), _ = jax.lax.scan(
            micro_step, (zero_grads, zero_loss, state.model.non_trainable), (batch, jnp.arange(num_micro))
        )
        weight = jnp.maximum(loss.weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads_sum)
    if scale is not None:
        grads = loss_scale_lib.unscale(grads, scale)
    updates, opt_state = tx.update(grads, state.opt_state, state.model.trainable)
    trainable = optax.apply_updates(state.model.trainable, updates)
    new_state = TrainState(ModelVariables(trainable, non_trainable), opt_state, state.step + 1, rng)
    metrics = {
        "loss": loss.total / weight,
        "grad_norm": optax.global_norm(grads),
        "tokens": sum(v.sum().astype(jnp.float32) for k, v in batch.items() if k.endswith("padding_mask")),
        "loss_weight": loss.weight,
        **{name: value / weight for name, value in loss.sums.items()},
    }
    lr = learning_rate(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    if scaling is not None:
        metrics.update(loss_scale_lib.metrics(scaling, opt_state))
    return new_state, metrics


def _scaled(loss: jax.Array, scale: jax.Array | None) -> jax.Array:
    """The loss to differentiate: multiplied by the dynamic loss scale, if any."""
    return loss if scale is None else loss * scale


def _mean_loss_grads(
    state: TrainState, batch: Batch, loss_fn: LossFn, step_rng: jax.Array, scale: jax.Array | None
) -> tuple[Any, LossOutput, dict[str, jax.Array]]:
    """One micro-batch: the gradient of ``total / weight`` (weight held constant), which
    equals the accumulated path's ``grad(total) / weight`` but seeds the backward pass with
    ``1 / weight`` instead of dividing every gradient afterwards: one pass fewer over them."""
    micro_batch = jax.tree.map(lambda x: x[0], batch)

    def mean_loss(trainable: dict[str, jax.Array]) -> tuple[jax.Array, tuple[LossOutput, dict[str, jax.Array]]]:
        variables = ModelVariables(trainable, state.model.non_trainable)
        out, new_non_trainable = loss_fn(variables, micro_batch, jax.random.fold_in(step_rng, 0))
        mean = out.total / jax.lax.stop_gradient(jnp.maximum(out.weight, 1.0))
        return _scaled(mean, scale), (out, new_non_trainable)

    grads, (out, non_trainable) = jax.grad(mean_loss, has_aux=True)(state.model.trainable)
    return grads, out, non_trainable


def eval_step(variables: ModelVariables, batch: Batch, *, loss_fn: LossFn) -> LossOutput:
    """Loss sums of one ``[batch, ...]`` evaluation batch (no gradient, no state change)."""
    out, _ = loss_fn(variables, batch, jax.random.key(0))
    return out
