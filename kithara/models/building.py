"""Building keras-hub models from a config: on the host, with their constructor arguments
checked, and their FLOPs per token (shared by ``KerasHubModel``, ``ScalarHeadModel`` and
``KerasHubSeq2SeqModel``)."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import jax
import keras
import keras_hub

from kithara.models.families import Architecture, get_family
from kithara.models.precision import keras_policy
from kithara.naming import check_names

# Loading options of transformers' from_pretrained that kithara has no counterpart for.
UNSUPPORTED_LOAD_OPTIONS = {
    "load_in_4bit": "pass quantization='nf4' (KerasHubModel.from_config/from_preset take it).",
    "load_in_8bit": "pass quantization='int8' (KerasHubModel.from_config/from_preset take it).",
    "quantization_config": "pass quantization= ('nf4', 'int8', a QuantizationConfig or a BitsAndBytesConfig).",
    "device_map": "kithara places the weights on its device mesh; pick sharding= instead.",
}


def host_device() -> contextlib.AbstractContextManager[Any]:
    """Builds variables in host memory when an accelerator is the default device, so a
    model larger than one accelerator can still be built and then sharded."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    return jax.default_device(jax.devices("cpu")[0])


def transformer_flops(
    backbone: Any,
    by_path: Mapping[str, Any],
    sequence_length: int,
    *,
    training: bool,
    lora: bool,
    extra_head_params: int = 0,
    trained_head_params: int = 0,
) -> float:
    """Model FLOPs per token of a keras-hub transformer whose variables are ``by_path``.

    PaLM-style: 2 FLOPs per weight per token (every ``.../kernel`` and LoRA factor, plus
    ``extra_head_params`` for an output head stored elsewhere, e.g. the LM head's embedding),
    attention scores and values over the full (not causal-halved) sequence; training is 3x
    the forward pass, except under LoRA where frozen weights only back-propagate activations
    and weight gradients go to the adapters and the ``trained_head_params`` of a head."""
    b = backbone
    head_dim = getattr(b, "head_dim", None) or b.hidden_dim // b.num_query_heads
    base = extra_head_params
    adapters = 0
    for path, variable in by_path.items():
        size = math.prod(variable.shape)
        if path.rsplit("/", 1)[-1].startswith("lora_kernel"):
            adapters += size
        elif path.endswith("/kernel"):
            base += size
    attention = 4 * b.num_layers * sequence_length * b.num_query_heads * head_dim
    forward = 2 * (base + adapters) + attention
    if not training:
        return float(forward)
    if not lora:
        return float(3 * forward)
    frozen = base - trained_head_params
    return float(forward + 2 * frozen + 2 * attention + 4 * (adapters + trained_head_params))


def backbone_from_config(
    family: str, arch: Architecture, *, precision: str, seed: int, builder: Any, where: str, **backbone_kwargs: Any
) -> keras_hub.models.Backbone:
    """A randomly initialised keras-hub backbone of ``family`` (on the host) for a
    ``from_config`` (``builder``, named ``where`` in errors): the family's defaults, ``arch``,
    then ``backbone_kwargs`` (checked by ``check_model_kwargs``); keras' random generator
    seeded with ``seed``, so every process builds identical weights."""
    spec = get_family(family)
    backbone_class = getattr(keras_hub.models, spec.backbone_class)
    check_model_kwargs(backbone_kwargs, builder, backbone_class, f"{where}.from_config({family!r})")
    kwargs = {**spec.defaults, **spec.backbone_args(arch), **backbone_kwargs}
    keras.utils.set_random_seed(seed)
    with host_device():
        backbone = backbone_class(dtype=keras_policy(precision), **kwargs)
    match_layers_to_backbone(backbone)
    return backbone


# keras-hub's attention layers that read ``query_head_dim_normalize`` (Gemma, Gemma 2, Gemma 3),
# and its norm layers whose epsilon is not always the backbone's ``layer_norm_epsilon``.
_SCALED_ATTENTION = ("CachedGemmaAttention", "CachedGemma3Attention")
_NORMS = ("Qwen3LayerNorm", "RMSNormalization")


def match_layers_to_backbone(backbone: keras.Model) -> None:
    """Gives ``backbone``'s layers the settings it was built with, which keras-hub (0.32)
    drops on the way down, so the model computes what its config (and a Hugging Face
    export of it) says:

    - Gemma and Gemma 3 decoder blocks build their attention with
      ``query_head_dim_normalize=True`` whatever the backbone was given, so a backbone built
      with ``False`` (Gemma 2/3 27B: queries scaled by ``1/sqrt(hidden_dim / num_heads)``)
      computed ``1/sqrt(head_dim)``;
    - Qwen 3's query/key norms fix epsilon at 1e-5 (Gemma's final and query/key norms at
      1e-6) instead of ``layer_norm_epsilon``.

    The layers read these when called, so setting them on the built layers is enough.
    """
    normalize = getattr(backbone, "query_head_dim_normalize", None)
    epsilon = getattr(backbone, "layer_norm_epsilon", None)
    vision = getattr(backbone, "vision_encoder", None)
    skip = {id(layer) for layer in vision._flatten_layers()} if vision is not None else set()
    for layer in backbone._flatten_layers(include_self=False):
        kind = type(layer).__name__
        if id(layer) in skip:
            continue
        if kind in _SCALED_ATTENTION and normalize is not None:
            layer.query_head_dim_normalize = bool(normalize)
        elif kind in _NORMS and epsilon is not None:
            layer.epsilon = epsilon


# Layer attributes kithara sets on built layers (``match_layers_to_backbone`` and, for Hugging
# Face checkpoints, ``hf.config.apply_to_layers``) that a backbone's ``get_config`` does not carry.
_LAYER_SETTINGS = ("epsilon", "query_head_dim_normalize", "rope_wavelength", "max_wavelength")


def copy_layer_settings(source: keras.Model, target: keras.Model) -> None:
    """Gives ``target``, a backbone rebuilt from ``source.get_config()``, the settings set on
    ``source``'s built layers (norm epsilons, Gemma query scale and rope theta), which the
    rebuild would otherwise reset to keras-hub's hard-coded values."""
    source_layers = list(source._flatten_layers(include_self=False))
    target_layers = list(target._flatten_layers(include_self=False))
    if [type(layer) for layer in source_layers] != [type(layer) for layer in target_layers]:
        raise ValueError(
            f"copy_layer_settings: the {type(target).__name__} was not rebuilt from the {type(source).__name__}'s "
            "config (their layers differ); rebuild it with type(source).from_config(source.get_config())."
        )
    for theirs, ours in zip(source_layers, target_layers, strict=True):
        for attr in _LAYER_SETTINGS:
            if hasattr(theirs, attr):
                setattr(ours, attr, getattr(theirs, attr))


def query_head_dim_normalize(backbone: keras.Model) -> bool:
    """Whether ``backbone``'s attention layers scale queries by ``1/sqrt(head_dim)`` (else by
    ``1/sqrt(hidden_dim // num_heads)``): what they compute, which may differ from the
    backbone's own setting if ``match_layers_to_backbone`` was not applied."""
    flags = {
        bool(layer.query_head_dim_normalize)
        for layer in backbone._flatten_layers(include_self=False)
        if type(layer).__name__ in _SCALED_ATTENTION
    }
    if len(flags) > 1:
        raise ValueError(
            f"{type(backbone).__name__}'s attention layers scale queries differently (query_head_dim_normalize "
            "varies by layer), which no Hugging Face config can express; set it the same on every layer."
        )
    return flags.pop() if flags else bool(getattr(backbone, "query_head_dim_normalize", True))


def check_model_kwargs(backbone_kwargs: Mapping[str, Any], builder: Any, backbone_class: type, where: str) -> None:
    """Refuses ``backbone_kwargs`` that ``backbone_class``'s constructor does not name (keras-hub
    backbones take ``**kwargs`` and drop unknown ones) with the closest of those names and the
    ``builder``'s own arguments. ``dtype`` is refused: ``precision=`` sets it."""
    known = keyword_only(builder) | {
        name
        for name, p in inspect.signature(backbone_class).parameters.items()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name != "dtype"
    }
    check_names(backbone_kwargs, known, where, unsupported=UNSUPPORTED_LOAD_OPTIONS)


def keyword_only(function: Any) -> set[str]:
    return {n for n, p in inspect.signature(function).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
