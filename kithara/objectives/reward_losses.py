"""Reward-model losses: the pairwise (Bradley-Terry) ranking loss of ``RewardTrainer`` and the
token-classification loss of ``PRMTrainer``.

Each loss is a small module-level pure function returning one value per pair (or per
labelled position); the trainers sum them into a ``LossOutput`` whose weight is the number of
valid pairs (labelled positions), so micro-batches combine exactly into TRL's means.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# TRL's PRMTrainer (and transformers' token-classification models) ignore this label.
IGNORE_INDEX = -100


def ranking_loss(chosen_P: jax.Array, rejected_P: jax.Array, margin_P: jax.Array) -> jax.Array:
    """Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected - margin)`` per pair (TRL's
    ``RewardTrainer``; a zero margin is its loss without a ``margin`` column)."""
    return -jax.nn.log_sigmoid(chosen_P - rejected_P - margin_P)


def center_rewards_penalty(chosen_P: jax.Array, rejected_P: jax.Array) -> jax.Array:
    """``(r_chosen + r_rejected) ** 2`` per pair: TRL's ``center_rewards_coefficient`` term
    (Eisenstein et al. 2023, eq. 2) before its mean and coefficient."""
    return (chosen_P + rejected_P) ** 2


PairRewardLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

LOSSES: dict[str, PairRewardLoss] = {"ranking": ranking_loss}


def pair_loss(
    chosen_P: jax.Array,
    rejected_P: jax.Array,
    margin_P: jax.Array,
    *,
    loss_type: str = "ranking",
    center_rewards_coefficient: float | None = None,
) -> jax.Array:
    """Per-pair loss whose mean over pairs is TRL's ``RewardTrainer`` loss: the ranking loss
    plus ``center_rewards_coefficient * (r_chosen + r_rejected) ** 2`` when the coefficient is set."""
    loss = LOSSES[loss_type](chosen_P, rejected_P, margin_P)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * center_rewards_penalty(chosen_P, rejected_P)
    return loss


def token_classification_terms(
    logits_BxLxC: jax.Array, labels_BxL: jax.Array, label_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cross-entropy summed over the labelled positions, their count, and how many of them
    the argmax classifies correctly. ``total / count`` is transformers' token-classification
    loss (``CrossEntropyLoss`` with ``ignore_index=-100``: the unlabelled positions). Labels
    are not shifted: position ``t``'s label is about token ``t``. Computed in float32; masked
    positions are excluded with ``where``, so their (possibly -100) labels are never read."""
    logits = logits_BxLxC.astype(jnp.float32)
    mask = label_mask_BxL.astype(bool)
    labels = jnp.where(mask, labels_BxL, 0).astype(jnp.int32)
    logp_BxLxC = jax.nn.log_softmax(logits, axis=-1)
    nll_BxL = -jnp.take_along_axis(logp_BxLxC, labels[..., None], axis=-1)[..., 0]
    correct_BxL = jnp.argmax(logits, axis=-1) == labels
    return (
        jnp.where(mask, nll_BxL, 0.0).sum(),
        mask.sum().astype(jnp.float32),
        jnp.where(mask, correct_BxL, False).sum().astype(jnp.float32),
    )
