"""Unpaired preference losses (KTO, BCO): pure per-row functions of policy and reference
summed completion log-probs and the row's label (desirable or not).

``KTO_LOSSES`` maps TRL's ``KTOConfig.loss_type`` names to ``(desirable, undesirable)``
functions of the log-ratio; ``kto_loss`` weighs and selects them by label. ``bco_loss`` is
TRL's BCO loss: a logistic classifier of the implicit reward shifted by the running mean
``delta``, with optional density-ratio (UDM) weights on the undesirable rows.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ls = jax.nn.log_sigmoid


def kl_estimate(kl_logps: jax.Array, ref_kl_logps: jax.Array, valid: jax.Array) -> jax.Array:
    """KTO's reference point: the mean over valid rows of the policy-to-reference log-ratio
    of the mismatched (prompt, other completion) rows, clamped at 0 and without gradient."""
    count = jnp.maximum(valid.sum(), 1)
    kl = jnp.where(valid, kl_logps - ref_kl_logps, 0.0).sum() / count
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_desirable(logratio: jax.Array, kl: jax.Array, beta: float) -> jax.Array:
    """Eq. (7) of the KTO paper, desirable rows."""
    return 1 - jax.nn.sigmoid(beta * (logratio - kl))


def kto_undesirable(logratio: jax.Array, kl: jax.Array, beta: float) -> jax.Array:
    return 1 - jax.nn.sigmoid(beta * (kl - logratio))


def apo_zero_desirable(logratio: jax.Array, kl: jax.Array, beta: float) -> jax.Array:
    """Unpaired APO-zero (APO paper, Eq. 7): no reference point."""
    return 1 - jax.nn.sigmoid(beta * logratio)


def apo_zero_undesirable(logratio: jax.Array, kl: jax.Array, beta: float) -> jax.Array:
    return jax.nn.sigmoid(beta * logratio)


RowLoss = Callable[[jax.Array, jax.Array, float], jax.Array]
KTO_LOSSES: dict[str, tuple[RowLoss, RowLoss]] = {
    "kto": (kto_desirable, kto_undesirable),
    "apo_zero_unpaired": (apo_zero_desirable, apo_zero_undesirable),
}
# Loss types that need the mismatched KL rows.
USES_KL = ("kto",)


def kto_loss(
    logratio: jax.Array,
    label: jax.Array,
    kl: jax.Array,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    loss_type: str = "kto",
) -> jax.Array:
    """Per-row KTO loss: ``desirable_weight * desirable(...)`` where ``label`` is true,
    ``undesirable_weight * undesirable(...)`` where it is false. ``logratio`` is policy minus
    reference summed completion log-probs; ``kl`` the (detached) reference point."""
    desirable, undesirable = KTO_LOSSES[loss_type]
    return jnp.where(
        label,
        desirable_weight * desirable(logratio, kl, beta),
        undesirable_weight * undesirable(logratio, kl, beta),
    )


def bco_loss(
    logratio: jax.Array, label: jax.Array, delta: jax.Array, *, beta: float, udm_weight: jax.Array | None = None
) -> jax.Array:
    """Per-row BCO loss: ``-log sigmoid(beta * logratio - delta)`` for desirable rows and
    ``-log sigmoid(-(beta * logratio - delta))`` for undesirable ones, the latter times
    ``udm_weight`` (the density ratio) when given."""
    shifted = beta * logratio - delta
    rejected = -ls(-shifted)
    if udm_weight is not None:
        rejected = udm_weight * rejected
    return jnp.where(label, -ls(shifted), rejected)


def udm_weight(prob_desirable: jax.Array, min_density_ratio: float, max_density_ratio: float) -> jax.Array:
    """BCO's underlying-distribution-matching weight of an undesirable row: the density
    ratio ``p / (1 - p)`` of a classifier's probability that its prompt is a desirable
    row's, clamped to ``[min_density_ratio, max_density_ratio]``."""
    return jnp.clip(prob_desirable / (1 - prob_desirable + 1e-8), min_density_ratio, max_density_ratio)
