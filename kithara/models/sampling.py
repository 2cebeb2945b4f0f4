"""Next-token choice from logits: greedy, temperature, top-k, top-p and min-p, as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None) -> None:
    """Raises ``ValueError`` unless ``temperature >= 0``, ``0 < top_p <= 1``, ``top_k >= 0``
    and ``0 <= min_p <= 1``."""
    if (
        temperature < 0
        or (top_p is not None and not 0 < top_p <= 1)
        or (top_k is not None and top_k < 0)
        or (min_p is not None and not 0 <= min_p <= 1)
    ):
        raise ValueError(
            "Need temperature >= 0, 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1; "
            f"got {temperature}, {top_p}, {top_k}, {min_p}."
        )


def is_filtered(top_k: int | None, top_p: float | None, min_p: float | None) -> bool:
    """Whether any of the filters would remove a token (``top_k`` 0 or None, ``top_p`` 1 or
    None and ``min_p`` 0 or None keep every token)."""
    return bool(top_k) or (top_p is not None and top_p < 1.0) or bool(min_p)


def filter_logits(
    logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array | float = 0.0
) -> jax.Array:
    """Sets to ``-inf`` the logits outside the top-k, then outside the top-p nucleus, then
    below the min-p threshold.

    Order and rules follow Hugging Face's warpers (``TopK``, ``TopP``, ``MinP`` in that
    order, all after the temperature): top-k keeps the ``k`` largest logits (``k <= 0``
    keeps all; ties with the k-th are kept); top-p then keeps the smallest set of the
    largest logits whose probability reaches ``top_p`` (the most likely token always stays;
    ``top_p >= 1`` keeps all); min-p then keeps the tokens whose probability (softmax of
    what is left) is at least ``min_p`` times the largest one (``min_p = 0`` keeps all, the
    most likely token always stays). ``top_k``, ``top_p`` and ``min_p`` are traced scalars,
    so changing them does not recompile.

    Args:
        logits_BxV: float logits (already divided by the temperature).
        top_k: int scalar.
        top_p: float scalar.
        min_p: float scalar in ``[0, 1]``.
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
    logits_BxV = jnp.where((top_p < 1.0) & (logits_BxV < threshold_Bx1), -jnp.inf, logits_BxV)
    # Min-p on the probabilities of what top-k and top-p left, as MinPLogitsWarper computes them.
    probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    top_Bx1 = jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where(probs_BxV < min_p * top_Bx1, -jnp.inf, logits_BxV)


def choose_tokens(
    logits_BxV: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
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
        top_k, top_p, min_p: see ``filter_logits`` (used when ``filtered``).
        greedy, filtered: static choices; each combination compiles once.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if filtered:
        logits_BxV = filter_logits(logits_BxV, top_k, top_p, min_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
