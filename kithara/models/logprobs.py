"""Per-token log-probabilities and loss statistics without the whole sequence's float32 logits.

Every log-prob objective needs, at each position, a few numbers read off the distribution
over the vocabulary: the log-probability of the token that was there (cross-entropy, DPO,
GRPO), whether that token had the largest logit (token accuracy), the entropy, the mean logit
(DPO's ``logits/chosen`` metric). Computed from full logits that is a float32 ``[batch,
length, vocab]`` array (8 x 4096 x 128256 x 4 B = 16.8 GB for a Llama 3 vocabulary), kept for
the backward pass. ``chunked_token_stats`` runs the LM head and the float32 log-softmax over
``chunk_size`` positions at a time inside ``jax.lax.map``, each chunk under ``jax.checkpoint``:
the forward keeps only ``[batch, length]`` results and the backward recomputes one chunk's
logits at a time. With ``vocab_chunk_size`` (a ``LinearHead``), each chunk's log-sum-exp is
also accumulated over slices of the vocabulary (online, as flash attention does), so not even
one chunk's ``[batch, chunk, vocab]`` logits exist at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# With chunk_size=None, a chunk's float32 logits (the whole batch) take at most this much.
CHUNK_BYTES = 512 * 2**20

# What token_stats can report per position: the label's log-probability, the distribution's
# entropy, whether the label's logit is the largest, and the vocabulary-mean logit.
STATS = ("logps", "entropy", "correct", "logit_mean")

Stats = dict[str, jax.Array]


def logps_and_entropy(logits_xV: jax.Array, labels_x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 ``log_softmax(logits)`` at ``labels`` and the entropy ``-sum p log p`` over the
    last axis. Labels outside ``[0, vocab)`` (padding such as -100) get log-probability 0."""
    vocab = logits_xV.shape[-1]
    logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
    valid_x = (labels_x >= 0) & (labels_x < vocab)
    index_x1 = jnp.where(valid_x, labels_x, 0).astype(jnp.int32)[..., None]
    picked_x = jnp.take_along_axis(logp_xV, index_x1, axis=-1)[..., 0]
    # Tokens of probability 0 (logit -inf) add 0, not nan.
    entropy_x = -jnp.sum(jnp.exp(logp_xV) * jnp.where(jnp.isfinite(logp_xV), logp_xV, 0.0), axis=-1)
    return jnp.where(valid_x, picked_x, 0.0), entropy_x


def check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    """``stats`` as a tuple, refusing names outside ``STATS``."""
    unknown = sorted(set(stats) - set(STATS))
    if unknown or not stats:
        raise ValueError(f"stats must name some of {list(STATS)}, got {list(stats)}.")
    return tuple(stats)


def token_stats(logits_xV: jax.Array, labels_x: jax.Array, stats: Sequence[str] = ("logps",)) -> Stats:
    """The ``stats`` (names from ``STATS``) of each position of float logits, in float32:
    ``logps`` the label's ``log_softmax`` (0 for labels outside ``[0, vocab)``), ``entropy``
    ``-sum p log p``, ``correct`` whether the label's logit is the largest (ties count), and
    ``logit_mean`` the mean logit over the vocabulary. The same formulas as
    ``kithara.trainer.losses.next_token_cross_entropy`` (a max-shifted log-sum-exp)."""
    stats = check_stats(stats)
    vocab = logits_xV.shape[-1]
    logits_xV = logits_xV.astype(jnp.float32)
    max_x = jnp.max(logits_xV, axis=-1)
    shift_x = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_x), max_x, 0.0))
    log_z_x = shift_x + jnp.log(jnp.sum(jnp.exp(logits_xV - shift_x[..., None]), axis=-1))
    valid_x = (labels_x >= 0) & (labels_x < vocab)
    index_x1 = jnp.where(valid_x, labels_x, 0).astype(jnp.int32)[..., None]
    label_logit_x = jnp.take_along_axis(logits_xV, index_x1, axis=-1)[..., 0]
    out: Stats = {}
    if "logps" in stats:
        out["logps"] = jnp.where(valid_x, label_logit_x - log_z_x, 0.0)
    if "entropy" in stats:
        logp_xV = logits_xV - log_z_x[..., None]
        out["entropy"] = -jnp.sum(jnp.exp(logp_xV) * jnp.where(jnp.isfinite(logp_xV), logp_xV, 0.0), axis=-1)
    if "correct" in stats:
        out["correct"] = valid_x & (label_logit_x >= max_x)
    if "logit_mean" in stats:
        out["logit_mean"] = jnp.mean(logits_xV, axis=-1)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearHead:
    """An LM head that is a matmul and an optional soft-cap, ``softcap(hidden @ kernel)``,
    so it can be computed over a slice of the vocabulary (``vocab_chunk_size``).

    Attributes:
        kernel_HxV: the output embedding (``[hidden, vocab]``), already in ``dtype``.
        soft_cap: Gemma 2/3's final-logit cap ``tanh(x / cap) * cap``, or None.
        dtype: the dtype the matmul runs in (the hidden states are cast to it).
    """

    kernel_HxV: jax.Array
    soft_cap: float | None = dataclasses.field(default=None, metadata={"static": True})
    dtype: Any = dataclasses.field(default=jnp.float32, metadata={"static": True})

    @property
    def vocab(self) -> int:
        return int(self.kernel_HxV.shape[-1])

    def logits(self, hidden_xH: jax.Array, kernel_HxV: jax.Array) -> jax.Array:
        """``softcap(hidden @ kernel)`` for any slice ``kernel`` of the vocabulary."""
        logits = jnp.matmul(hidden_xH.astype(self.dtype), kernel_HxV)
        if self.soft_cap is not None:
            logits = jnp.tanh(logits / self.soft_cap) * self.soft_cap
        return logits

    def __call__(self, hidden_xH: jax.Array) -> jax.Array:
        return self.logits(hidden_xH, self.kernel_HxV)


def vocab_chunked_stats(
    hidden_xH: jax.Array, head: LinearHead, labels_x: jax.Array, vocab_chunk_size: int, stats: Sequence[str]
) -> Stats:
    """``token_stats(head(hidden), labels, stats)`` with the vocabulary in slices of
    ``vocab_chunk_size``: a running max, sum of ``exp`` (and of ``exp * logit`` for the
    entropy), label logit and logit sum are carried across slices, each slice under
    ``jax.checkpoint`` so the backward pass recomputes its logits from the carries."""
    stats = check_stats(stats)
    vocab, hidden = head.vocab, head.kernel_HxV.shape[0]
    size = min(vocab_chunk_size, vocab)
    slices = -(-vocab // size)
    kernel_NxHxS = (
        jnp.pad(head.kernel_HxV, ((0, 0), (0, slices * size - vocab))).reshape(hidden, slices, size).transpose(1, 0, 2)
    )
    valid_x = (labels_x >= 0) & (labels_x < vocab)
    batch_shape = labels_x.shape
    zeros = jnp.zeros(batch_shape, jnp.float32)
    carry0 = {"max": jnp.full(batch_shape, -jnp.inf), "sum": zeros, "ent": zeros, "label": zeros, "total": zeros}

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_slice(carry: Stats, xs: tuple[jax.Array, jax.Array]) -> tuple[Stats, None]:
        kernel_HxS, start = xs
        logits_xS = head.logits(hidden_xH, kernel_HxS).astype(jnp.float32)
        column_S = start + jnp.arange(size)
        in_vocab_S = column_S < vocab
        masked_xS = jnp.where(in_vocab_S, logits_xS, -jnp.inf)
        # The shift only keeps exp in range: the log-sum-exp does not depend on it, so no gradient.
        new_max = jnp.maximum(carry["max"], jnp.max(masked_xS, axis=-1))
        shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(new_max), new_max, 0.0))
        old_shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(carry["max"]), carry["max"], 0.0))
        rescale = jnp.where(jnp.isfinite(carry["max"]), jnp.exp(old_shift - shift), 0.0)
        exp_xS = jnp.where(in_vocab_S, jnp.exp(logits_xS - shift[..., None]), 0.0)
        hit_xS = column_S == labels_x[..., None]
        new = {
            "max": new_max,
            "sum": carry["sum"] * rescale + exp_xS.sum(-1),
            "ent": carry["ent"] * rescale + (exp_xS * jnp.where(in_vocab_S, logits_xS, 0.0)).sum(-1),
            "label": carry["label"] + jnp.where(hit_xS, logits_xS, 0.0).sum(-1),
            "total": carry["total"] + jnp.where(in_vocab_S, logits_xS, 0.0).sum(-1),
        }
        return new, None

    starts = jnp.arange(slices, dtype=jnp.int32) * size
    final, _ = jax.lax.scan(one_slice, carry0, (kernel_NxHxS, starts))
    shift = jax.lax.stop_gradient(final["max"])
    log_z_x = shift + jnp.log(final["sum"])
    out: Stats = {}
    if "logps" in stats:
        out["logps"] = jnp.where(valid_x, final["label"] - log_z_x, 0.0)
    if "entropy" in stats:
        out["entropy"] = log_z_x - final["ent"] / final["sum"]
    if "correct" in stats:
        out["correct"] = valid_x & (final["label"] >= final["max"])
    if "logit_mean" in stats:
        out["logit_mean"] = final["total"] / vocab
    return out


def auto_chunk_size(batch: int, length: int, vocab: int) -> int:
    """The largest power of two (at most ``length``, at least 1) whose float32 logits for
    ``batch`` rows fit in ``CHUNK_BYTES``."""
    fits = max(1, CHUNK_BYTES // (4 * batch * vocab))
    return min(length, 1 << (fits.bit_length() - 1))


def map_chunks(
    fn: Callable[[jax.Array, jax.Array], Any],
    hidden_BxLxH: jax.Array,
    labels_BxL: jax.Array,
    chunk_size: int,
) -> Any:
    """``fn(hidden, labels)`` (a pytree of ``[B, C]`` arrays) over ``chunk_size`` positions at a
    time under ``jax.lax.map``, each chunk under ``jax.checkpoint`` (the backward pass
    recomputes it from its inputs); results joined back to ``[B, L]``. ``length`` need not be
    a multiple of ``chunk_size``: the last chunk is padded and the padding cut off."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    batch, length, hidden = hidden_BxLxH.shape
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    hidden_BxPxH = jnp.pad(hidden_BxLxH, ((0, 0), (0, pad), (0, 0)))
    labels_BxP = jnp.pad(labels_BxL, ((0, 0), (0, pad)))
    hidden_NxBxCxH = hidden_BxPxH.reshape(batch, chunks, chunk, hidden).transpose(1, 0, 2, 3)
    labels_NxBxC = labels_BxP.reshape(batch, chunks, chunk).transpose(1, 0, 2)

    # Saves nothing but its inputs: the backward pass recomputes this chunk's logits.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> Any:
        return fn(*xs)

    out_N = jax.lax.map(one_chunk, (hidden_NxBxCxH, labels_NxBxC))

    def unchunk(x_NxBxC: jax.Array) -> jax.Array:
        return x_NxBxC.transpose(1, 0, 2).reshape(batch, chunks * chunk)[:, :length]

    return jax.tree.map(unchunk, out_N)


def chunked_token_stats(
    hidden_BxLxH: jax.Array,
    head_fn: Callable[[jax.Array], jax.Array],
    labels_BxL: jax.Array,
    chunk_size: int | None,
    stats: Sequence[str] = ("logps",),
    *,
    vocab_chunk_size: int | None = None,
) -> Stats:
    """``token_stats(head_fn(hidden), labels, stats)``, ``chunk_size`` positions at a time.

    Args:
        hidden_BxLxH: the hidden states the LM head reads.
        head_fn: hidden ``[B, C, H]`` -> logits ``[B, C, V]`` (any float dtype; the
            log-softmax is float32). It may close over traced arrays (the variables).
        labels_BxL: int token ids to score; outside ``[0, vocab)`` gives log-probability 0.
        chunk_size: positions per chunk; ``None``: ``auto_chunk_size``.
        stats: names from ``STATS``.
        vocab_chunk_size: also split the vocabulary into slices of this many tokens (needs
            ``head_fn`` to be a ``LinearHead``); ``None``: whole vocabulary per chunk.

    Returns:
        ``{name: [B, L]}`` for each of ``stats`` (float32; ``correct`` is bool).
    """
    stats = check_stats(stats)
    batch, length, _ = hidden_BxLxH.shape
    if chunk_size is None:
        vocab = jax.eval_shape(head_fn, hidden_BxLxH[:, :1]).shape[-1]
        chunk_size = auto_chunk_size(batch, length, vocab)
    if vocab_chunk_size is None:
        return map_chunks(lambda h, y: token_stats(head_fn(h), y, stats), hidden_BxLxH, labels_BxL, chunk_size)
    if vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be >= 1, got {vocab_chunk_size}.")
    if not isinstance(head_fn, LinearHead):
        raise ValueError(
            "vocab_chunk_size needs the LM head as a kithara.models.logprobs.LinearHead (a matmul and an optional "
            f"soft-cap), got {type(head_fn).__name__}; leave vocab_chunk_size=None for this head."
        )
    head = head_fn
    return map_chunks(
        lambda h, y: vocab_chunked_stats(h, head, y, vocab_chunk_size, stats), hidden_BxLxH, labels_BxL, chunk_size
    )


def chunked_token_logps(
    hidden_BxLxH: jax.Array,
    head_fn: Callable[[jax.Array], jax.Array],
    labels_BxL: jax.Array,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    """``logps_and_entropy(head_fn(hidden), labels)``, ``chunk_size`` positions at a time
    (``None``: ``auto_chunk_size``); returns ``(logps_BxL, entropy_BxL)``, float32."""
    batch, length, _ = hidden_BxLxH.shape
    if chunk_size is None:
        vocab = jax.eval_shape(head_fn, hidden_BxLxH[:, :1]).shape[-1]
        chunk_size = auto_chunk_size(batch, length, vocab)
    logps_BxL, entropy_BxL = map_chunks(
        lambda h, y: logps_and_entropy(head_fn(h), y), hidden_BxLxH, labels_BxL, chunk_size
    )
    return logps_BxL, entropy_BxL
