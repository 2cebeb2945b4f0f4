"""Which Hugging Face tensor fills which keras-hub variable, element by element.

keras-hub's converters describe the mapping as ``loader.port_weight(variable, hf_key,
hook_fn)`` calls. Running a converter against a loader that hands out *positions*
(``arange`` in the Hugging Face shape) instead of weights turns each hook into an index
array: ``keras_value = hf_value.reshape(-1)[index]``. The same array read backwards
writes Hugging Face tensors on export, so loading and exporting share one table and
neither rounds values (keras-hub's Mistral hooks cast to float16; positions ignore casts).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
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
    """One keras variable and where its elements sit in one Hugging Face tensor."""

    hf_key: str
    hf_shape: tuple[int, ...]
    variable_path: str
    index: np.ndarray  # keras-shaped positions into the flattened Hugging Face tensor


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


class _Positions(np.ndarray):
    """Element positions that pass through converter hooks; dtype casts leave them alone."""

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> _Positions:
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
        key = self.canonical(hf_weight_key)
        if key.startswith(("model.language_model", "model.model")):
            raise KeyError(key)  # not a text-only causal LM layout
        shape = hf_shape(key, self.config)
        return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape).view(_Positions)

    def port_weight(self, keras_variable: keras.Variable, hf_weight_key: str, hook_fn: Any = None) -> None:
        key = self.canonical(hf_weight_key)
        positions = self.get_tensor(key)
        if hook_fn is not None:
            positions = hook_fn(positions, list(keras_variable.shape))
        index = np.asarray(positions).view(np.ndarray).astype(np.int64)
        if tuple(index.shape) != tuple(keras_variable.shape):
            raise ValueError(
                f"{key} maps to shape {index.shape}, but {keras_variable.path} has shape {tuple(keras_variable.shape)}."
            )
        self.entries.append(Entry(key, hf_shape(key, self.config), keras_variable.path, index))


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
