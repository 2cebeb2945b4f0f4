"""The training state: one named pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from kithara.models.model import ModelVariables


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
        model: trainable and non-trainable model variables.
        opt_state: optimizer state; only trainable variables have slots.
        step: number of optimizer updates applied so far (int32 scalar).
        rng: PRNG key, split once per step.
    """

    model: ModelVariables
    opt_state: Any
    step: Any  # int32 scalar array (or its sharding, in the layout tree)
    rng: Any  # PRNG key data
