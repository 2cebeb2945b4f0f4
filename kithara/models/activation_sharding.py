"""Sharding constraints on decoder activations (``ScaleConfig.activation_sharding``, docs/scale.md).

The batch arrives split over the mesh's batch axes (``data`` and ``fsdp``) and the weights are
split over ``fsdp`` (and ``tensor``). Left alone, XLA's sharding propagation may pick the
weights' layout for the activations and all-gather them over the whole global batch (issue 19
saw ``f32[8,256,704]`` on every device of an FSDP-8 mesh, where each should hold one row).
``constrain_hidden`` pins ``[batch, length, hidden]`` hidden states to the batch sharding at the
decoder seam (each block's input and output), so the weights are gathered instead.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara.sharding import BATCH_AXES, batch_shards


def hidden_spec() -> PartitionSpec:
    """``[batch, length, hidden]`` split over the batch axes, the rest whole."""
    return PartitionSpec(BATCH_AXES, None, None)


def constrain_hidden(hidden: Any, mesh: Mesh) -> Any:
    """``hidden`` held to ``hidden_spec()`` on ``mesh`` when it is a ``[batch, length, hidden]``
    array whose batch the batch axes divide; anything else (another rank, a batch that does not
    divide, a mesh with one batch shard) comes back unchanged. Never raises."""
    shape = getattr(hidden, "shape", None)
    shards = batch_shards(mesh)
    if shape is None or len(shape) != 3 or shards == 1 or shape[0] % shards:
        return hidden
    return jax.lax.with_sharding_constraint(hidden, NamedSharding(mesh, hidden_spec()))
