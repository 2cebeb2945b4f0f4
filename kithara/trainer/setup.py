"""Creating the training state: its shardings, a fresh state, its abstract layout, and the
step plan. The Trainer restores checkpoints onto ``abstract_state``'s layout."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kithara import sharding as sharding_lib
from kithara.models.model import Model
from kithara.trainer.optimizers import state_shardings as optimizer_state_shardings
from kithara.trainer.state import TrainState


def param_shapes(model: Model) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the model's trainable variables, by path."""
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in model.variables.trainable.items()}


def state_shardings(model: Model, tx: optax.GradientTransformation) -> TrainState:
    """Where every leaf of the train state lives: model variables as the model declares,
    optimizer slots like their parameters, scalars replicated."""
    shapes = param_shapes(model)
    model_shardings = model.variable_shardings
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_shardings = optimizer_state_shardings(opt_shapes, model_shardings.trainable, shapes, model.mesh)
    replicated = sharding_lib.replicated(model.mesh)
    return TrainState(model=model_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)


def init_state(model: Model, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """A fresh state from the model's current variables."""
    params = model.variables
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params.trainable)
    replicated = sharding_lib.replicated(model.mesh)
    return TrainState(
        model=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
    )


def abstract_state(model: Model, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """Shapes, dtypes and shardings of the state ``init_state`` would build, allocating nothing."""
    shapes = jax.eval_shape(lambda: init_state(model, tx, shardings, seed))
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding), shapes, shardings
    )


def digest(tree: Any) -> str:
    """A short hash of a pytree's structure and leaves (shapes, specs)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return hashlib.sha256(repr(leaves).encode()).hexdigest()[:16]


def plan_steps(
    batches_per_epoch: int, *, steps: int | None, epochs: int | None, gradient_accumulation_steps: int = 1
) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: ``steps`` if set, else ``epochs`` (default 1)
    passes, each of ``batches_per_epoch // gradient_accumulation_steps`` steps."""
    steps_per_epoch = batches_per_epoch // gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"The train loader has {batches_per_epoch} batches per epoch, fewer than "
            f"gradient_accumulation_steps={gradient_accumulation_steps}."
        )
    return steps_per_epoch, steps if steps is not None else (epochs or 1) * steps_per_epoch
