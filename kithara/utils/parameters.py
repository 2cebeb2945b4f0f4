"""count_parameters: how many numbers a model trains, or holds."""

from __future__ import annotations

import math

from kithara.models.model import Model


def count_parameters(model: Model, trainable_only: bool = False) -> int:
    """The number of parameters of ``model``: every variable's elements, or with
    ``trainable_only`` those that receive gradients and optimizer state (the LoRA factors
    under LoRA; not what ``freeze_layers`` froze). Layer state such as dropout seeds counts
    among the non-trainable variables, as transformers' ``num_parameters`` counts buffers.

    Example:
        >>> model = KerasHubModel.from_config("llama3", vocab_size=64, num_layers=2, hidden_dim=32,
        ...     num_heads=4, num_kv_heads=2, intermediate_dim=64, lora=LoraConfig(rank=2))
        >>> count_parameters(model), count_parameters(model, trainable_only=True)
        (23520, 832)
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a kithara.Model, got {type(model).__name__}.")
    variables = model.variables
    arrays = list(variables.trainable.values())
    if not trainable_only:
        arrays += list(variables.non_trainable.values())
    return sum(math.prod(x.shape) for x in arrays)
