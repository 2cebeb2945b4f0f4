"""cast_adapters: LoRA adapter weights in another precision (TRL's cast of LoRA to bfloat16)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras

from kithara.models.adapters import is_lora_path
from kithara.utils.keras_model import keras_model_of

_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def cast_adapters(model: Any, dtype: str = "bfloat16") -> list[str]:
    """Stores every LoRA factor (``lora_kernel_a`` / ``lora_kernel_b``) of ``model`` in
    ``dtype``, on its own sharding; the frozen base weights keep theirs. A trainer built
    afterwards trains the factors in ``dtype`` (gradients and AdamW slots too), which halves
    their memory against float32; the adapter's product is added to the base kernel in the
    base kernel's precision (JAX promotes ``bfloat16 + float32`` to float32).

    Returns the paths cast. Refuses a model without LoRA factors. Build the trainer after
    casting: one built before keeps the dtypes it was built with.

    keras variables fix their dtype when created; this sets the dtype keras records for each
    factor (``Variable._dtype``, which keras reads when it converts values for the variable)
    and assigns the cast value.

    Example:
        >>> model = KerasHubModel.from_config("llama3", ..., lora=LoraConfig(rank=8))
        >>> cast_adapters(model)  # the LoRA factors are bfloat16 now
    """
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}.")
    variables = [v for v in keras_model_of(model).variables if is_lora_path(v.path)]
    if not variables:
        raise ValueError(
            f"{type(model).__name__} has no LoRA factors to cast; build it with lora=kithara.LoraConfig(...)."
        )
    shardings = model._shardings
    for variable in variables:
        value = jax.device_put(jnp.asarray(variable.value, dtype), shardings[variable.path])
        variable._dtype = keras.backend.standardize_dtype(dtype)
        variable.assign(value)
    return [v.path for v in variables]
