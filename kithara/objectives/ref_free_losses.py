"""Reference-free pairwise losses: ORPO's odds ratio, and CPO's family (sigmoid, hinge, IPO,
SimPO, AlphaPO's reward shape).

Every function is module-level and pure, over per-pair ``[P]`` arrays of the policy's
completion log-probs (summed or per-token averaged: the trainer chooses, as TRL does).
``CPO_LOSSES`` maps TRL's ``CPOConfig.loss_type`` names to functions of the reward margin;
``cpo_loss`` is TRL's ``CPOTrainer.cpo_loss`` (AlphaPO rewards included), ``odds_ratio_loss``
its ``ORPOTrainer.odds_ratio_loss``.

Example:
    >>> chosen, rejected = jnp.array([-0.4, -1.2]), jnp.array([-0.9, -1.0])  # per-token means
    >>> loss, log_odds = odds_ratio_loss(chosen, rejected, beta=0.1)
    >>> losses, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, "simpo", beta=2.0, simpo_gamma=0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

ls = jax.nn.log_sigmoid
_MINUS_LN2 = -math.log(2.0)  # where log1mexp switches formulas (TRL's branch point)
# Mean log-probs are capped just below 0 for the odds: at exactly 0 (a completion memorised to
# float32's last bit) log(1 - p) is -inf and its gradient NaN (TRL's too).
_MAX_MEAN_LOGP = -1e-7


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``: ``log1p(-exp(x))`` below ``-ln 2``, ``log(-expm1(x))``
    above (TRL's ``log1mexp``). Each formula sees its input clamped to its own side, so the
    unused branch of the ``where`` has a finite gradient."""
    low = jnp.log1p(-jnp.exp(jnp.minimum(x, _MINUS_LN2)))
    high = jnp.log(-jnp.expm1(jnp.maximum(x, _MINUS_LN2)))
    return jnp.where(x < _MINUS_LN2, low, high)


def log_odds_ratio(chosen_logps: jax.Array, rejected_logps: jax.Array) -> jax.Array:
    """``log odds(chosen) - log odds(rejected)`` with ``odds(p) = p / (1 - p)``, from log-probs
    (each capped at -1e-7, so a probability of 1 gives finite odds and gradients)."""
    dtype = jnp.result_type(chosen_logps.dtype, jnp.float32)  # at least float32, as TRL's .float()
    chosen = jnp.minimum(chosen_logps.astype(dtype), _MAX_MEAN_LOGP)
    rejected = jnp.minimum(rejected_logps.astype(dtype), _MAX_MEAN_LOGP)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def odds_ratio_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
    """ORPO's per-pair odds-ratio term ``-beta * log sigmoid(log_odds)`` (ORPO adds it to the
    chosen NLL; the paper's lambda is ``beta``), and ``log_odds`` for the metrics (TRL logs the
    mean of ``log sigmoid(log_odds)`` as ``log_odds_ratio``, the mean of ``log_odds`` as
    ``log_odds_chosen``). The log-probs are per-token means of each completion."""
    log_odds = log_odds_ratio(chosen_logps, rejected_logps)
    return -beta * ls(log_odds), log_odds


def alphapo_reward(logps: jax.Array, alpha: float) -> jax.Array:
    """AlphaPO's reward ``(1 - p^-alpha) / alpha`` of a log-prob ``log p``; the log-prob itself
    when ``alpha == 0`` (its limit)."""
    if alpha == 0.0:
        return logps
    return -jnp.expm1(-alpha * logps) / alpha


def sigmoid_loss(margin: jax.Array, beta: float, label_smoothing: float, simpo_gamma: float) -> jax.Array:
    h = beta * margin
    return -(1 - label_smoothing) * ls(h) - label_smoothing * ls(-h)


def hinge_loss(margin: jax.Array, beta: float, label_smoothing: float, simpo_gamma: float) -> jax.Array:
    return jax.nn.relu(1 - beta * margin)


def ipo_loss(margin: jax.Array, beta: float, label_smoothing: float, simpo_gamma: float) -> jax.Array:
    return (margin - 1 / (2 * beta)) ** 2


def simpo_loss(margin: jax.Array, beta: float, label_smoothing: float, simpo_gamma: float) -> jax.Array:
    """The sigmoid loss with the target margin: ``beta * margin - simpo_gamma``."""
    return sigmoid_loss(margin - simpo_gamma / beta, beta, label_smoothing, simpo_gamma)


MarginLoss = Callable[[jax.Array, float, float, float], jax.Array]

CPO_LOSSES: dict[str, MarginLoss] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
}
# Loss types whose log-probs are per-token means of the completion (the others sum them).
AVERAGED_LOSSES = ("ipo", "simpo")
# Losses that read label_smoothing (the others would ignore it).
SMOOTHED_LOSSES = ("sigmoid", "simpo")


def cpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    loss_type: str,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair CPO-family losses and the chosen and rejected rewards (``beta`` times the
    AlphaPO-shaped log-probs), as TRL's ``CPOTrainer.cpo_loss``. The log-probs are summed
    (``sigmoid``, ``hinge``) or per-token means (``ipo``, ``simpo``) of each completion."""
    chosen_rewards, rejected_rewards = alphapo_reward(chosen_logps, alpha), alphapo_reward(rejected_logps, alpha)
    losses = CPO_LOSSES[loss_type](chosen_rewards - rejected_rewards, beta, label_smoothing, simpo_gamma)
    return losses, beta * chosen_rewards, beta * rejected_rewards
