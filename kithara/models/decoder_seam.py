"""The one seam around every keras-hub decoder block: where activation sharding, remat and layer scan act.

keras-hub backbones are functional models that call each decoder block in turn. ``install()``
wraps, once, the ``call`` of the covered decoder-block classes. The wrapper is a no-op unless a
``decoder_run`` context is active (``KerasHubModel`` opens one around its traced forward pass) and
no KV cache is in use; then the block runs through ``DecoderRun.run``, which applies, in order:

- ``layer_scan`` (``ScaleConfig.scan_layers``): the first block of a scannable run of identical
  blocks runs all of them as one ``jax.lax.scan``; the others then pass their input through;
- ``remat`` (``ScaleConfig.remat``): the block under ``jax.checkpoint`` with the named policy;
- ``activation_sharding`` (``ScaleConfig.activation_sharding``): the block's input and output
  held to the batch sharding of the mesh.

Cached decoding (``generate``) never goes through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from jax.sharding import Mesh
from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
from keras_hub.src.models.gemma3.gemma3_decoder_block import Gemma3DecoderBlock
from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
from keras_hub.src.models.mistral.mistral_transformer_decoder import MistralTransformerDecoder
from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder
from keras_hub.src.models.qwen3.qwen3_decoder import Qwen3TransformerDecoder

from kithara.models.scale_config import ScaleConfig

# (decoder block class, name of its call's KV-cache argument).
DECODER_BLOCKS: tuple[tuple[type, str], ...] = (
    (LlamaTransformerDecoder, "self_attention_cache"),
    (MistralTransformerDecoder, "self_attention_cache"),
    (QwenTransformerDecoder, "self_attention_cache"),
    (Qwen3TransformerDecoder, "self_attention_cache"),
    (GemmaDecoderBlock, "cache"),
    (Gemma3DecoderBlock, "cache"),
)

_ORIGINALS: dict[type, Callable[..., Any]] = {}


def covers(backbone: Any) -> bool:
    """Whether ``backbone``'s decoder blocks (``transformer_layers``) are all of the covered classes."""
    layers = list(getattr(backbone, "transformer_layers", []))
    blocks = tuple(cls for cls, _ in DECODER_BLOCKS)
    return bool(layers) and all(isinstance(layer, blocks) for layer in layers)


_LOCK = threading.Lock()


@dataclasses.dataclass
class Block:
    """One decoder-block call being traced: the layer, its unwrapped ``call`` and the other arguments
    (padding mask, ...) it was given. ``run(hidden, layer)`` calls the block (or another block of the
    same class, given as ``layer``, with the same arguments) on ``hidden``."""

    layer: Any
    original: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, hidden: jax.Array, layer: Any = None) -> Any:
        return self.original(self.layer if layer is None else layer, hidden, *self.args, **self.kwargs)


@dataclasses.dataclass
class DecoderRun:
    """The options of one traced forward pass and what the scan has done in it so far.

    Args:
        options: the model's ``ScaleConfig``.
        mesh: the mesh the model lives on (activation shardings are on it).
        layers: the backbone's decoder blocks in order (``layer_scan`` needs them all).
        inputs: the model inputs of this pass (``token_ids``, ``padding_mask`` and, packed,
            ``segment_ids`` / ``positions``), for kernels that need them (attention).
    """

    options: ScaleConfig
    mesh: Mesh
    layers: list[Any]
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Set by layer_scan: id(layer) of blocks already computed inside a scan in this pass.
    done: set[int] = dataclasses.field(default_factory=set)

    def run(self, block: Block, hidden: jax.Array) -> Any:
        """The block's output on ``hidden`` with this pass's options."""
        from kithara.models import layer_scan

        if self.options.scan_layers:
            return layer_scan.run(self, block, hidden)
        return self.run_one(lambda h: block.run(h), hidden)

    def run_one(self, fn: Callable[[jax.Array], Any], hidden: jax.Array) -> Any:
        """``fn(hidden)`` (one block, or a group of them) with remat and activation sharding."""
        from kithara.models import activation_sharding, remat

        if self.options.activation_sharding:
            inner = fn

            def fn(h: jax.Array) -> Any:
                constrain = activation_sharding.constrain_hidden
                return constrain(inner(constrain(h, self.mesh)), self.mesh)

        return remat.checkpointed(fn, self.options.remat)(hidden)


_CURRENT: contextvars.ContextVar[DecoderRun | None] = contextvars.ContextVar("kithara_decoder_run", default=None)


def current() -> DecoderRun | None:
    """The active ``DecoderRun`` (``None`` outside a ``decoder_run`` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def decoder_run(options: ScaleConfig, mesh: Mesh, layers: list[Any], inputs: Mapping[str, Any]) -> Iterator[DecoderRun]:
    """Makes the covered decoder blocks run with ``options`` while the block is traced."""
    install()
    token = _CURRENT.set(DecoderRun(options, mesh, list(layers), dict(inputs)))
    try:
        yield _CURRENT.get()  # type: ignore[misc]
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No ``DecoderRun`` inside the block (a scan body calling blocks directly, say)."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def install() -> None:
    """Wraps the decoder blocks' ``call``; idempotent and thread-safe."""
    with _LOCK:
        if _ORIGINALS:
            return
        for cls, cache_arg in DECODER_BLOCKS:
            _ORIGINALS[cls] = cls.__dict__["call"]
            setattr(cls, "call", _wrap_call(cls.__dict__["call"], cache_arg))  # noqa: B010


def _wrap_call(original: Callable[..., Any], cache_arg: str) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(self: Any, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        run = _CURRENT.get()
        if run is None or signature.bind(self, hidden, *args, **kwargs).arguments.get(cache_arg) is not None:
            return original(self, hidden, *args, **kwargs)
        return run.run(Block(self, original, args, kwargs), hidden)

    return call
