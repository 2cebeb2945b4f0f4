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
    "load_in_4bit": "4-bit/8-bit quantized loading is not supported yet.",
    "load_in_8bit": "4-bit/8-bit quantized loading is not supported yet.",
    "quantization_config": "4-bit/8-bit quantized loading is not supported yet.",
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
        return backbone_class(dtype=keras_policy(precision), **kwargs)


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
