"""Optimizers: optax transformations, keras optimizers adapted to optax, and helpers
to find the learning rate and lay optimizer state out on the mesh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from keras.src.backend.common.stateless_scope import StatelessScope

from kithara.trainer import adamw_8bit
from kithara.trainer.adamw_8bit import scale_by_adam_8bit

_SLOT_SEPARATOR = "#"
STATE_DTYPES = ("float32", "int8")  # adamw's moments: float32, or 8-bit as bitsandbytes' AdamW8bit


def adamw(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    state_dtype: str = "float32",
) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping, with the learning rate exposed for logging.

    ``state_dtype="int8"`` keeps both moments in 8 bits as bitsandbytes' ``AdamW8bit``
    (``kithara.trainer.adamw_8bit``): a quarter of the float32 state's bytes, plus one float32
    scale per 256 elements; parameters under 4096 elements keep float32 moments.

    Example:
        >>> schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 100, 1000)
        >>> tx = kithara.optimizers.adamw(schedule, weight_decay=0.01)
        >>> tx_8bit = kithara.optimizers.adamw(3e-4, weight_decay=0.01, state_dtype="int8")
    """
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {list(STATE_DTYPES)}, got {state_dtype!r}.")

    def make(learning_rate: Any) -> optax.GradientTransformation:
        chain = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
        if state_dtype == "int8":  # optax.adamw's order, with 8-bit moments
            chain += [
                scale_by_adam_8bit(b1, b2, eps),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate),
            ]
        else:
            chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
        return optax.chain(*chain)

    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


class KerasOptimizerState(NamedTuple):
    variables: dict[str, jax.Array]  # keyed "param path#slot" for slots, the variable's name otherwise
    learning_rate: jax.Array


def keras_optimizer(
    optimizer: keras.optimizers.Optimizer, param_shapes: Mapping[str, jax.ShapeDtypeStruct]
) -> optax.GradientTransformation:
    """A keras optimizer run statelessly, with the optax interface.

    The keras optimizer is built once on host memory against placeholder variables (one
    per trainable parameter) to learn its slot layout and initial values; training then
    calls ``stateless_apply`` inside the jitted step. Slot variables are keyed by the
    parameter they belong to, so they get that parameter's sharding.
    """
    paths = list(param_shapes)
    with jax.default_device(jax.devices("cpu")[0]):
        placeholders = [
            keras.Variable(np.zeros(s.shape, s.dtype), name=f"p{i}") for i, s in enumerate(param_shapes.values())
        ]
        path_of = {id(v): path for v, path in zip(placeholders, paths, strict=True)}
        owner: dict[int, str] = {}
        add_from_reference = optimizer.add_variable_from_reference

        def recording(reference_variable: keras.Variable, name: str | None = None, initializer: Any = "zeros"):
            variable = add_from_reference(reference_variable, name=name, initializer=initializer)
            owner[id(variable)] = f"{path_of[id(reference_variable)]}{_SLOT_SEPARATOR}{name}"
            return variable

        optimizer.add_variable_from_reference = recording
        try:
            optimizer.build(placeholders)
        finally:
            del optimizer.add_variable_from_reference
        # Keras names optimizers with a process-wide counter ("adam_3/iteration"); drop that
        # prefix so a checkpoint's keys match the same optimizer built in another process.
        prefix = f"{optimizer.name}/"
        keys = [owner.get(id(v), v.path.removeprefix(prefix)) for v in optimizer.variables]
        initial = {k: np.asarray(v.value) for k, v in zip(keys, optimizer.variables, strict=True)}

    def current_lr(values: list[jax.Array]) -> jax.Array:
        with StatelessScope(state_mapping=list(zip(optimizer.variables, values, strict=True))):
            return jnp.asarray(optimizer._get_current_learning_rate(), jnp.float32)

    def init(params: Any) -> KerasOptimizerState:
        del params
        return KerasOptimizerState({k: jnp.asarray(v) for k, v in initial.items()}, jnp.zeros((), jnp.float32))

    def update(grads: Any, state: KerasOptimizerState, params: Any = None) -> tuple[Any, KerasOptimizerState]:
        if params is None:
            raise ValueError("The keras optimizer's update needs params.")
        values = [state.variables[k] for k in keys]
        lr = current_lr(values)
        new_params, new_values = optimizer.stateless_apply(
            values, [grads[p] for p in paths], [params[p] for p in paths]
        )
        updates = {p: new - params[p] for p, new in zip(paths, new_params, strict=True)}
        return updates, KerasOptimizerState(dict(zip(keys, new_values, strict=True)), lr)

    return optax.GradientTransformation(init, update)


def as_gradient_transformation(
    optimizer: optax.GradientTransformation | keras.optimizers.Optimizer,
    param_shapes: Mapping[str, jax.ShapeDtypeStruct],
) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if optimizer.built:
            raise ValueError("Pass a fresh keras optimizer: this one is already built for other variables.")
        return keras_optimizer(optimizer, param_shapes)
    raise TypeError(
        f"optimizer must be an optax.GradientTransformation or a keras optimizer, got {type(optimizer).__name__}."
    )


def learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate used by the last update, if the optimizer exposes it
    (``optax.inject_hyperparams`` or a keras optimizer)."""
    hyper = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    is_state = lambda x: isinstance(x, (*hyper, KerasOptimizerState))  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=is_state):
        if isinstance(node, KerasOptimizerState):
            return node.learning_rate
        if isinstance(node, hyper) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return None


def state_shardings(
    opt_state_shapes: Any, param_shardings: Mapping[str, NamedSharding], param_shapes: Mapping[str, Any], mesh: Mesh
) -> Any:
    """Shardings for optimizer state: a leaf keyed by a parameter path (optax mirrors the
    parameter dict; keras slots are keyed ``path#slot``) with that parameter's shape gets
    the parameter's sharding, and 8-bit Adam's block scales (``absmax``) follow the
    parameter's leading axes (``adamw_8bit.absmax_spec``); everything else (counts,
    scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    absmax_key = jax.tree_util.GetAttrKey("absmax")

    def pick(key_path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        for i in reversed(range(len(key_path))):
            entry = key_path[i]
            if isinstance(entry, jax.tree_util.DictKey) and isinstance(entry.key, str):
                path = entry.key.split(_SLOT_SEPARATOR, 1)[0]
                if path not in param_shardings:
                    continue
                shape = tuple(param_shapes[path].shape)
                if shape == tuple(leaf.shape):
                    return param_shardings[path]
                if tuple(key_path[i + 1 :]) == (absmax_key,) and leaf.shape == adamw_8bit.absmax_shape(shape):
                    spec = adamw_8bit.absmax_spec(param_shardings[path].spec, shape, adamw_8bit.BLOCK_SIZE, mesh)
                    return NamedSharding(mesh, spec, memory_kind=param_shardings[path].memory_kind)
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)
