"""Host offload of the optimizer state and the trainable (master) weights
(``TrainingConfig.offload_optimizer`` / ``offload_params``).

Offloaded leaves of the train state live in pinned host memory between steps, with their
own partition specs (``NamedSharding.with_memory_kind("pinned_host")``). The jitted train
step moves them to device memory first (``jax.device_put(x, jax.memory.Space.Device)``,
a transfer XLA schedules inside the program), updates them, and writes them back to host
memory through its out_shardings. Code outside the step that reads the weights gets
device-memory copies (``device_copy``): evaluation, sampling, callbacks.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
from jax.sharding import Mesh, NamedSharding

from kithara.models.model import ModelVariables
from kithara.trainer.state import TrainState

HOST = "pinned_host"
DEVICE = "device"
Step = TypeVar("Step", bound=Callable[..., Any])


def check_supported(mesh: Mesh, *, offload_optimizer: bool, offload_params: bool) -> None:
    """Refuses offload on devices without pinned host memory, naming the backend."""
    asked = [name for name, on in (("offload_optimizer", offload_optimizer), ("offload_params", offload_params)) if on]
    if not asked:
        return
    device = mesh.local_devices[0]
    kinds = sorted(m.kind for m in device.addressable_memories())
    if HOST not in kinds:
        raise ValueError(
            f"{' and '.join(f'{n}=True' for n in asked)} keeps arrays in host memory (memory kind {HOST!r}), which "
            f"the {device.platform!r} backend's devices ({device.device_kind}) do not have (their memory kinds: "
            f"{kinds}). Set {' and '.join(f'{n}=False' for n in asked)} on this backend."
        )


def offloaded_shardings(shardings: TrainState, *, offload_optimizer: bool, offload_params: bool) -> TrainState:
    """``shardings`` with the optimizer state and/or the trainable variables in pinned host
    memory (same partition specs); non-trainable variables, step and rng stay where they are."""
    model = shardings.model
    if offload_params:
        model = ModelVariables(jax.tree.map(_to_host, model.trainable), model.non_trainable)
    opt_state = jax.tree.map(_to_host, shardings.opt_state) if offload_optimizer else shardings.opt_state
    return dataclasses.replace(shardings, model=model, opt_state=opt_state)


def device_shardings(tree: Any) -> Any:
    """``tree``'s shardings with those in host memory moved to device memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(DEVICE) if _memory_kind(s) == HOST else s, tree)


def is_offloaded(shardings: Any) -> bool:
    """Whether any sharding in ``shardings`` is in pinned host memory."""
    return any(_memory_kind(s) == HOST for s in jax.tree.leaves(shardings))


def in_device_memory(tree: Any) -> Any:
    """Inside jit: ``tree``'s host-memory arrays moved to device memory (others untouched)."""

    def move(x: Any) -> Any:
        if getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host:
            return jax.device_put(x, jax.memory.Space.Device)
        return x

    return jax.tree.map(move, tree)


def step_in_device_memory(train_step: Step) -> Step:
    """``train_step(state, batch, frozen)`` run on a state moved to device memory first; the
    result goes back to host memory through the jitted step's out_shardings."""

    @functools.wraps(train_step)
    def step(state: TrainState, *args: Any) -> Any:
        return train_step(in_device_memory(state), *args)

    return step  # type: ignore[return-value]


def device_copy(tree: Any) -> Any:
    """Outside jit: ``tree`` with its pinned-host arrays copied to device memory (same
    sharding); arrays already in device memory are returned as they are, not copied."""
    leaves, treedef = jax.tree.flatten(tree)
    moving = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and _memory_kind(x.sharding) == HOST]
    if not moving:
        return tree
    moved = jax.device_put([leaves[i] for i in moving], [leaves[i].sharding.with_memory_kind(DEVICE) for i in moving])
    for i, x in zip(moving, moved, strict=True):
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def device_view(state: TrainState | None) -> TrainState | None:
    """``state`` with its model variables in device memory (``device_copy``; the state itself
    when nothing is offloaded): what callbacks read as ``info.state``."""
    if state is None:
        return None
    model = device_copy(state.model)
    return state if model is state.model else dataclasses.replace(state, model=model)


def move_to(tree: Any, shardings: Any, released: list[jax.Array] | None = None) -> Any:
    """Outside jit: ``tree``'s arrays whose memory kind differs from their target sharding's
    moved there. Arrays already in place are returned as they are. The sources are deleted (what
    donating them would do, which XLA does not implement across memory kinds), or, given
    ``released``, appended to it for the caller to delete later."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = cast(Any, treedef).flatten_up_to(shardings)
    moving = [
        i
        for i, (x, s) in enumerate(zip(leaves, targets, strict=True))
        if isinstance(x, jax.Array) and _memory_kind(x.sharding) != _memory_kind(s)
    ]
    if not moving:
        return tree
    moved = jax.device_put([leaves[i] for i in moving], [targets[i] for i in moving])
    for i, x in zip(moving, moved, strict=True):
        if released is None:
            leaves[i].delete()
        else:
            released.append(leaves[i])
        leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def _to_host(sharding: Any) -> Any:
    if not isinstance(sharding, NamedSharding):
        raise ValueError(f"Offload needs NamedSharding leaves in the train state's layout; got {sharding!r}.")
    return sharding.with_memory_kind(HOST)


def _memory_kind(sharding: Any) -> str:
    kind = getattr(sharding, "memory_kind", None)
    return DEVICE if kind is None else kind
