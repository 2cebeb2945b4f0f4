"""Online-RL losses (GRPO family, RLOO, PPO) as small pure JAX functions, matching TRL 1.16.0.

Mirrors (file / function of TRL 1.16.0 unless noted):

- ``group_advantages``: ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._generate_and_score_completions``
  (``multi_objective_aggregation="sum_then_normalize"``); the std is ``trl.trainer.utils.nanstd`` (Bessel-corrected,
  NaN-aware: a NaN reward marks an unscorable completion, left out of its group's statistics, advantage 0).
- ``policy_loss``, ``k3_kl``, ``POLICY_LOSSES``: ``GRPOTrainer._compute_loss`` (PPO-clip surrogate, CISPO, SAPO,
  GSPO sequence-level ratio, INTELLECT-2 ``delta``, k3 KL with ``use_bias_correction_kl``, the per-type normalisers).
- ``rloo_sequence_rewards``, ``rloo_advantages``: ``trl/trainer/rloo_trainer.py``
  ``RLOOTrainer._generate_and_score_completions``: TRL's RLOO puts the KL in the *reward* (reward minus ``beta`` times
  the masked sum of the k1 estimate ``logp_old - logp_ref``), not in the loss; ``rloo_policy_loss``:
  ``RLOOTrainer._compute_loss`` (one ratio per sequence from *summed* log-probs, clipped, mean over sequences).
- ``gae``, ``whiten``, ``ppo_policy_loss``, ``ppo_value_loss``, ``per_token_kl_penalty``: TRL 1.16.0 ships no PPO
  trainer; these follow ``trl/experimental/ppo/ppo_trainer.py`` (``PPOTrainer.train``, ``masked_whiten``) of TRL's
  main branch at commit fd09025884b6 (2026-06-30).

Shapes are suffixes (``B`` rows, ``T`` completion positions, ``N`` rows of a generation batch, group-contiguous).
Math is float32; masked positions are removed with ``where`` *before* any arithmetic, so NaN or huge values in
padding reach neither the value nor the gradient. Losses return a ``LossOutput`` whose ``total / weight``, summed
over micro-batches, reproduces TRL's gradient-accumulated loss; each ``sums`` entry holds ``metric * weight`` so
that it reads as the metric once divided by the accumulated weight.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kithara.trainer.losses import LossOutput

Array = jax.Array | np.ndarray
_sg = jax.lax.stop_gradient


def _f32(x: Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _masked(x: Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, _f32(x), 0.0)


def _count(mask: jax.Array, axis: int | None = None) -> jax.Array:
    return mask.sum(axis).astype(jnp.float32)


def _nanstd(x: jax.Array, axis: int | None = None) -> jax.Array:
    """``trl.trainer.utils.nanstd``: NaN-ignoring std with Bessel's correction (NaN for fewer than 2 values)."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    var = var * jnp.where(count > 1, count / (count - 1), jnp.nan)
    return jnp.sqrt(var).reshape(()) if axis is None else jnp.sqrt(var).squeeze(axis)


# --- GRPO family -------------------------------------------------------------------------------------------------

# A normaliser takes the already-masked per-token loss, the mask and ``max_completion_length`` and returns
# ``(total, weight)``: TRL's per-micro-batch loss divided by its gradient-accumulation factor is ``total / weight``.
Normaliser = Callable[[jax.Array, jax.Array, int | None], tuple[jax.Array, jax.Array]]


def _sequence_mean(loss: jax.Array, mask: jax.Array, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    rows = loss.sum(-1) / jnp.maximum(_count(mask, -1), 1.0)
    return rows.sum(), jnp.float32(loss.shape[0])


def _batch_token_mean(loss: jax.Array, mask: jax.Array, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    return loss.sum() / jnp.maximum(_count(mask), 1.0), jnp.float32(1.0)


def _constant(loss: jax.Array, mask: jax.Array, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    if max_len is None:
        raise ValueError("loss_type='dr_grpo' divides by max_completion_length; pass it.")
    return loss.sum() / max_len, jnp.float32(loss.shape[0])


def _token_sum(loss: jax.Array, mask: jax.Array, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    return loss.sum(), _count(mask)


def _sequence_sum(loss: jax.Array, mask: jax.Array, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    return loss.sum(), jnp.float32(loss.shape[0])


POLICY_LOSSES: dict[str, Normaliser] = {
    "grpo": _sequence_mean,  # mean over rows of each row's token mean
    "sapo": _sequence_mean,  # soft sigmoid gate instead of the clip, grpo's normaliser
    "bnpo": _batch_token_mean,  # token mean of each micro-batch, averaged over micro-batches
    "dr_grpo": _constant,  # token sum / (rows * max_completion_length)
    "dapo": _token_sum,  # token mean over the whole accumulated batch
    "cispo": _token_sum,  # clipped, detached ratio times logp; dapo's normaliser
    "luspo": _sequence_sum,  # mean over rows of each row's token sum
}


def k3_kl(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """Schulman's k3 estimate of KL(policy || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = _f32(ref_logps_BxT) - _f32(logps_BxT)
    return jnp.exp(d) - d - 1


def policy_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    beta: float = 0.0,
    ref_logps_BxT: jax.Array | None = None,
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> LossOutput:
    """GRPOTrainer's loss for one micro-batch. Ratio ``r = exp(logp - old)`` per token, or per sequence with
    ``importance_sampling_level="sequence"`` (GSPO: ``exp`` of the row's masked mean log-ratio, broadcast to its
    tokens). Surrogate: PPO-clip ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` with ``r`` capped at ``delta`` in
    the first term (INTELLECT-2); CISPO ``-sg(min(r, epsilon_high)) A logp`` (``epsilon_high`` is then an absolute
    cap, e.g. 5.0); SAPO ``-4/tau sigmoid(tau (r - 1)) A``. With ``beta != 0`` adds ``beta * k3_kl`` per token,
    times ``r`` when ``use_bias_correction_kl`` (TRL's default). ``POLICY_LOSSES[loss_type]`` gives
    ``(total, weight)``. Metrics: ``kl``; the clip family's ``clip_ratio/{low,high,region}_mean``; CISPO's
    ``cispo_clip_ratio``."""
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; known: {sorted(POLICY_LOSSES)}.")
    mask = jnp.asarray(mask_BxT).astype(bool)
    logps = _masked(logps_BxT, mask)
    log_ratio = logps - _sg(_masked(old_logps_BxT, mask))
    adv = _f32(advantages_B)[:, None]
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = log_ratio.sum(-1, keepdims=True) / jnp.maximum(_count(mask, -1), 1.0)[:, None]
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}.")
    coef_1 = jnp.exp(log_w)  # Bx1 at sequence level, BxT at token level

    kl = None
    if beta != 0.0:
        if ref_logps_BxT is None:
            raise ValueError("beta != 0 needs ref_logps_BxT.")
        kl = k3_kl(logps, _masked(ref_logps_BxT, mask))
        kl = kl * coef_1 if use_bias_correction_kl else kl

    flags: dict[str, jax.Array] = {}
    if loss_type == "cispo":
        per_token = -_sg(jnp.minimum(coef_1, epsilon_high)) * adv * logps
        flags["cispo_clip_ratio"] = (coef_1 > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -jax.nn.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        coef_2 = jnp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)
        low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        flags.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high})
    per_token = jnp.broadcast_to(per_token, mask.shape)
    if kl is not None:
        per_token = per_token + beta * kl
    total, weight = POLICY_LOSSES[loss_type](jnp.where(mask, per_token, 0.0), mask, max_completion_length)

    def mean(x: jax.Array) -> jax.Array:  # TRL's global_masked_mean: a Bx1 flag is a plain mean over rows
        if x.shape[1] == 1:
            return x.astype(jnp.float32).mean()
        return jnp.where(mask, x, 0).sum().astype(jnp.float32) / jnp.maximum(_count(mask), 1.0)

    metrics = dict(flags, kl=kl) if kl is not None else flags
    return LossOutput(total=total, weight=weight, sums={k: mean(v) * weight for k, v in metrics.items()})


def group_advantages(
    rewards_N: Array, num_generations: int, scale_rewards: str = "group"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GRPO advantages: reward minus its group's mean, divided by ``std + 1e-4`` of the group (``"group"``) or of
    all N rows (``"batch"``), or not divided (``"none"``). Rows ``g*k .. g*k+k-1`` are one prompt's ``k`` completions.
    Std is Bessel-corrected; NaN rewards are left out of the statistics and get advantage 0. Returns
    ``(advantages_N, std_N, std_is_zero_N)`` with ``std_N`` the std used (the group std for ``"none"``)."""
    rewards = _f32(rewards_N)
    k = num_generations
    if rewards.ndim != 1 or rewards.shape[0] % k:
        raise ValueError(f"rewards_N must be 1-D with a length divisible by num_generations={k}.")
    grouped = rewards.reshape(-1, k)
    mean_N = jnp.repeat(jnp.nanmean(grouped, axis=1), k)
    if scale_rewards in ("group", "none"):
        std_N = jnp.repeat(_nanstd(grouped, axis=1), k) if k > 1 else jnp.zeros_like(rewards)
    elif scale_rewards == "batch":
        std_N = jnp.broadcast_to(_nanstd(rewards), rewards.shape) if rewards.size > 1 else jnp.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}.")
    adv_N = rewards - mean_N
    if scale_rewards != "none":
        adv_N = adv_N / (std_N + 1e-4)
    return jnp.nan_to_num(adv_N, nan=0.0), std_N, jnp.isclose(std_N, 0.0)


# --- RLOO --------------------------------------------------------------------------------------------------------


def rloo_sequence_rewards(
    rewards_N: Array,
    logps_NxT: Array,
    ref_logps_NxT: Array,
    mask_NxT: Array,
    *,
    beta: float,
    kl_estimator: str = "k1",
    reward_clip_range: tuple[float, float] | None = None,
) -> jax.Array:
    """RLOO's KL-shaped sequence reward: ``clip(reward) - beta * sum_t kl_t`` over the masked tokens, ``kl_t`` from
    ``per_token_kl_penalty``. ``logps_NxT`` are the sampling policy's ("old") log-probs. TRL's RLOO always uses
    ``"k1"``; ``"k3"`` is offered as PPO's alternative."""
    rewards = _f32(rewards_N)
    if reward_clip_range is not None:
        rewards = jnp.clip(rewards, reward_clip_range[0], reward_clip_range[1])
    if beta == 0.0:
        return rewards
    mask = jnp.asarray(mask_NxT).astype(bool)
    kl = per_token_kl_penalty(_masked(logps_NxT, mask), _masked(ref_logps_NxT, mask), kl_estimator)
    return rewards - beta * jnp.where(mask, kl, 0.0).sum(-1)


def rloo_advantages(rewards_N: Array, num_generations: int, *, normalize_advantages: bool = False) -> jax.Array:
    """Leave-one-out advantages: ``r_i`` minus the mean of the other scorable (non-NaN) rewards of its group; with
    ``normalize_advantages`` (TRL's RLOOConfig option, default False) then standardised over all N rows
    (``(a - mean) / (std + 1e-4)``, Bessel-corrected std). NaN (unscorable) rows, or a group's only scorable row,
    get 0."""
    rewards = _f32(rewards_N)
    k = num_generations
    if rewards.ndim != 1 or rewards.shape[0] % k:
        raise ValueError(f"rewards_N must be 1-D with a length divisible by num_generations={k}.")
    if k > 1:
        grouped = rewards.reshape(-1, k)
        counts = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
        baselines = (jnp.nansum(grouped, axis=1, keepdims=True) - grouped) / (counts - 1)
        adv_N = rewards - baselines.reshape(-1)
    else:
        adv_N = jnp.zeros_like(rewards)
    if normalize_advantages:
        adv_N = (adv_N - jnp.nanmean(adv_N)) / (_nanstd(adv_N) + 1e-4)
    return jnp.nan_to_num(adv_N, nan=0.0)


def rloo_policy_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> LossOutput:
    """RLOOTrainer's loss: one ratio per sequence, ``exp(sum logp - sum old)`` over masked tokens (not length
    normalised), PPO-clipped against the sequence advantage, mean over rows (``weight`` = rows). Metrics as
    ``policy_loss``'s clip ratios, per row."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    coef_1 = jnp.exp(_masked(logps_BxT, mask).sum(-1) - _sg(_masked(old_logps_BxT, mask).sum(-1)))
    adv = _f32(advantages_B)
    coef_2 = jnp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    weight = jnp.float32(adv.shape[0])
    low = (coef_1 < 1 - epsilon_low) & (adv < 0)
    high = (coef_1 > 1 + epsilon_high) & (adv > 0)
    flags = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    return LossOutput(
        total=-jnp.minimum(coef_1 * adv, coef_2 * adv).sum(),
        weight=weight,
        sums={k: v.sum().astype(jnp.float32) for k, v in flags.items()},
    )


# --- PPO ---------------------------------------------------------------------------------------------------------


def per_token_kl_penalty(logps_BxT: jax.Array, ref_logps_BxT: jax.Array, kl_estimator: str = "k1") -> jax.Array:
    """Per-token KL estimate for reward shaping, with ``logr = ref - logp``: ``"k1"`` is ``-logr``, ``"k3"`` is
    ``(exp(logr) - 1) - logr``. Unmasked; callers mask."""
    logr = _f32(ref_logps_BxT) - _f32(logps_BxT)
    if kl_estimator == "k1":
        return -logr
    if kl_estimator == "k3":
        return (jnp.exp(logr) - 1) - logr
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}.")


def gae(
    rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation by a reverse ``lax.scan``: ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, returns ``A + V``. Rewards and values outside the mask count as 0, so the
    value after a row's last valid position is 0 (TRL passes its ``padding_mask_p1`` here: one position past the
    last token, where the score sits). Masked positions of both outputs are 0."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    rewards, values = _masked(rewards_BxT, mask), _masked(values_BxT, mask)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    delta_TxB = (rewards + gamma * next_values - values).T

    def step(last_B: jax.Array, delta_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        last_B = delta_B + gamma * lam * last_B
        return last_B, last_B

    _, adv_TxB = jax.lax.scan(step, jnp.zeros_like(delta_TxB[0]), delta_TxB, reverse=True)
    advantages = jnp.where(mask, adv_TxB.T, 0.0)
    return advantages, jnp.where(mask, advantages + values, 0.0)


def whiten(values_BxT: jax.Array, mask_BxT: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """TRL's ``masked_whiten``: ``(x - mean) * rsqrt(var + 1e-8)`` with the masked mean and the masked, Bessel-corrected
    (``n / (n - 1)``) variance; ``shift_mean=False`` adds the mean back. Needs >= 2 valid positions. Masked positions
    are 0 (TRL fills them with 0 right after)."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    x = _masked(values_BxT, mask)
    n = _count(mask)
    mean = x.sum() / n
    var = jnp.where(mask, (x - mean) ** 2, 0.0).sum() / n * (n / (n - 1))
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return jnp.where(mask, out if shift_mean else out + mean, 0.0)


def ppo_policy_loss(
    logps_BxT: jax.Array, old_logps_BxT: jax.Array, advantages_BxT: jax.Array, mask_BxT: jax.Array, *, cliprange: float
) -> LossOutput:
    """PPO's clipped surrogate per token, ``max(-A r, -A clip(r, 1 - c, 1 + c))``, token mean (``weight`` = valid
    tokens). Metrics: ``policy/clipfrac_avg`` (token fraction where the clipped term is larger) and
    ``policy/approxkl_avg`` = ``0.5 * mean((logp - old)^2)`` over *all* B*T positions as TRL (its padding diff is 0)."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    diff = _masked(logps_BxT, mask) - _sg(_masked(old_logps_BxT, mask))
    adv = _sg(_masked(advantages_BxT, mask))
    ratio = jnp.exp(diff)
    pg1, pg2 = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    count = _count(mask)
    approxkl = 0.5 * _sg(diff**2).sum() / diff.size
    return LossOutput(
        total=jnp.where(mask, jnp.maximum(pg1, pg2), 0.0).sum(),
        weight=count,
        sums={"policy/clipfrac_avg": _count(mask & (pg2 > pg1)), "policy/approxkl_avg": approxkl * count},
    )


def ppo_value_loss(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    cliprange_value: float,
    vf_coef: float,
) -> LossOutput:
    """PPO's clipped value loss times ``vf_coef``: ``vf_coef * 0.5 * max((v - R)^2, (clip(v, old +- c) - R)^2)``,
    token mean (``weight`` = valid tokens). Metrics: ``value/clipfrac_avg`` (fraction where the clipped term is larger)
    and ``value/loss_avg`` (the loss without ``vf_coef``, TRL's ``loss/value_avg``)."""
    mask = jnp.asarray(mask_BxT).astype(bool)
    v = _masked(values_BxT, mask)
    old, ret = _sg(_masked(old_values_BxT, mask)), _sg(_masked(returns_BxT, mask))
    l1 = jnp.square(v - ret)
    l2 = jnp.square(jnp.clip(v, old - cliprange_value, old + cliprange_value) - ret)
    half_sum = 0.5 * jnp.where(mask, jnp.maximum(l1, l2), 0.0).sum()
    return LossOutput(
        total=vf_coef * half_sum,
        weight=_count(mask),
        sums={"value/clipfrac_avg": _count(mask & (l2 > l1)), "value/loss_avg": _sg(half_sum)},
    )
