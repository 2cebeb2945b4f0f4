"""DPO loss family: per-sequence completion log-probs and a registry of pairwise losses.

Every loss is a small module-level pure function of a ``PairLogps`` (policy and reference
summed completion log-probs, plus lengths and the chosen NLL) returning one loss per pair;
``LOSSES`` maps names to them, and ``combined_loss`` adds weighted terms (RPO is
``{"sigmoid": 1.0, "sft": alpha}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from kithara.models.model import Model, ModelVariables

ls = jax.nn.log_sigmoid


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per-pair ``[P]`` arrays: policy (``chosen``, ``rejected``) and reference
    (``ref_chosen``, ``ref_rejected``) summed completion log-probs, completion lengths, and
    the policy's summed NLL of the chosen completion (``-chosen``)."""

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array

    @property
    def rw(self) -> jax.Array:
        return self.chosen - self.ref_chosen

    @property
    def rl(self) -> jax.Array:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> jax.Array:
        return self.rw - self.rl


def sequence_logps(
    logits_BxLxV: jax.Array, labels_BxL: jax.Array, label_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row sums over masked (completion) positions of the label log-prob, the token
    count, and the sum of the vocabulary-mean logit. Labels are already shifted
    (``labels[t]`` follows position ``t``); prompt and padding are excluded by the mask with
    ``where``, so fully masked rows give exactly 0. Computed in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    logp = jnp.take_along_axis(logits, labels_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = logp - jax.nn.logsumexp(logits, axis=-1)
    return sequence_sums(logp, logits.mean(-1), label_mask_BxL)


def sequence_sums(
    logps_BxL: jax.Array, logit_mean_BxL: jax.Array, label_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``sequence_logps`` from per-token label log-probs and vocabulary-mean logits."""
    mask = label_mask_BxL.astype(bool)
    return (
        jnp.where(mask, logps_BxL, 0.0).sum(-1),
        mask.sum(-1).astype(jnp.float32),
        jnp.where(mask, logit_mean_BxL, 0.0).sum(-1),
    )


def token_logps(
    model: Model, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool, chunk_size: int | None
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(logps_BxL, logit_mean_BxL, new_non_trainable)``: each label's float32 log-prob and
    the vocabulary-mean logit under ``model``, from ``apply``'s full logits (``chunk_size``
    None), else ``chunk_size`` positions at a time (``Model.token_stats``; the arguments'
    ``TrainingConfig.loss_chunk_size``)."""
    if chunk_size is None:
        logits, non_trainable = model.apply(variables, inputs, training=training)
        logits = logits.astype(jnp.float32)
        logp = jnp.take_along_axis(logits, inputs["labels"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        return logp - jax.nn.logsumexp(logits, axis=-1), logits.mean(-1), non_trainable
    stats, non_trainable = model.token_stats(
        variables, inputs, inputs["labels"], training=training, stats=("logps", "logit_mean"), chunk_size=chunk_size
    )
    return stats["logps"], stats["logit_mean"], non_trainable


def sigmoid_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    h = beta * p.margin
    return -(1 - label_smoothing) * ls(h) - label_smoothing * ls(-h)


def hinge_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return jax.nn.relu(1 - beta * p.margin)


def ipo_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    def per_token(x: jax.Array, n: jax.Array) -> jax.Array:
        return x / jnp.maximum(n, 1.0)

    h_n = per_token(p.rw, p.chosen_len) - per_token(p.rl, p.rejected_len)
    return (h_n - 1 / (2 * beta)) ** 2


def robust_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    h = beta * p.margin
    return (-(1 - label_smoothing) * ls(h) + label_smoothing * ls(-h)) / (1 - 2 * label_smoothing)


def bco_pair_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return -ls(beta * p.rw) - ls(-beta * p.rl)


def sppo_hard_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return (p.rw - 1 / (2 * beta)) ** 2 + (p.rl + 1 / (2 * beta)) ** 2


def nca_pair_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return -ls(beta * p.rw) - 0.5 * ls(-beta * p.rw) - 0.5 * ls(-beta * p.rl)


def apo_zero_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return 1 - jax.nn.sigmoid(beta * p.rw) + jax.nn.sigmoid(beta * p.rl)


def apo_down_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    return jax.nn.sigmoid(beta * p.rw) + 1 - jax.nn.sigmoid(beta * p.margin)


def sft_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
    """Token-mean NLL of the chosen completion (per pair)."""
    return -p.chosen / jnp.maximum(p.chosen_len, 1.0)


PairLoss = Callable[[PairLogps, float, float], jax.Array]

LOSSES: dict[str, PairLoss] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "sft": sft_loss,
}


def loss_weights(
    loss_type: str | Sequence[str] | Mapping[str, float], *, beta: float, label_smoothing: float
) -> dict[str, float]:
    """Validates a loss type (a name, a list of names weighted 1.0 each, or ``{name: weight}``)
    and returns ``{name: weight}``. TRL's ``loss_weights`` list goes through
    ``DPOConfig.loss_weight_map``."""
    if isinstance(loss_type, str):
        weights = {loss_type: 1.0}
    elif isinstance(loss_type, Mapping):
        weights = {str(k): float(v) for k, v in loss_type.items()}
    elif isinstance(loss_type, Sequence) and all(isinstance(n, str) for n in loss_type):
        if len(set(loss_type)) != len(loss_type):
            raise ValueError(f"loss_type {list(loss_type)} names a loss more than once; give each loss once.")
        weights = dict.fromkeys(loss_type, 1.0)
    else:
        raise ValueError(
            "loss_type must be a loss name ('sigmoid'), a list of names (weighted with DPOConfig.loss_weights) "
            f"or a {{name: weight}} mapping; got {loss_type!r}."
        )
    if not weights:
        raise ValueError("loss_type is empty; give a name such as 'sigmoid' or a {name: weight} mapping.")
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise ValueError(f"Unknown DPO loss type(s) {unknown}; known: {sorted(LOSSES)}.")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    if not 0 <= label_smoothing < 0.5 and "robust" in weights:
        raise ValueError(
            f"The robust loss needs 0 <= label_smoothing < 0.5 (it divides by 1 - 2e), got {label_smoothing}."
        )
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    return weights


def combined_loss(p: PairLogps, weights: Mapping[str, float], beta: float, label_smoothing: float) -> jax.Array:
    """Per-pair weighted sum of the named losses."""
    return sum(w * LOSSES[name](p, beta, label_smoothing) for name, w in weights.items())  # type: ignore[return-value]
