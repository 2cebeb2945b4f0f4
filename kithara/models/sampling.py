"""Next-token choice from logits: greedy, temperature, top-k and top-p, as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises ``ValueError`` unless ``temperature >= 0``, ``0 < top_p <= 1`` and ``top_k >= 0``."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 0):
        raise ValueError(f"Need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}.")


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets to ``-inf`` the logits outside the top-k, then outside the top-p nucleus.

    Order and rules follow Hugging Face's warpers: top-k keeps the ``k`` largest logits
    (``k <= 0`` keeps all; ties with the k-th are kept); top-p then keeps the smallest set of
    the largest logits whose probability reaches ``top_p`` (the most likely token always
    stays; ``top_p >= 1`` keeps all). ``top_k`` and ``top_p`` are traced scalars, so changing
    them does not recompile.

    Args:
        logits_BxV: float logits (already divided by the temperature).
        top_k: int scalar.
        top_p: float scalar.
    """
    vocab = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.broadcast_to(k - 1, (logits_BxV.shape[0], 1)), axis=-1)
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, -jnp.inf, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV.astype(jnp.float32), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = (mass_before_BxV < top_p) | (jnp.arange(vocab) == 0)
    # The smallest kept logit is the threshold; everything below it leaves the nucleus.
    threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits_BxV < threshold_Bx1), -jnp.inf, logits_BxV)


def choose_tokens(
    logits_BxV: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    greedy: bool,
    filtered: bool,
) -> jax.Array:
    """One token id per row: the argmax when ``greedy``, else a sample from
    ``softmax(logits / temperature)``, restricted by ``filter_logits`` when ``filtered``.

    Args:
        logits_BxV: the last position's logits.
        rng: a PRNG key (unused when greedy).
        temperature: float scalar > 0 (unused when greedy).
        top_k, top_p: see ``filter_logits`` (used when ``filtered``).
        greedy, filtered: static choices; each combination compiles once.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if filtered:
        logits_BxV = filter_logits(logits_BxV, top_k, top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
