"""The keras-hub model families kithara builds from architecture numbers.

Each family names its keras-hub classes, the layer names of its projections (for LoRA
targets) and how the common architecture numbers map onto the backbone's arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# Projection names users pick LoRA targets by, mapped to keras-hub layer names per layout.
_LLAMA_LAYERS = {
    "query": "query",
    "key": "key",
    "value": "value",
    "attention_output": "attention_output",
    "gate": "feedforward_gate_dense",
    "up": "feedforward_intermediate_dense",
    "down": "feedforward_output_dense",
}
_GEMMA_LAYERS = {
    "query": "query",
    "key": "key",
    "value": "value",
    "attention_output": "attention_output",
    "gate": "ffw_gating",
    "up": "ffw_gating_2",
    "down": "ffw_linear",
}
PROJECTIONS = tuple(_LLAMA_LAYERS)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Architecture numbers shared by every decoder family.

    ``intermediate_dim`` is the width of each MLP projection as Hugging Face configs count
    it (keras-hub's Gemma counts gate and up together; the conversion happens here).
    """

    vocab_size: int
    num_layers: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Architecture.{field.name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}).")
        if self.head_dim is None and self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) is not divisible by num_heads ({self.num_heads}); "
                "pass head_dim explicitly."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_dim // self.num_heads


def _base_args(a: Architecture) -> dict[str, Any]:
    return {
        "vocabulary_size": a.vocab_size,
        "num_layers": a.num_layers,
        "num_query_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "hidden_dim": a.hidden_dim,
        "intermediate_dim": a.intermediate_dim,
    }


def _llama_args(a: Architecture) -> dict[str, Any]:
    if a.head_dim is not None and a.head_dim * a.num_heads != a.hidden_dim:
        raise ValueError("This family derives head_dim as hidden_dim / num_heads; drop head_dim.")
    return _base_args(a)


def _with_head_dim(a: Architecture) -> dict[str, Any]:
    return {**_base_args(a), "head_dim": a.resolved_head_dim}


def _gemma_args(a: Architecture) -> dict[str, Any]:
    args = _with_head_dim(a)
    args["intermediate_dim"] = 2 * a.intermediate_dim  # keras-hub Gemma counts gate + up
    return args


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    backbone_class: str
    causal_lm_class: str
    layer_names: dict[str, str]
    backbone_args: Callable[[Architecture], dict[str, Any]]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3", "Llama3Backbone", "Llama3CausalLM", _LLAMA_LAYERS, _llama_args, {"rope_max_wavelength": 500000}
        ),
        Family(
            "mistral", "MistralBackbone", "MistralCausalLM", _LLAMA_LAYERS, _with_head_dim, {"sliding_window": 4096}
        ),
        Family("qwen2", "QwenBackbone", "Qwen2CausalLM", _LLAMA_LAYERS, _llama_args, {"rope_max_wavelength": 1000000}),
        Family(
            "qwen3", "Qwen3Backbone", "Qwen3CausalLM", _LLAMA_LAYERS, _with_head_dim, {"rope_max_wavelength": 1000000}
        ),
        Family("gemma", "GemmaBackbone", "GemmaCausalLM", _GEMMA_LAYERS, _gemma_args),
        Family(
            "gemma2",
            "GemmaBackbone",
            "GemmaCausalLM",
            _GEMMA_LAYERS,
            _gemma_args,
            {
                "query_head_dim_normalize": True,
                "use_post_ffw_norm": True,
                "use_post_attention_norm": True,
                "attention_logit_soft_cap": 50.0,
                "final_logit_soft_cap": 30.0,
                "use_sliding_window_attention": True,
                "sliding_window_size": 4096,
            },
        ),
        Family(
            "gemma3",
            "Gemma3Backbone",
            "Gemma3CausalLM",
            _GEMMA_LAYERS,
            lambda a: {**_with_head_dim(a), "image_size": None},
            {
                "use_post_ffw_norm": True,
                "use_post_attention_norm": True,
                "use_sliding_window_attention": True,
                "sliding_window_size": 512,
            },
        ),
    )
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def layer_layout(layer_names: set[str]) -> dict[str, str]:
    """Guesses the projection-name table of a loaded backbone from its layer names."""
    return _GEMMA_LAYERS if "ffw_gating" in layer_names else _LLAMA_LAYERS
