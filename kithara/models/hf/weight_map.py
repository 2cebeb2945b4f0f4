"""Which Hugging Face tensor fills which keras-hub variable, element by element.

keras-hub's converters describe the mapping as ``loader.port_weight(variable, hf_key,
hook_fn)`` calls. Running a converter against a loader that records those calls gives a
table of (tensor, variable, hook). Loading applies each hook to the real tensor, with dtype
casts skipped (keras-hub's Mistral hooks round through float16). Exporting runs the hook
on element positions (``arange`` in the Hugging Face shape) and scatters the keras value
back through them, so loading and exporting share one table and neither rounds values.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import keras
import numpy as np

# Hugging Face ``model_type`` -> keras-hub converter module (keras_hub.src.utils.transformers).
_CONVERTERS = {
    "llama": "convert_llama3",
    "mistral": "convert_mistral",
    "qwen2": "convert_qwen",
    "qwen3": "convert_qwen3",
    "gemma": "convert_gemma",
    "gemma2": "convert_gemma",
    "gemma3_text": "convert_gemma3",
}
MODEL_TYPES = tuple(_CONVERTERS)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One keras variable, the Hugging Face tensor that holds it, and the converter's hook
    that rearranges one into the other. Nothing is materialised until asked for, so a
    weight map of a large model costs no memory."""

    hf_key: str
    hf_shape: tuple[int, ...]
    variable_path: str
    keras_shape: tuple[int, ...]
    hook: Callable[[np.ndarray, list[int]], np.ndarray] | None

    def to_keras(self, hf_value: np.ndarray) -> np.ndarray:
        """The keras value of a Hugging Face tensor (same dtype: casts in hooks are skipped)."""
        if tuple(hf_value.shape) != self.hf_shape:
            raise ValueError(f"Tensor {self.hf_key} has shape {hf_value.shape}; config.json implies {self.hf_shape}.")
        value: np.ndarray = hf_value.view(_Uncast)
        if self.hook is not None:
            value = self.hook(value, list(self.keras_shape))
        value = np.asarray(value).view(np.ndarray)
        if tuple(value.shape) != self.keras_shape:
            raise ValueError(
                f"{self.hf_key} maps to shape {value.shape}, but {self.variable_path} has shape {self.keras_shape}."
            )
        return value

    def index(self) -> np.ndarray:
        """Keras-shaped positions into the flattened Hugging Face tensor."""
        size = math.prod(self.hf_shape)
        dtype = np.int32 if size < 2**31 else np.int64
        return self.to_keras(np.arange(size, dtype=dtype).reshape(self.hf_shape))

    def to_hf(self, keras_value: np.ndarray) -> np.ndarray:
        """The Hugging Face tensor of a keras value: the hook read backwards."""
        out = np.empty(math.prod(self.hf_shape), keras_value.dtype)
        out[self.index().reshape(-1)] = keras_value.reshape(-1)
        return out.reshape(self.hf_shape)


def converter(model_type: str) -> ModuleType:
    if model_type not in _CONVERTERS:
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported; kithara converts {sorted(_CONVERTERS)}."
        )
    return importlib.import_module(f"keras_hub.src.utils.transformers.{_CONVERTERS[model_type]}")


def hf_shape(key: str, config: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape a decoder-only checkpoint gives tensor ``key`` under ``config``."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inner = config["intermediate_size"]
    out_dims = {
        "q_proj": heads * head_dim,
        "k_proj": kv_heads * head_dim,
        "v_proj": kv_heads * head_dim,
        "o_proj": hidden,
        "gate_proj": inner,
        "up_proj": inner,
        "down_proj": hidden,
    }
    in_dims = {"o_proj": heads * head_dim, "down_proj": inner}
    parts = key.split(".")
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, hidden)
    if parts[-2] in out_dims:
        if parts[-1] == "bias":
            return (out_dims[parts[-2]],)
        return (out_dims[parts[-2]], in_dims.get(parts[-2], hidden))
    if parts[-2] in ("q_norm", "k_norm"):
        return (head_dim,)
    if parts[-2].endswith("norm"):
        return (hidden,)
    raise ValueError(f"No known shape for Hugging Face tensor {key!r}.")


class _Uncast(np.ndarray):
    """An array that passes through converter hooks unchanged in dtype (keras-hub's Mistral
    hooks cast every weight to float16)."""

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> _Uncast:
        return self


class _RecordingLoader:
    """Stands in for keras-hub's ``SafetensorLoader``: records instead of loading."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.preset = None
        self.entries: list[Entry] = []

    @staticmethod
    def canonical(key: str) -> str:
        return key if key.startswith(("model.", "lm_head.")) else f"model.{key}"

    def get_tensor(self, hf_weight_key: str) -> np.ndarray:
        """Only called to probe which key prefix a checkpoint uses (Gemma 3)."""
        key = self.canonical(hf_weight_key)
        if key.startswith(("model.language_model", "model.model")):
            raise KeyError(key)  # not a text-only causal LM layout
        return np.empty(hf_shape(key, self.config), np.int8)

    def port_weight(self, keras_variable: keras.Variable, hf_weight_key: str, hook_fn: Any = None) -> None:
        key = self.canonical(hf_weight_key)
        entry = Entry(key, hf_shape(key, self.config), keras_variable.path, tuple(keras_variable.shape), hook_fn)
        self.entries.append(entry)


def weight_map(backbone: keras.Model, config: Mapping[str, Any]) -> list[Entry]:
    """The entries that fill every weight of ``backbone`` from a checkpoint with ``config``."""
    loader = _RecordingLoader(config)
    # An adapted layer's ``kernel`` property returns the merged tensor, not the variable;
    # switch adapters off while the converter names variables.
    adapted = [layer for layer in backbone._flatten_layers(include_self=False) if getattr(layer, "lora_enabled", False)]
    for layer in adapted:
        layer.lora_enabled = False
    try:
        converter(config["model_type"]).convert_weights(backbone, loader, dict(config))
    finally:
        for layer in adapted:
            layer.lora_enabled = True
    return loader.entries
