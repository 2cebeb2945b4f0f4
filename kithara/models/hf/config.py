"""Hugging Face ``config.json`` <-> keras-hub backbone arguments, for the supported families.

keras-hub's own converters drop settings that change the numbers (RMSNorm epsilon of
Llama and Gemma, rope theta and scaling, Qwen3's q/k-norm epsilon, tied Llama/Qwen heads
in some versions). Here every setting that matters is either carried over, applied to the
built layers, or refused with an error naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras

from kithara.models.building import match_layers_to_backbone, query_head_dim_normalize

Config = Mapping[str, Any]

# model_type -> (keras-hub backbone class, causal LM class, HF architecture)
CLASSES = {
    "llama": ("Llama3Backbone", "Llama3CausalLM", "LlamaForCausalLM"),
    "mistral": ("MistralBackbone", "MistralCausalLM", "MistralForCausalLM"),
    "qwen2": ("QwenBackbone", "Qwen2CausalLM", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Backbone", "Qwen3CausalLM", "Qwen3ForCausalLM"),
    "gemma": ("GemmaBackbone", "GemmaCausalLM", "GemmaForCausalLM"),
    "gemma2": ("GemmaBackbone", "GemmaCausalLM", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3Backbone", "Gemma3CausalLM", "Gemma3ForCausalLM"),
}


class UnsupportedConfig(ValueError):
    """A config.json setting that keras-hub's implementation of the family cannot express."""


def _refuse(config: Config, field: str, why: str) -> UnsupportedConfig:
    return UnsupportedConfig(
        f"config.json ({config.get('model_type')}): {field}={config.get(field)!r} is not supported: {why}."
    )


def rope(config: Config, kind: str | None = None) -> dict[str, Any]:
    """Rope settings as transformers 5 writes them (``rope_parameters``), or from the older
    ``rope_theta`` + ``rope_scaling`` fields. ``kind`` picks ``full_attention`` or
    ``sliding_attention`` where a config has one set per attention type."""
    params = dict(config.get("rope_parameters") or {})
    if kind is not None and kind in params:
        params = dict(params[kind])
    elif kind is not None and ("full_attention" in params or "sliding_attention" in params):
        params = {}
    elif kind == "sliding_attention" and not params:
        # Older Gemma 3 configs: rope_scaling applies to global layers only, and local
        # layers rotate with rope_local_base_freq.
        return {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    if not params:
        params = dict(config.get("rope_scaling") or {})
        if "rope_theta" in config:
            params.setdefault("rope_theta", config["rope_theta"])
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _common(config: Config) -> dict[str, Any]:
    return {
        "vocabulary_size": config["vocab_size"],
        "num_layers": config["num_hidden_layers"],
        "num_query_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "hidden_dim": config["hidden_size"],
        "intermediate_dim": config["intermediate_size"],
        "layer_norm_epsilon": config["rms_norm_eps"],
    }


def _plain_rope(config: Config) -> dict[str, Any]:
    params = rope(config)
    if params["rope_type"] == "default":
        return {"rope_max_wavelength": params["rope_theta"]}
    if params["rope_type"] == "linear":
        return {"rope_max_wavelength": params["rope_theta"], "rope_scaling_factor": params["factor"]}
    raise _refuse(config, "rope_parameters", f"rope_type {params['rope_type']!r} (only default and linear)")


def _derived_head_dim(config: Config) -> None:
    """Refuses a ``head_dim`` other than hidden_size / num_attention_heads, for backbones
    that derive it (Llama3Backbone, QwenBackbone)."""
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise _refuse(
            config, "head_dim", "this keras-hub backbone derives head_dim as hidden_size / num_attention_heads"
        )


def _no_sliding(config: Config) -> None:
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        raise _refuse(config, "use_sliding_window", "keras-hub has no per-layer sliding window for this family")


def _llama(config: Config) -> dict[str, Any]:
    _no_sliding(config)
    _derived_head_dim(config)
    params = rope(config)
    args = {**_common(config), "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    args["rope_max_wavelength"] = params["rope_theta"]
    if params["rope_type"] == "llama3":
        args.update(
            rope_frequency_adjustment_factor=params["factor"],
            rope_low_freq_factor=params["low_freq_factor"],
            rope_high_freq_factor=params["high_freq_factor"],
            rope_pretraining_sequence_length=params["original_max_position_embeddings"],
        )
    elif params["rope_type"] != "default":
        # keras-hub's LlamaRotaryEmbedding ignores its position scaling factor, so linear is out too.
        raise _refuse(config, "rope_parameters", f"rope_type {params['rope_type']!r} (default, llama3)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise _refuse(config, "attention_bias", "Llama3Backbone has no projection biases")
    return args


def _mistral(config: Config) -> dict[str, Any]:
    if config.get("tie_word_embeddings"):
        raise _refuse(config, "tie_word_embeddings", "MistralBackbone always has a separate output head")
    return {
        **_common(config),
        **_plain_rope(config),
        "head_dim": config.get("head_dim"),
        "sliding_window": config.get("sliding_window"),
    }


def _qwen2(config: Config) -> dict[str, Any]:
    _no_sliding(config)
    _derived_head_dim(config)
    return {**_common(config), **_plain_rope(config), "tie_word_embeddings": config.get("tie_word_embeddings", False)}


def _qwen3(config: Config) -> dict[str, Any]:
    _no_sliding(config)
    return {
        **_common(config),
        **_plain_rope(config),
        "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "sliding_window_size": None,
    }


def _gemma_common(config: Config) -> dict[str, Any]:
    if not config.get("tie_word_embeddings", True):
        raise _refuse(config, "tie_word_embeddings", "keras-hub's Gemma backbones always tie the output head")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    args = {**_common(config), "head_dim": head_dim}
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None:
        if scalar not in (head_dim, config["hidden_size"] // config["num_attention_heads"]):
            raise _refuse(
                config, "query_pre_attn_scalar", "keras-hub scales queries by head_dim or hidden_size / num_heads only"
            )
        args["query_head_dim_normalize"] = scalar == head_dim
    return args


def _check_layer_types(config: Config, sliding: Callable[[int], bool]) -> None:
    expected = ["sliding_attention" if sliding(i) else "full_attention" for i in range(config["num_hidden_layers"])]
    if config.get("layer_types") and list(config["layer_types"]) != expected:
        raise _refuse(config, "layer_types", f"keras-hub fixes the pattern {expected}")


def _gemma(config: Config) -> dict[str, Any]:
    _plain_rope_theta_only(config)
    # transformers' Gemma (1) scales queries by head_dim, whatever query_pre_attn_scalar says.
    args = _gemma_common({k: v for k, v in config.items() if k != "query_pre_attn_scalar"})
    return {**args, "intermediate_dim": 2 * config["intermediate_size"]}


def _gemma2(config: Config) -> dict[str, Any]:
    _plain_rope_theta_only(config)
    _check_layer_types(config, lambda i: i % 2 == 0)
    return {
        **_gemma_common(config),
        "intermediate_dim": 2 * config["intermediate_size"],
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": config.get("attn_logit_softcapping"),
        "final_logit_soft_cap": config.get("final_logit_softcapping"),
        "use_sliding_window_attention": config.get("sliding_window") is not None,
        "sliding_window_size": config.get("sliding_window") or 4096,
    }


def _gemma3(config: Config) -> dict[str, Any]:
    _check_layer_types(config, lambda i: i % 6 < 5)
    scaling = {}
    for kind, arg in (
        ("sliding_attention", "local_rope_scaling_factor"),
        ("full_attention", "global_rope_scaling_factor"),
    ):
        params = rope(config, kind)
        if params["rope_type"] not in ("default", "linear"):
            raise _refuse(config, "rope_parameters", f"{kind} rope_type {params['rope_type']!r} (default, linear)")
        scaling[arg] = params.get("factor", 1.0) if params["rope_type"] == "linear" else 1.0
    return {
        **_gemma_common(config),
        **scaling,
        "image_size": None,
        "use_query_key_norm": True,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "attention_logit_soft_cap": config.get("attn_logit_softcapping"),
        "final_logit_soft_cap": config.get("final_logit_softcapping"),
        "use_sliding_window_attention": config.get("sliding_window") is not None,
        "sliding_window_size": config.get("sliding_window") or 4096,
    }


def _plain_rope_theta_only(config: Config) -> None:
    if rope(config)["rope_type"] != "default":
        raise _refuse(config, "rope_parameters", "Gemma and Gemma 2 take plain rope only")


_BACKBONE_ARGS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
}


def backbone_args(config: Config) -> tuple[str, str, dict[str, Any]]:
    """``(backbone class, causal LM class, backbone kwargs)`` for a Hugging Face config."""
    model_type = config.get("model_type")
    if model_type not in _BACKBONE_ARGS:
        raise UnsupportedConfig(
            f"Hugging Face model_type {model_type!r} is not supported; kithara loads {sorted(CLASSES)}."
        )
    backbone, causal_lm, _ = CLASSES[model_type]
    return backbone, causal_lm, _BACKBONE_ARGS[model_type](config)


def apply_to_layers(backbone: keras.Model, config: Config) -> None:
    """Settings keras-hub hard-codes inside layers, applied to the built layers: RMSNorm
    epsilons (Qwen3's q/k norms fix 1e-5, Gemma's final and q/k norms 1e-6), Gemma's rope
    theta (fixed at 1e4; 1e4/1e6 in Gemma 3) and Gemma 2/3's query scale (see
    ``building.match_layers_to_backbone``)."""
    match_layers_to_backbone(backbone)
    model_type = config["model_type"]
    for layer in backbone._flatten_layers(include_self=False):
        kind = type(layer).__name__
        if kind in ("Qwen3LayerNorm", "RMSNormalization"):
            layer.epsilon = config["rms_norm_eps"]
        elif model_type in ("gemma", "gemma2") and kind == "CachedGemmaAttention":
            layer.rope_layer.max_wavelength = rope(config)["rope_theta"]
        elif model_type == "gemma3_text" and kind == "CachedGemma3Attention":
            sliding = bool(layer.use_sliding_window_attention)
            params = rope(config, "sliding_attention" if sliding else "full_attention")
            layer.rope_wavelength = layer.rope_layer.max_wavelength = params.get("rope_theta") or (
                1e4 if sliding else 1e6
            )


def hf_config_from_backbone(backbone: keras.Model) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for a backbone built from numbers (``from_config``);
    models loaded from a checkpoint export that checkpoint's own config instead."""
    kind = type(backbone).__name__
    b = backbone
    config: dict[str, Any] = {
        "vocab_size": b.vocabulary_size,
        "hidden_size": b.hidden_dim,
        "num_hidden_layers": b.num_layers,
        "num_attention_heads": b.num_query_heads,
        "num_key_value_heads": b.num_key_value_heads,
        "intermediate_size": b.intermediate_dim,
        "rms_norm_eps": b.layer_norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": bool(getattr(b, "tie_word_embeddings", False)),
    }
    if kind == "Llama3Backbone":
        if b.rope_position_scaling_factor != 1.0:
            raise UnsupportedConfig("Llama3Backbone with rope_position_scaling_factor != 1 has no transformers twin.")
        rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": b.rope_max_wavelength}
        if b.rope_frequency_adjustment_factor is not None:
            rope_params = {
                "rope_type": "llama3",
                "rope_theta": b.rope_max_wavelength,
                "factor": b.rope_frequency_adjustment_factor,
                "low_freq_factor": b.rope_low_freq_factor,
                "high_freq_factor": b.rope_high_freq_factor,
                "original_max_position_embeddings": b.rope_pretraining_sequence_length,
            }
        config.update(model_type="llama", rope_parameters=rope_params)
    elif kind in ("MistralBackbone", "QwenBackbone", "Qwen3Backbone"):
        factor = getattr(b, "rope_scaling_factor", 1.0)
        rope_params = {"rope_type": "default" if factor == 1.0 else "linear", "rope_theta": b.rope_max_wavelength}
        if factor != 1.0:
            rope_params["factor"] = factor
        model_type = {"MistralBackbone": "mistral", "QwenBackbone": "qwen2", "Qwen3Backbone": "qwen3"}[kind]
        config.update(model_type=model_type, rope_parameters=rope_params)
        if kind == "MistralBackbone":
            config.update(head_dim=b.head_dim or b.hidden_dim // b.num_query_heads, sliding_window=b.sliding_window)
        if kind == "Qwen3Backbone":
            config.update(head_dim=b.head_dim)
        if kind == "QwenBackbone" and b.use_sliding_window_attention:
            raise UnsupportedConfig("QwenBackbone with sliding window attention has no transformers twin.")
    elif kind in ("GemmaBackbone", "Gemma3Backbone"):
        config.update(_gemma_config(b, kind))
    else:
        raise UnsupportedConfig(f"No Hugging Face export for {kind}; kithara exports {sorted(CLASSES)}.")
    config["architectures"] = [CLASSES[config["model_type"]][2]]
    return config


def _gemma_config(b: keras.Model, kind: str) -> dict[str, Any]:
    head_dim = b.head_dim
    # The scale the attention layers compute with, which is not always the backbone's
    # setting (see ``building.match_layers_to_backbone``).
    by_head_dim = query_head_dim_normalize(b)
    config: dict[str, Any] = {
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": head_dim if by_head_dim else b.hidden_dim // b.num_query_heads,
    }
    if kind == "Gemma3Backbone":
        if b.vision_encoder is not None:
            raise UnsupportedConfig("Gemma3Backbone with a vision encoder: kithara exports the text model only.")
        return {
            **config,
            **_windowed(b, "gemma3_text", lambda i: i % 6 < 5),
            "rope_parameters": {
                "full_attention": _scaled_rope(1e6, b.global_rope_scaling_factor),
                "sliding_attention": _scaled_rope(1e4, b.local_rope_scaling_factor),
            },
        }
    config.update(
        intermediate_size=b.intermediate_dim // 2, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    if not b.use_post_ffw_norm:
        if config["query_pre_attn_scalar"] != head_dim:
            raise UnsupportedConfig(
                "GemmaBackbone without post-norms (Gemma 1) and query_head_dim_normalize=False: transformers' "
                "Gemma always scales queries by head_dim. Build it with query_head_dim_normalize=True or with "
                "head_dim = hidden_dim / num_heads."
            )
        return {**config, "model_type": "gemma"}
    return {**config, **_windowed(b, "gemma2", lambda i: i % 2 == 0)}


def _windowed(b: keras.Model, model_type: str, is_sliding: Callable[[int], bool]) -> dict[str, Any]:
    """Gemma 2/3 settings: keras-hub's fixed sliding/full layer pattern, window and soft caps."""
    sliding = [bool(b.use_sliding_window_attention) and is_sliding(i) for i in range(b.num_layers)]
    return {
        "model_type": model_type,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": b.sliding_window_size,
        "attn_logit_softcapping": b.attention_logit_soft_cap,
        "final_logit_softcapping": b.final_logit_soft_cap,
    }


def _scaled_rope(theta: float, factor: float) -> dict[str, Any]:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "rope_theta": theta, "factor": factor}


# The MLP activation each family's keras-hub layers compute.
_ACTIVATIONS = {"gemma": ("gelu_pytorch_tanh", "gelu"), "gemma2": ("gelu_pytorch_tanh",),
                "gemma3_text": ("gelu_pytorch_tanh",), "gemma3": ("gelu_pytorch_tanh",)}  # fmt: skip


def check_activation(config: Config) -> None:
    """Refuses a config whose MLP activation the family's keras-hub layers do not compute."""
    kind = config.get("model_type", "")
    allowed = _ACTIVATIONS.get(kind, ("silu",))
    field = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
    act = config.get(field)
    if act is not None and act not in allowed:
        raise _refuse(config, field, f"{act!r}; keras-hub's {kind} layers compute {allowed[0]!r}")
