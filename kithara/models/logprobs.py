"""Per-token log-probabilities and entropies without the whole sequence's float32 logits.

RL objectives (GRPO, PPO) need, at every position, the log-probability of the token that
was there and often the entropy of the distribution. Computed from full logits that is a
float32 ``[batch, length, vocab]`` array (8 x 4096 x 128256 x 4 B = 16.8 GB for a Llama 3
vocabulary), kept for the backward pass. ``chunked_token_logps`` runs the LM head and the
log-softmax over ``chunk_size`` positions at a time inside ``jax.lax.map``, each chunk under
``jax.checkpoint``: the forward keeps only ``[batch, length]`` results and the backward
recomputes one chunk's logits at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# With chunk_size=None, a chunk's float32 logits (the whole batch) take at most this much.
CHUNK_BYTES = 512 * 2**20


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


def auto_chunk_size(batch: int, length: int, vocab: int) -> int:
    """The largest power of two (at most ``length``, at least 1) whose float32 logits for
    ``batch`` rows fit in ``CHUNK_BYTES``."""
    fits = max(1, CHUNK_BYTES // (4 * batch * vocab))
    return min(length, 1 << (fits.bit_length() - 1))


def chunked_token_logps(
    hidden_BxLxH: jax.Array,
    head_fn: Callable[[jax.Array], jax.Array],
    labels_BxL: jax.Array,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    """``logps_and_entropy(head_fn(hidden), labels)``, ``chunk_size`` positions at a time.

    Args:
        hidden_BxLxH: the hidden states the LM head reads.
        head_fn: hidden ``[B, C, H]`` -> logits ``[B, C, V]`` (any float dtype; the
            log-softmax is float32). It may close over traced arrays (the variables).
        labels_BxL: int token ids to score; outside ``[0, vocab)`` gives log-probability 0.
        chunk_size: positions per chunk (``length`` need not be a multiple: the last chunk
            is padded and the padding cut off); ``None``: ``auto_chunk_size``.

    Returns:
        ``(logps_BxL, entropy_BxL)``, float32.
    """
    batch, length, hidden = hidden_BxLxH.shape
    if chunk_size is None:
        vocab = jax.eval_shape(head_fn, hidden_BxLxH[:, :1]).shape[-1]
        chunk_size = auto_chunk_size(batch, length, vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    hidden_BxPxH = jnp.pad(hidden_BxLxH, ((0, 0), (0, pad), (0, 0)))
    labels_BxP = jnp.pad(labels_BxL, ((0, 0), (0, pad)))
    hidden_NxBxCxH = hidden_BxPxH.reshape(batch, chunks, chunk, hidden).transpose(1, 0, 2, 3)
    labels_NxBxC = labels_BxP.reshape(batch, chunks, chunk).transpose(1, 0, 2)

    # Saves nothing but its inputs: the backward pass recomputes this chunk's logits.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        hidden_BxCxH, labels_BxC = xs
        return logps_and_entropy(head_fn(hidden_BxCxH), labels_BxC)

    logps_NxBxC, entropy_NxBxC = jax.lax.map(one_chunk, (hidden_NxBxCxH, labels_NxBxC))

    def unchunk(x_NxBxC: jax.Array) -> jax.Array:
        return x_NxBxC.transpose(1, 0, 2).reshape(batch, chunks * chunk)[:, :length]

    return unchunk(logps_NxBxC), unchunk(entropy_NxBxC)
