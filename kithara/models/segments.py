"""Packed-sequence support for keras-hub decoders: segment-aware attention masks and RoPE positions.

keras-hub backbones take no segment ids, so ``install()`` wraps, once, the attention-mask methods of
the covered decoder layers and ``RotaryEmbedding.call``. The wrappers are no-ops unless
``packed_inputs`` is active; then each mask is also restricted to keys of the query's own segment and
RoPE uses the given per-token positions. The context is read while ``jax.jit`` traces the forward
pass, so it only has to be active around the traced call. Cached decoding (``generate``) is never
changed: the wrappers step aside whenever a KV cache or a non-zero ``start_index`` is in use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import keras_hub
from keras import ops
from keras_hub.src.layers.modeling.rotary_embedding import RotaryEmbedding
from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
from keras_hub.src.models.gemma3.gemma3_decoder_block import Gemma3DecoderBlock
from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
from keras_hub.src.models.mistral.mistral_transformer_decoder import MistralTransformerDecoder
from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder
from keras_hub.src.models.qwen3.qwen3_decoder import Qwen3TransformerDecoder

# Backbones whose every attention layer builds its mask with a method patched below and applies
# RoPE through ``RotaryEmbedding.call``. Matched by exact type: a subclass may wire other layers.
SEGMENT_AWARE_BACKBONES: tuple[type, ...] = (
    keras_hub.models.LlamaBackbone,
    keras_hub.models.Llama3Backbone,
    keras_hub.models.MistralBackbone,
    keras_hub.models.QwenBackbone,
    keras_hub.models.Qwen3Backbone,
    keras_hub.models.GemmaBackbone,  # gemma and gemma2
    keras_hub.models.Gemma3Backbone,
)

# (decoder layer class, mask method, name of that method's KV-cache argument).
_MASK_METHODS: tuple[tuple[type, str, str], ...] = (
    (LlamaTransformerDecoder, "_compute_self_attention_mask", "self_attention_cache"),
    (MistralTransformerDecoder, "_compute_self_attention_mask", "self_attention_cache"),
    (QwenTransformerDecoder, "_compute_self_attention_mask", "self_attention_cache"),
    (Qwen3TransformerDecoder, "_compute_self_attention_mask", "self_attention_cache"),
    (GemmaDecoderBlock, "_compute_attention_mask", "cache"),
    (Gemma3DecoderBlock, "_compute_attention_mask", "cache"),
)


class PackedInputs(NamedTuple):
    """The arrays of the packed batch being traced, both ``[batch, length]`` ints."""

    segment_ids: Any
    positions: Any


_CURRENT: contextvars.ContextVar[PackedInputs | None] = contextvars.ContextVar("kithara_packed_inputs", default=None)
# The unwrapped methods, keyed by (class, method name); filled by the first ``install()``.
_ORIGINALS: dict[tuple[type, str], Callable[..., Any]] = {}
_LOCK = threading.Lock()


@contextlib.contextmanager
def packed_inputs(segment_ids: Any, positions: Any) -> Iterator[None]:
    """Makes the covered keras-hub layers treat the batch as packed while the block runs.

    Args:
        segment_ids: ``[batch, length]`` ints, ``1, 2, ...`` per example in a row, ``0`` for padding.
            Tokens attend only to earlier tokens with the same id.
        positions: ``[batch, length]`` ints, each example's token positions starting at 0; used for RoPE.
    """
    if tuple(segment_ids.shape) != tuple(positions.shape) or len(segment_ids.shape) != 2:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and positions {tuple(positions.shape)} "
            "must both be [batch, length]."
        )
    token = _CURRENT.set(PackedInputs(segment_ids, positions))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def install() -> None:
    """Wraps the keras-hub mask methods and ``RotaryEmbedding.call``; idempotent and thread-safe."""
    with _LOCK:
        if _ORIGINALS:
            return
        for cls, name, cache_arg in _MASK_METHODS:
            _ORIGINALS[(cls, name)] = cls.__dict__[name]
            setattr(cls, name, _wrap_mask(cls.__dict__[name], cache_arg))
        _ORIGINALS[(RotaryEmbedding, "call")] = RotaryEmbedding.__dict__["call"]
        RotaryEmbedding.call = _wrap_rope(RotaryEmbedding.__dict__["call"])


def _check_length(what: str, length: int, packed: PackedInputs) -> None:
    """Raises if a traced tensor's sequence length is not the packed batch's."""
    if length != packed.segment_ids.shape[1]:
        raise ValueError(
            f"Packed inputs have length {packed.segment_ids.shape[1]} but {what} has sequence length {length}."
        )


def _wrap_mask(original: Callable[..., Any], cache_arg: str) -> Callable[..., Any]:
    """A mask method that also keeps each query's keys inside its own segment."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        mask = original(self, *args, **kwargs)
        packed = _CURRENT.get()
        if packed is None or signature.bind(self, *args, **kwargs).arguments.get(cache_arg) is not None:
            return mask
        for length in mask.shape[-2:]:
            _check_length("the attention mask", length, packed)
        segments = packed.segment_ids
        same_segment = ops.equal(ops.expand_dims(segments, 2), ops.expand_dims(segments, 1))  # [B, Lq, Lk]
        # Same dtype as the original (int32 with a padding mask, bool without) so callers see no change.
        return ops.minimum(mask, ops.cast(same_segment, mask.dtype))

    return wrapper


def _wrap_rope(original: Callable[..., Any]) -> Callable[..., Any]:
    """A ``RotaryEmbedding.call`` that rotates by the packed positions when no cache offset is given."""

    @functools.wraps(original)
    def call(self: Any, inputs: Any, start_index: Any = 0, positions: Any = None) -> Any:
        packed = _CURRENT.get()
        # A non-zero or traced start_index means cached decoding, whose positions are already right.
        if packed is not None and positions is None and isinstance(start_index, int) and start_index == 0:
            _check_length("a RoPE input", inputs.shape[self.sequence_axis], packed)
            positions = packed.positions
        return original(self, inputs, start_index=start_index, positions=positions)

    return call
