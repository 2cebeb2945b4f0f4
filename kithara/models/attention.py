"""Attention kernels for keras-hub decoders (``ScaleConfig.attention``, docs/scale.md).

keras-hub's attention layers compute attention in ``_compute_attention`` through keras'
``dot_product_attention`` (which never reaches Splash inside ``jax.jit``: the mask is a tracer)
or an explicit einsum and softmax that hold float32 ``[batch, heads, length, length]`` scores.
``install()`` wraps, once, the ``_compute_attention`` of the covered layers. The wrapper steps
aside (keras' own path) unless a ``decoder_seam.decoder_run`` is active with an ``attention``
other than ``"keras"`` and the call is a full-sequence one (no KV cache); then attention runs
through one of:

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (any backend);
- ``"cudnn"``: the same with ``implementation="cudnn"`` (cuDNN flash attention, NVIDIA GPUs);
- ``"splash"``: the Pallas TPU splash-attention kernel (causal or local mask, logit
  soft-capping, segment ids for packing and padding, grouped heads);
- ``"chunked"``: pure JAX, ``attention_chunk_size`` query positions at a time, each chunk
  rematerialised, so ``[heads, length, length]`` scores never exist at once (any backend);
- ``"auto"``: splash on TPU, cuDNN on NVIDIA GPUs where the layer's features allow it, else
  chunked.

The mask is rebuilt from the pass's inputs exactly as keras-hub builds it: causal by index, keys
outside ``padding_mask`` hidden, keys of other packed segments hidden, and the layer's sliding
window (``query - key < window``). Outputs equal keras' at every non-padding position (rows of
padding tokens, which nothing reads, may differ). A feature an explicitly chosen implementation
cannot express (soft-capping under ``"xla"``/``"cudnn"``, attention dropout, Gemma 3's
bidirectional attention) falls back to keras' path with a logged warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention
from keras_hub.src.models.gemma3.gemma3_attention import CachedGemma3Attention
from keras_hub.src.models.llama.llama_attention import LlamaAttention
from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention
from keras_hub.src.models.qwen.qwen_attention import QwenAttention
from keras_hub.src.models.qwen3.qwen3_attention import Qwen3Attention

from kithara.models import decoder_seam
from kithara.sharding import BATCH_AXES, batch_shards

logger = logging.getLogger(__name__)

# jax.nn.dot_product_attention's fill for hidden logits (so fully hidden rows match keras' fused path).
_HIDDEN = -0.7 * float(np.finfo(np.float32).max)
_SPLASH_LANES = 128  # splash-attention blocks are multiples of this
_SPLASH_MAX_BLOCK = 512  # larger query/key blocks outgrow TPU VMEM (MaxText's default is 512)


@dataclasses.dataclass(frozen=True)
class Features:
    """What one attention layer computes, beyond softmax(q.k) v.

    Args:
        scale: the logits' scale.
        scale_query: multiply the query by ``scale`` before q.k (Gemma) rather than the logits.
        soft_cap: ``tanh(logits / cap) * cap`` after scaling (Gemma 2), or ``None``.
        window: keys with ``query - key < window`` only (sliding-window layers), or ``None``.
        kv_repeats: how many times keras-hub repeated each key/value head before the call
            (Llama-style layers repeat them to the query heads; Gemma passes them grouped).
        blocker: a feature no kithara implementation expresses, or ``None``.
    """

    scale: float
    scale_query: bool = False
    soft_cap: float | None = None
    window: int | None = None
    kv_repeats: int = 1
    blocker: str | None = None


def _llama_features(layer: Any) -> Features:
    return Features(scale=layer._inv_norm_factor, kv_repeats=layer.num_key_value_groups)


def _mistral_features(layer: Any) -> Features:
    window = layer._sliding_window  # the decoder block's mask applies the same window
    return Features(scale=layer._inv_norm_factor, window=window, kv_repeats=layer._num_key_value_groups)


# Qwen 2/3: keras-hub applies ``sliding_window_size`` only off the fused path, which the JAX
# backend never takes; the keras path attends to the whole causal prefix, and so do these.
_qwen_features = _llama_features


def _gemma_features(layer: Any) -> Features:
    head_dim = layer.head_dim if layer.query_head_dim_normalize else layer.hidden_dim // layer.num_query_heads
    blocker = None
    if layer.dropout > 0:
        blocker = "attention dropout"
    elif getattr(layer, "use_bidirectional_attention", False):
        blocker = "bidirectional attention"
    return Features(
        scale=1.0 / math.sqrt(head_dim),
        scale_query=True,
        soft_cap=layer.logit_soft_cap,
        window=layer.sliding_window_size if layer.use_sliding_window_attention else None,
        blocker=blocker,
    )


# The covered attention layers and how to read their features. Matched by exact class.
FEATURES: dict[type, Callable[[Any], Features]] = {
    LlamaAttention: _llama_features,
    CachedMistralAttention: _mistral_features,
    QwenAttention: _qwen_features,
    Qwen3Attention: _qwen_features,
    CachedGemmaAttention: _gemma_features,
    CachedGemma3Attention: _gemma_features,
}


@dataclasses.dataclass(frozen=True)
class Call:
    """One full-sequence attention call: ``q_BxTxNxH``, grouped ``k``/``v`` ``[B, S, K, H]``, the
    mask's inputs (``padding_BxS`` bool, packed ``segments_BxS`` or ``None``) and the options."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    features: Features
    padding_BxS: jax.Array
    segments_BxS: jax.Array | None
    mesh: Mesh
    chunk_size: int


def _allowed(call: Call, q_idx: jax.Array, k_idx: jax.Array, seg_q: Any, seg_k: Any, pad_k: jax.Array) -> jax.Array:
    """``[B, Tq, Sk]`` bool: which keys each query sees (causal, padding, segment, window)."""
    rel = q_idx[:, None] - k_idx[None, :]
    allowed = (rel >= 0)[None] & pad_k[:, None, :]
    if call.features.window is not None:
        allowed &= (rel < call.features.window)[None]
    if seg_q is not None:
        allowed &= seg_q[:, :, None] == seg_k[:, None, :]
    return allowed


def _dense_mask(call: Call) -> jax.Array:
    """The whole ``[B, 1, T, S]`` mask (for ``jax.nn.dot_product_attention``)."""
    t, s = call.q.shape[1], call.k.shape[1]
    seg = call.segments_BxS
    return _allowed(call, jnp.arange(t), jnp.arange(s), seg, seg, call.padding_BxS)[:, None]


def _scaled_query(call: Call) -> tuple[jax.Array, float]:
    """The query and the scale left for the logits (Gemma scales the query first, in its dtype)."""
    if call.features.scale_query:
        return call.q * jnp.asarray(call.features.scale, call.q.dtype), 1.0
    return call.q, call.features.scale


def _xla(call: Call) -> jax.Array:
    q, scale = _scaled_query(call)
    return jax.nn.dot_product_attention(q, call.k, call.v, mask=_dense_mask(call), scale=scale, implementation="xla")


def _cudnn(call: Call) -> jax.Array:
    q, scale = _scaled_query(call)
    window = call.features.window
    seg = call.segments_BxS
    # Causality and the window go to cuDNN's own masks; padding and segments as a [B, 1, T, S] mask.
    b, t, s = call.q.shape[0], call.q.shape[1], call.k.shape[1]
    keep = jnp.broadcast_to(call.padding_BxS[:, None, None, :], (b, 1, t, s))
    if seg is not None:
        keep = keep & (seg[:, :, None] == seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q,
        call.k,
        call.v,
        mask=keep,
        scale=scale,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )


def _chunked(call: Call) -> jax.Array:
    """Softmax attention over ``chunk_size`` queries at a time, each chunk under ``jax.checkpoint``:
    the backward pass recomputes one chunk's ``[B, heads, chunk, S]`` scores at a time."""
    q, scale = _scaled_query(call)
    b, t, n, h = q.shape
    s, kv = call.k.shape[1], call.k.shape[2]
    size = min(call.chunk_size, t)
    chunks = -(-t // size)
    # With a window, a chunk's queries only reach keys in [start - window + 1, start + size).
    span = s if call.features.window is None else min(s, size + call.features.window - 1)
    q = jnp.pad(q, ((0, 0), (0, chunks * size - t), (0, 0), (0, 0)))
    q_chunks = q.reshape(b, chunks, size, kv, n // kv, h).swapaxes(0, 1)  # [chunks, B, C, K, G, H]
    seg = call.segments_BxS
    seg_chunks = None if seg is None else jnp.pad(seg, ((0, 0), (0, chunks * size - t))).reshape(b, chunks, size)
    starts = jnp.arange(chunks) * size

    def one(args: tuple[jax.Array, Any, jax.Array]) -> jax.Array:
        q_c, seg_c, start = args
        first = jnp.clip(start - span + size, 0, s - span)
        k, v, pad_k = (jax.lax.dynamic_slice_in_dim(x, first, span, axis=1) for x in (call.k, call.v, call.padding_BxS))
        seg_k = None if seg is None else jax.lax.dynamic_slice_in_dim(seg, first, span, axis=1)
        logits = jnp.einsum("bckgh,bskh->bkgcs", q_c, k, preferred_element_type=jnp.float32)
        if scale != 1.0:
            logits = logits * jnp.float32(scale)
        if call.features.soft_cap is not None:
            logits = jnp.tanh(logits / call.features.soft_cap) * call.features.soft_cap
        allowed = _allowed(call, start + jnp.arange(size), first + jnp.arange(span), seg_c, seg_k, pad_k)
        logits = jnp.where(allowed[:, None, None], logits, _HIDDEN)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgcs,bskh->bckgh", probs, v)

    xs = (q_chunks, None if seg_chunks is None else seg_chunks.swapaxes(0, 1), starts)
    out = jax.lax.map(jax.checkpoint(one, prevent_cse=False), xs)  # [chunks, B, C, K, G, H]
    return out.swapaxes(0, 1).reshape(b, chunks * size, n, h)[:, :t]


_SPLASH_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("kithara_splash_interpret", default=False)


@contextlib.contextmanager
def splash_interpret() -> Iterator[None]:
    """Runs ``"splash"`` in Pallas interpret mode (on any backend; slow: for tests)."""
    token = _SPLASH_INTERPRET.set(True)
    try:
        yield
    finally:
        _SPLASH_INTERPRET.reset(token)


def _splash_kernel(heads: int, length: int, block: int, window: int | None, soft_cap: float | None, interpret: bool):
    """The kernel for one row (built per trace: it holds arrays, which must not outlive it)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    head_mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), offset=0)
    blocks = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([head_mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=soft_cap,
        interpret=interpret,
    )


def _splash(call: Call) -> jax.Array:
    """The splash kernel per row, under ``shard_map`` over the batch (and ``tensor``: heads) axes.
    Padding and packing become segment ids: real tokens ``segment + 1`` (``1`` unpacked), padding
    ``0`` and the rows' own padding to a block multiple ``-1``."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    q = call.q * jnp.asarray(call.features.scale, call.q.dtype)  # the kernel does not scale
    b, t, n, _ = q.shape
    kv = call.k.shape[2]
    block = min(_round_up(min(call.chunk_size, _SPLASH_MAX_BLOCK), _SPLASH_LANES), _round_up(t, _SPLASH_LANES))
    length = _round_up(t, block)
    seg = jnp.ones((b, t), jnp.int32) if call.segments_BxS is None else call.segments_BxS.astype(jnp.int32) + 1
    seg = jnp.pad(jnp.where(call.padding_BxS, seg, 0), ((0, 0), (0, length - t)), constant_values=-1)
    pad = ((0, 0), (0, length - t), (0, 0), (0, 0))
    # [B, L, heads, H] -> [B, heads, L, H], the kernel's layout.
    q, k, v = (jnp.pad(x, pad).swapaxes(1, 2) for x in (q, call.k, call.v))
    interpret = _SPLASH_INTERPRET.get()
    window, soft_cap = call.features.window, call.features.soft_cap

    def rows(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
        kernel = _splash_kernel(q.shape[1], length, block, window, soft_cap, interpret)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(q, k, v, seg)

    mesh = call.mesh
    batch = BATCH_AXES if b % batch_shards(mesh) == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and n % tensor == 0 and kv % tensor == 0 else None
    if mesh.size > 1:
        qkv = PartitionSpec(batch, heads, None, None)
        rows = jax.shard_map(
            rows, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)), out_specs=qkv, check_vma=False
        )
    return rows(q, k, v, seg).swapaxes(1, 2)[:, :t]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


IMPLEMENTATIONS: dict[str, Callable[[Call], jax.Array]] = {
    "xla": _xla,
    "cudnn": _cudnn,
    "splash": _splash,
    "chunked": _chunked,
}


def _platform(mesh: Mesh) -> str:
    """``"tpu"``, ``"nvidia"`` (a CUDA GPU), or the devices' platform name."""
    device = mesh.devices.flat[0]
    if device.platform == "gpu":
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        return "gpu" if "rocm" in version else "nvidia"
    return str(device.platform)


def _unsupported(name: str, features: Features, call: Call) -> str | None:
    """Why ``name`` cannot compute this layer's attention (``None``: it can)."""
    if features.blocker is not None:
        return features.blocker
    if name in ("xla", "cudnn") and features.soft_cap is not None:
        return "logit soft-capping (jax.nn.dot_product_attention has none)"
    if name == "cudnn":
        if call.q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"{call.q.dtype} inputs (cuDNN flash attention takes bfloat16/float16)"
        if call.q.shape[-1] % 8 or call.q.shape[-1] > 128:
            return f"head_dim {call.q.shape[-1]} (cuDNN takes multiples of 8 up to 128)"
    return None


def _check_platform(name: str, platform: str) -> None:
    """Refuses an explicit kernel the model's devices cannot run."""
    if name == "cudnn" and platform != "nvidia":
        raise ValueError(
            f"ScaleConfig(attention='cudnn') needs NVIDIA GPUs (cuDNN flash attention); this model's devices "
            f"are {platform!r}. Use attention='auto' (picks by backend), 'xla' or 'chunked'."
        )
    if name == "splash" and platform != "tpu" and not _SPLASH_INTERPRET.get():
        raise ValueError(
            f"ScaleConfig(attention='splash') needs TPUs (a Pallas TPU kernel); this model's devices are "
            f"{platform!r}. Use attention='auto' (picks by backend), 'xla' or 'chunked'."
        )


_LOGGED: set[tuple[Any, ...]] = set()


def _log_once(level: int, key: tuple[Any, ...], message: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, message)


def choose(requested: str, layer_class: type, features: Features, call: Call) -> str | None:
    """The implementation that runs this call (``None``: keras' own path), logged once per choice."""
    platform = _platform(call.mesh)
    name = layer_class.__name__
    if requested == "auto":
        preferred = {"tpu": "splash", "nvidia": "cudnn"}.get(platform)
        skipped: list[str] = []
        for candidate in [c for c in (preferred, "chunked") if c is not None]:
            reason = _unsupported(candidate, features, call)
            if reason is None:
                why = f"{platform} backend" + "".join(f"; {s}" for s in skipped)
                _log_once(
                    logging.INFO, ("auto", layer_class, candidate), f"attention='auto': {name} -> {candidate} ({why})."
                )
                return candidate
            skipped.append(f"{candidate} cannot express {reason}")
        _log_once(
            logging.INFO, ("auto", layer_class, None), f"attention='auto': {name} -> keras ({'; '.join(skipped)})."
        )
        return None
    _check_platform(requested, platform)
    reason = _unsupported(requested, features, call)
    if reason is not None:
        _log_once(
            logging.WARNING,
            (requested, layer_class, reason),
            f"attention={requested!r} cannot express {reason} of {name}: that layer runs keras-hub's "
            "attention instead (same result, no kernel).",
        )
        return None
    return requested


_ORIGINALS: dict[type, Callable[..., Any]] = {}
_LOCK = threading.Lock()


def install() -> None:
    """Wraps the covered layers' ``_compute_attention``; idempotent and thread-safe."""
    with _LOCK:
        if _ORIGINALS:
            return
        for cls in FEATURES:
            _ORIGINALS[cls] = cls.__dict__["_compute_attention"]
            cls._compute_attention = _wrap(cls, cls.__dict__["_compute_attention"])  # type: ignore[attr-defined]


def _wrap(cls: type, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)
    q_name, k_name, v_name = list(signature.parameters)[1:4]

    @functools.wraps(original)
    def compute_attention(self: Any, *args: Any, **kwargs: Any) -> Any:
        run = decoder_seam.current()
        if run is None or run.options.attention == "keras" or type(self) is not cls:
            return original(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs).arguments
        call = _full_sequence_call(self, arguments[q_name], arguments[k_name], arguments[v_name], run)
        index = arguments.get("cache_update_index")
        if call is None or not (index is None or (isinstance(index, int) and index == 0)):
            return original(self, *args, **kwargs)  # cached decoding: keras' path
        name = choose(run.options.attention, cls, call.features, call)
        if name is None:
            return original(self, *args, **kwargs)
        return IMPLEMENTATIONS[name](call).astype(call.q.dtype)

    return compute_attention


def _full_sequence_call(
    layer: Any, q: jax.Array, k: jax.Array, v: jax.Array, run: decoder_seam.DecoderRun
) -> Call | None:
    """The ``Call`` of a full-sequence attention over the pass's inputs (``None`` otherwise)."""
    inputs = run.inputs
    padding = inputs.get("padding_mask")
    if padding is None or "vision_mask" in inputs or "images" in inputs:
        return None
    length = padding.shape[1]
    if q.ndim != 4 or q.shape[1] != length or k.shape[1] != length:
        return None
    features = FEATURES[type(layer)](layer)
    if features.kv_repeats > 1:  # keras-hub's ops.repeat(axis=2): head j is key head j // repeats
        k, v = k[:, :, :: features.kv_repeats], v[:, :, :: features.kv_repeats]
    segments = inputs.get("segment_ids")
    return Call(
        q=q,
        k=k,
        v=v,
        features=features,
        padding_BxS=jnp.asarray(padding) != 0,
        segments_BxS=None if segments is None else jnp.asarray(segments),
        mesh=run.mesh,
        chunk_size=run.options.attention_chunk_size,
    )
