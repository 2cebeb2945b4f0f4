"""Named LoRA adapter sets over one frozen base: switch by passing a different pytree.

An adapter set is the ``{path: array}`` dict of a model's LoRA factors (``lora_kernel_a``
and ``lora_kernel_b``). ``with_adapter`` puts one set into a ``ModelVariables`` whose other
entries (the frozen base) are the very same arrays, so generating or training with adapter
"A" or "B", or with none, copies no base weight and leaves no state behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kithara.models.model import ModelVariables

AdapterSet = dict[str, jax.Array]


def is_lora_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith("lora_kernel")


def adapter_set(variables: ModelVariables) -> AdapterSet:
    """The LoRA factors of ``variables`` (trainable under LoRA) as an adapter set."""
    trees = (variables.trainable, variables.non_trainable)
    found = {p: v for tree in trees for p, v in tree.items() if is_lora_path(p)}
    if not found:
        raise ValueError("These variables hold no LoRA factors; build the model with lora=LoraConfig(...).")
    return found


def with_adapter(variables: ModelVariables, adapter: Mapping[str, jax.Array]) -> ModelVariables:
    """``variables`` with its LoRA factors replaced by ``adapter`` (same paths and shapes)."""
    current = adapter_set(variables)
    if set(adapter) != set(current):
        missing, extra = sorted(set(current) - set(adapter)), sorted(set(adapter) - set(current))
        raise ValueError(f"Adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}.")

    def put(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {p: adapter.get(p, v) for p, v in tree.items()}

    return ModelVariables(put(variables.trainable), put(variables.non_trainable))


def has_lora(model: Any) -> bool:
    """Whether ``model``'s variables hold LoRA factors."""
    variables = model.variables
    return any(p.endswith("lora_kernel_b") for p in (*variables.trainable, *variables.non_trainable))


def frozen_copy(model: Any) -> ModelVariables:
    """A copy of ``model``'s variables on their own shardings: a frozen reference that the
    trained variables (donated at every step) never alias."""
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=model.variable_shardings)
    return copy(model.variables)


def adapter_off(variables: ModelVariables) -> ModelVariables:
    """The same variables with every LoRA ``lora_kernel_b`` zeroed: keras-hub computes
    ``kernel + (a @ b) * scale``, so this is the base model, without a second weight copy."""

    def off(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {p: jnp.zeros_like(v) if p.endswith("lora_kernel_b") else v for p, v in tree.items()}

    return ModelVariables(off(variables.trainable), off(variables.non_trainable))
