"""Numeric tests of kithara.objectives.rl_losses: each function against a hand-written numpy formula and against
TRL 1.16.0 (its real GRPOTrainer / RLOOTrainer ``_compute_loss`` on a bare instance; where TRL's code is part of a
larger method, the lines are transcribed below with file + function named). torch / trl import lazily."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kithara.objectives import rl_losses as rl

B, T, K = 6, 7, 3  # 2 prompts x 3 generations, 7 completion positions
LENGTHS = np.array([7, 5, 1, 3, 6, 4])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
RNG = np.random.default_rng(0)
LOGPS = (-RNG.uniform(0.05, 3.0, (B, T))).astype(np.float32)
# Row offsets put some ratios beyond every clip bound (token and sequence level) on both advantage signs.
OLD = (LOGPS + np.array([-0.3, 0.2, 0.25, -0.35, -0.3, 0.1])[:, None] + RNG.normal(0.0, 0.3, (B, T))).astype(np.float32)
REF = (LOGPS + RNG.normal(0.0, 0.5, (B, T))).astype(np.float32)
ADV = np.array([1.2, -0.7, -0.5, 0.9, -1.1, 0.2], np.float32)
# Group 0 has ties, group 1 is constant (std 0), group 2 mixed; a NaN marks an unscorable completion.
REWARDS = np.array([1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0, -1.0, 0.25], np.float32)


def garbage(x: np.ndarray, mask: np.ndarray = MASK) -> np.ndarray:
    """``x`` with NaN / huge values at the masked positions: they must not reach any result."""
    pad = np.resize(np.array([np.nan, 1e30, -1e30, np.inf], np.float32), x.shape)
    return np.where(mask, x, pad).astype(np.float32)


def clean(x: np.ndarray, mask: np.ndarray = MASK) -> np.ndarray:
    return np.where(mask, x, 0.0).astype(np.float32)


# --- hand formulas (numpy, float64) -----------------------------------------------------------------------------


def np_std(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    return np.std(x, axis=axis, ddof=1)


def np_policy_loss(lt, lp, old, adv, m, *, eps_lo=0.2, eps_hi=0.2, level="token", delta=None, beta=0.0, ref=None,
                   bias=True, max_len=None, tpos=1.0, tneg=1.05):  # fmt: skip
    lp, old, adv = (np.asarray(a, np.float64) for a in (lp, old, adv))
    n = m.sum(1)
    log_ratio = np.where(m, lp - old, 0.0)
    if level == "sequence":
        log_ratio = np.repeat((log_ratio.sum(1) / np.maximum(n, 1))[:, None], lp.shape[1], 1)
    r, a = np.exp(log_ratio), adv[:, None]
    if lt == "cispo":
        loss = -np.minimum(r, eps_hi) * a * lp
    elif lt == "sapo":
        tau = np.where(a > 0, tpos, tneg)
        loss = -(4 / tau) / (1 + np.exp(-tau * (r - 1))) * a
    else:
        r1 = r if delta is None else np.minimum(r, delta)
        loss = -np.minimum(r1 * a, np.clip(r, 1 - eps_lo, 1 + eps_hi) * a)
    if beta:
        d = np.asarray(ref, np.float64) - lp
        loss = loss + beta * (np.exp(d) - d - 1) * (r if bias else 1.0)
    loss = np.where(m, loss, 0.0)
    return {
        "grpo": lambda: (loss.sum(1) / np.maximum(n, 1)).mean(),
        "sapo": lambda: (loss.sum(1) / np.maximum(n, 1)).mean(),
        "bnpo": lambda: loss.sum() / n.sum(),
        "dr_grpo": lambda: loss.sum() / (len(n) * max_len),
        "dapo": lambda: loss.sum() / n.sum(),
        "cispo": lambda: loss.sum() / n.sum(),
        "luspo": lambda: loss.sum(1).mean(),
    }[lt]()


# --- TRL harness ------------------------------------------------------------------------------------------------


class FakeAccelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_grpo_losses(lt, logps_t, old, adv, mask, *, micro_batches=1, eps_lo=0.2, eps_hi=0.2, level="token",
                    delta=None, beta=0.0, ref=None, bias=True, max_len=None):  # fmt: skip
    """Calls TRL 1.16.0 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) on a bare instance, once per
    micro-batch (contiguous row slices) with gradient accumulation over them; returns (losses, metrics)."""
    import torch
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=lt, epsilon_low=eps_lo, epsilon_high=eps_hi,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=micro_batches, max_completion_length=max_len,
        accelerator=FakeAccelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=bias, sapo_temperature_pos=1.0,
                             sapo_temperature_neg=1.05, steps_per_generation=micro_batches),
    )  # fmt: skip
    mask_t = torch.tensor(mask, dtype=torch.long)
    losses = []
    for rows in np.array_split(np.arange(len(mask)), micro_batches):
        sl = slice(rows[0], rows[-1] + 1)
        trainer._get_per_token_logps_and_entropies = lambda *a, sl=sl, **k: (
            logps_t[sl],
            torch.zeros_like(logps_t[sl]),
            None,
        )
        inputs = {
            "prompt_ids": torch.zeros((len(rows), 1), dtype=torch.long),
            "prompt_mask": torch.ones((len(rows), 1), dtype=torch.long),
            "completion_ids": torch.zeros((len(rows), mask.shape[1]), dtype=torch.long),
            "completion_mask": mask_t[sl],
            "advantages": torch.tensor(adv[sl]),
            "old_per_token_logps": torch.tensor(old[sl]),
            "num_items_in_batch": mask_t.sum(),  # spans the whole generation batch
        }
        if beta:
            inputs["ref_per_token_logps"] = torch.tensor(ref[sl])
        losses.append(trainer._compute_loss(None, inputs))
    return losses, trainer._metrics["train"]


def ours(lt, logps, old, adv, mask, **kw):
    return rl.policy_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), loss_type=lt,
                          **kw)  # fmt: skip


KW_OURS = dict(eps_lo="epsilon_low", eps_hi="epsilon_high", level="importance_sampling_level", delta="delta",
               beta="beta", bias="use_bias_correction_kl", max_len="max_completion_length")  # fmt: skip
CASES = [
    *[(lt, {}) for lt in ("grpo", "bnpo", "dapo", "luspo", "sapo")],
    ("dr_grpo", {"max_len": T}),
    ("cispo", {"eps_hi": 1.1}),
    ("grpo", {"level": "sequence"}),
    ("dapo", {"level": "sequence"}),
    ("luspo", {"level": "sequence"}),
    ("grpo", {"eps_lo": 0.1, "eps_hi": 0.28}),
    ("dapo", {"eps_lo": 0.25, "eps_hi": 0.05}),
    ("grpo", {"delta": 1.25}),
    ("grpo", {"beta": 0.04}),
    ("dapo", {"beta": 0.1, "bias": False}),
    ("grpo", {"beta": 0.1, "level": "sequence", "eps_hi": 0.28}),
    ("sapo", {"beta": 0.04}),
    ("bnpo", {"beta": 0.04, "delta": 1.3}),
]


def case_kwargs(kw):
    ours_kw = {KW_OURS[k]: v for k, v in kw.items()}
    if kw.get("beta"):
        ours_kw["ref_logps_BxT"] = jnp.asarray(garbage(REF))
    return ours_kw


@pytest.mark.parametrize(("lt", "kw"), CASES)
def test_policy_loss_matches_hand_formula(lt, kw):
    out = ours(lt, garbage(LOGPS), garbage(OLD), ADV, MASK, **case_kwargs(kw))
    want = np_policy_loss(lt, clean(LOGPS), clean(OLD), ADV, MASK, ref=clean(REF), **kw)
    np.testing.assert_allclose(out.total / out.weight, want, rtol=2e-6, atol=1e-7)
    assert all(np.isfinite(v) for v in out.sums.values())


@pytest.fixture(scope="module")
def torch_trl():
    import torch
    import trl.trainer.grpo_trainer  # one import for the module, ~10 s

    assert trl.__version__ == "1.16.0"
    return torch


@pytest.mark.parametrize(("lt", "kw"), CASES)
def test_policy_loss_matches_trl(torch_trl, lt, kw):
    torch = torch_trl
    trl_kw = dict(kw, ref=clean(REF))
    # One micro-batch: loss and every logged metric.
    losses, metrics = trl_grpo_losses(lt, torch.tensor(clean(LOGPS)), clean(OLD), ADV, MASK, **trl_kw)
    out = ours(lt, garbage(LOGPS), garbage(OLD), ADV, MASK, **case_kwargs(kw))
    np.testing.assert_allclose(out.total / out.weight, losses[0].item(), rtol=2e-6, atol=1e-7)
    assert set(out.sums) == {k for k in metrics if k.endswith("_mean") or k in ("kl", "cispo_clip_ratio")}
    for key, value in out.sums.items():
        np.testing.assert_allclose(value / out.weight, metrics[key][0], rtol=2e-6, atol=1e-7, err_msg=key)

    # Two micro-batches of 3 rows with gradient accumulation: summed TRL losses and their autograd gradient
    # equal sum(total) / sum(weight) and its jax.grad.
    logps_t = torch.tensor(clean(LOGPS), requires_grad=True)
    losses, _ = trl_grpo_losses(lt, logps_t, clean(OLD), ADV, MASK, micro_batches=2, **trl_kw)
    trl_loss = sum(losses)
    trl_loss.backward()

    def accumulated(logps):
        outs = []
        for s in (slice(0, 3), slice(3, 6)):
            kw_s = {k: (v[s] if k == "ref_logps_BxT" else v) for k, v in case_kwargs(kw).items()}
            outs.append(ours(lt, logps[s], garbage(OLD)[s], ADV[s], MASK[s], **kw_s))
        return sum(o.total for o in outs) / sum(o.weight for o in outs)

    value, grad = jax.value_and_grad(accumulated)(jnp.asarray(garbage(LOGPS)))
    np.testing.assert_allclose(value, trl_loss.item(), rtol=2e-6, atol=1e-7)
    assert np.isfinite(grad).all() and (np.asarray(grad)[~MASK] == 0).all()
    np.testing.assert_allclose(grad, logps_t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_policy_loss_gradient_matches_finite_difference():
    rng = np.random.default_rng(10)

    def f(logps):
        out = rl.policy_loss(logps, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK), loss_type="dapo",
                             beta=0.1, ref_logps_BxT=jnp.asarray(REF), epsilon_high=0.28)  # fmt: skip
        return out.total / out.weight

    x = jnp.asarray(LOGPS, jnp.float32)
    grad = np.asarray(jax.grad(f)(x))
    direction = np.where(MASK, rng.normal(size=(B, T)), 0.0).astype(np.float32)
    h = 1e-3
    fd = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    np.testing.assert_allclose((grad * direction).sum(), fd, rtol=2e-3)


def test_policy_loss_rejects_bad_arguments():
    args = (jnp.asarray(LOGPS), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK))
    with pytest.raises(ValueError, match="loss_type"):
        rl.policy_loss(*args, loss_type="vespo")
    with pytest.raises(ValueError, match="max_completion_length"):
        rl.policy_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        rl.policy_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        rl.policy_loss(*args, importance_sampling_level="row")


def test_policy_loss_jits():
    f = jax.jit(lambda lp: rl.policy_loss(lp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK), loss_type="dapo"))
    out = f(jnp.asarray(garbage(LOGPS)))
    np.testing.assert_allclose(out.total / out.weight, np_policy_loss("dapo", LOGPS, OLD, ADV, MASK), rtol=2e-6)


def test_k3_kl_hand_formula():
    d = REF.astype(np.float64) - LOGPS
    np.testing.assert_allclose(rl.k3_kl(LOGPS, REF), np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    assert (np.asarray(rl.k3_kl(LOGPS, REF)) >= 0).all()


# --- GRPO advantages ---------------------------------------------------------------------------------------------


def trl_group_advantages(rewards: np.ndarray, k: int, scale_rewards: str):
    """Transcribed from TRL 1.16.0 trl/trainer/grpo_trainer.py GRPOTrainer._generate_and_score_completions
    (multi_objective_aggregation="sum_then_normalize"), with TRL's own nanstd."""
    import torch
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(rewards)
    num_generations = k
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages.numpy(), std_rewards.numpy(), is_std_zero.numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_hand_formula(scale):
    adv, std, zero = rl.group_advantages(REWARDS, K, scale)
    g = REWARDS.astype(np.float64).reshape(-1, K)
    centred = (g - g.mean(1, keepdims=True)).reshape(-1)
    group_std = np.repeat(np_std(g, 1), K)
    want_std = np.full(len(REWARDS), np_std(REWARDS.astype(np.float64))) if scale == "batch" else group_std
    want = centred if scale == "none" else centred / (want_std + 1e-4)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=1e-6, atol=1e-7)
    assert (np.asarray(adv)[3:6] == 0).all()  # the constant group: exactly 0 whatever the scaling
    want_zero = [False] * 9 if scale == "batch" else [False] * 3 + [True] * 3 + [False] * 3
    assert list(np.asarray(zero)) == want_zero
    assert isinstance(adv, jax.Array) and adv.dtype == jnp.float32


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("with_nan", [False, True])
def test_group_advantages_match_trl(torch_trl, scale, with_nan):
    rewards = REWARDS.copy()
    if with_nan:  # an unscorable completion: out of its group's mean and std, advantage 0
        rewards[1] = np.nan
    got = rl.group_advantages(jnp.asarray(rewards), K, scale)
    for ours_x, trl_x in zip(got, trl_group_advantages(rewards, K, scale), strict=True):
        np.testing.assert_allclose(ours_x, trl_x, rtol=1e-6, atol=1e-7)
    if with_nan:
        assert np.asarray(got[0])[1] == 0


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="divisible"):
        rl.group_advantages(REWARDS[:8], K)
    with pytest.raises(ValueError, match="scale_rewards"):
        rl.group_advantages(REWARDS, K, "max")


# --- RLOO --------------------------------------------------------------------------------------------------------


def trl_rloo_rewards_and_advantages(rewards, logps, ref, mask, k, *, beta, normalize, clip=None):
    """Transcribed from TRL 1.16.0 trl/trainer/rloo_trainer.py RLOOTrainer._generate_and_score_completions."""
    import torch
    from trl.trainer.utils import nanstd

    rewards, completion_mask = torch.tensor(rewards), torch.tensor(mask, dtype=torch.long)
    old_per_token_logps, ref_per_token_logps = torch.tensor(logps), torch.tensor(ref)
    if clip:
        rewards = rewards.clamp(min=clip[0], max=clip[1])
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    shaped = rewards.clone()
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return shaped.numpy(), torch.nan_to_num(advantages, nan=0.0).numpy()


def test_rloo_advantages_hand_formula():
    g = REWARDS.astype(np.float64).reshape(-1, K)
    want = (g - (g.sum(1, keepdims=True) - g) / (K - 1)).reshape(-1)
    adv = rl.rloo_advantages(REWARDS, K)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-6)
    assert (np.asarray(adv)[3:6] == 0).all()
    norm = rl.rloo_advantages(REWARDS, K, normalize_advantages=True)
    np.testing.assert_allclose(norm, (want - want.mean()) / (np_std(want) + 1e-4), rtol=1e-5, atol=1e-6)


def test_rloo_sequence_rewards_hand_formula():
    rng = np.random.default_rng(20)
    mask9 = np.arange(T)[None, :] < np.array([7, 5, 1, 3, 6, 4, 2, 7, 5])[:, None]
    lp = rng.normal(-1, 0.5, (9, T)).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, (9, T))).astype(np.float32)
    d = np.where(mask9, lp.astype(np.float64) - ref, 0.0)
    got = rl.rloo_sequence_rewards(REWARDS, garbage(lp, mask9), garbage(ref, mask9), mask9, beta=0.05)
    np.testing.assert_allclose(got, REWARDS - 0.05 * d.sum(1), rtol=1e-6, atol=1e-6)
    k3 = np.where(mask9, np.exp(-d) - 1 + d, 0.0).sum(1)
    got3 = rl.rloo_sequence_rewards(REWARDS, lp, ref, mask9, beta=0.05, kl_estimator="k3", reward_clip_range=(0, 1))
    np.testing.assert_allclose(got3, np.clip(REWARDS, 0, 1) - 0.05 * k3, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rl.rloo_sequence_rewards(REWARDS, lp, ref, mask9, beta=0.0), REWARDS)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_nan", [False, True])
def test_rloo_rewards_and_advantages_match_trl(torch_trl, normalize, with_nan):
    rng = np.random.default_rng(21)
    mask9 = np.arange(T)[None, :] < np.array([7, 5, 1, 3, 6, 4, 2, 7, 5])[:, None]
    lp = rng.normal(-1, 0.5, (9, T)).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, (9, T))).astype(np.float32)
    rewards = REWARDS.copy()
    if with_nan:
        rewards[7] = np.nan
    want_r, want_a = trl_rloo_rewards_and_advantages(
        rewards, clean(lp, mask9), clean(ref, mask9), mask9, K, beta=0.05, normalize=normalize, clip=(-0.5, 1.5)
    )
    shaped = rl.rloo_sequence_rewards(rewards, garbage(lp, mask9), garbage(ref, mask9), mask9, beta=0.05,
                                      reward_clip_range=(-0.5, 1.5))  # fmt: skip
    np.testing.assert_allclose(shaped, want_r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rl.rloo_advantages(shaped, K, normalize_advantages=normalize), want_a, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_rloo_policy_loss_matches_hand_and_trl(torch_trl):
    rng = np.random.default_rng(22)
    import torch
    from trl.trainer.rloo_trainer import RLOOTrainer

    old = (LOGPS + rng.normal(0.0, 0.15, (B, T))).astype(np.float32)  # sequence sums: keep ratios near 1
    out = rl.rloo_policy_loss(garbage(LOGPS), garbage(old), ADV, MASK, epsilon_low=0.2, epsilon_high=0.28)
    r = np.exp(clean(LOGPS).astype(np.float64).sum(1) - clean(old).sum(1))
    want = -np.minimum(r * ADV, np.clip(r, 0.8, 1.28) * ADV).mean()
    np.testing.assert_allclose(out.total / out.weight, want, rtol=1e-5)  # float32 sums of 7 log-probs

    # TRL 1.16.0 trl/trainer/rloo_trainer.py RLOOTrainer._compute_loss on a bare instance.
    trainer = RLOOTrainer.__new__(RLOOTrainer)
    logps_t = torch.tensor(clean(LOGPS), requires_grad=True)
    trainer.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_t, torch.zeros_like(logps_t), None),
        aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.28, model=SimpleNamespace(training=True),
        accelerator=FakeAccelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    mask_t = torch.tensor(MASK, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": mask_t,
        "old_logps": (torch.tensor(old) * mask_t).sum(1),
        "advantages": torch.tensor(ADV),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    np.testing.assert_allclose(out.total / out.weight, loss.item(), rtol=2e-6)
    assert 0 < trainer._metrics["train"]["clip_ratio/region_mean"][0] < 1
    for key, value in out.sums.items():
        np.testing.assert_allclose(value / out.weight, trainer._metrics["train"][key][0], rtol=1e-6, err_msg=key)
    grad = jax.grad(lambda lp: rl.rloo_policy_loss(lp, garbage(old), ADV, MASK, epsilon_high=0.28).total / B)(
        jnp.asarray(garbage(LOGPS))
    )
    np.testing.assert_allclose(grad, logps_t.grad.numpy(), rtol=1e-5, atol=1e-7)


# --- PPO ---------------------------------------------------------------------------------------------------------
# TRL 1.16.0 ships no PPO trainer: the reference lines below are transcribed from trl/experimental/ppo/ppo_trainer.py
# (masked_mean, masked_var, masked_whiten, PPOTrainer.train) of TRL's main branch at commit fd09025884b6.


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_whiten(values, mask, shift_mean=True):
    import torch

    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_gae(rewards, values, gamma, lam):
    import torch

    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def test_gae_matches_python_loop_and_trl(torch_trl):
    rng = np.random.default_rng(26)
    torch = torch_trl
    gamma, lam = 0.97, 0.9
    rewards = rng.normal(0, 1, (B, T)).astype(np.float32)
    values = rng.normal(0, 1, (B, T)).astype(np.float32)
    adv, ret = rl.gae(garbage(rewards), garbage(values), MASK, gamma=gamma, lam=lam)
    want_a = np.zeros((B, T))
    for b in range(B):  # plain loop over each row's valid prefix; the value after its last position is 0
        last = 0.0
        for t in reversed(range(LENGTHS[b])):
            next_v = values[b, t + 1] if t + 1 < LENGTHS[b] else 0.0
            last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
            want_a[b, t] = last
    np.testing.assert_allclose(adv, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, np.where(MASK, want_a + values, 0), rtol=1e-5, atol=1e-5)
    # TRL's loop runs over the whole padded width with values and rewards zero-filled past the mask.
    trl_a, trl_r = trl_gae(torch.tensor(clean(rewards)), torch.tensor(clean(values)), gamma, lam)
    np.testing.assert_allclose(adv, trl_a.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret, trl_r.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_hand_and_trl(torch_trl, shift_mean):
    rng = np.random.default_rng(27)
    torch = torch_trl
    x = rng.normal(2.0, 3.0, (B, T)).astype(np.float32)
    got = rl.whiten(garbage(x), MASK, shift_mean=shift_mean)
    v = x[MASK].astype(np.float64)
    want = (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8) + (0 if shift_mean else v.mean())
    np.testing.assert_allclose(got, np.where(MASK, want, 0), rtol=1e-5, atol=1e-5)
    trl = trl_masked_whiten(torch.tensor(clean(x)), torch.tensor(MASK), shift_mean=shift_mean)
    np.testing.assert_allclose(got, np.where(MASK, trl.numpy(), 0), rtol=1e-6, atol=1e-6)


def test_ppo_policy_loss_matches_hand_and_trl(torch_trl):
    rng = np.random.default_rng(28)
    torch = torch_trl
    adv = rng.normal(0, 1, (B, T)).astype(np.float32)
    out = rl.ppo_policy_loss(garbage(LOGPS), garbage(OLD), garbage(adv), MASK, cliprange=0.2)
    d = clean(LOGPS).astype(np.float64) - clean(OLD)
    r = np.exp(d)
    per_token = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))
    np.testing.assert_allclose(out.total / out.weight, per_token[MASK].mean(), rtol=2e-6)
    # TRL: PPOTrainer.train's policy part, on INVALID_LOGPROB-filled (=1.0) padding as TRL feeds it.
    pad = torch.tensor(~MASK)
    new_logprobs = torch.masked_fill(torch.tensor(LOGPS), pad, 1.0)
    mb_logprobs = torch.masked_fill(torch.tensor(OLD), pad, 1.0)
    mb_advantage = torch.masked_fill(torch.tensor(adv), pad, 0)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)
    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), ~pad)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~pad)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    np.testing.assert_allclose(out.total / out.weight, pg_loss.item(), rtol=2e-6)
    assert 0 < pg_clipfrac < 1
    np.testing.assert_allclose(out.sums["policy/clipfrac_avg"] / out.weight, pg_clipfrac.item(), rtol=1e-6)
    np.testing.assert_allclose(out.sums["policy/approxkl_avg"] / out.weight, approxkl.item(), rtol=1e-5)
    grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, OLD, adv, MASK, cliprange=0.2).total)(jnp.asarray(LOGPS))
    assert (np.asarray(grad)[~MASK] == 0).all()


def test_ppo_value_loss_matches_hand_and_trl(torch_trl):
    rng = np.random.default_rng(29)
    torch = torch_trl
    v = rng.normal(0, 1, (B, T)).astype(np.float32)
    old = (v + rng.normal(0, 0.4, (B, T))).astype(np.float32)
    ret = rng.normal(0, 1, (B, T)).astype(np.float32)
    out = rl.ppo_value_loss(garbage(v), garbage(old), garbage(ret), MASK, cliprange_value=0.2, vf_coef=0.1)
    l1 = (v.astype(np.float64) - ret) ** 2
    l2 = (np.clip(v, old - 0.2, old + 0.2) - ret) ** 2
    np.testing.assert_allclose(out.total / out.weight, 0.1 * 0.5 * np.maximum(l1, l2)[MASK].mean(), rtol=2e-6)
    # TRL: PPOTrainer.train's value part (padding_mask_p1 plays MASK here).
    pad = torch.tensor(~MASK)
    vpred = torch.masked_fill(torch.tensor(v), pad, 0)
    mb_values, mb_return = torch.tensor(clean(old)), torch.tensor(clean(ret))
    vpredclipped = torch.clamp(vpred, mb_values - 0.2, mb_values + 0.2)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~pad)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~pad)
    np.testing.assert_allclose(out.total / out.weight, 0.1 * vf_loss.item(), rtol=2e-6)
    np.testing.assert_allclose(out.sums["value/loss_avg"] / out.weight, vf_loss.item(), rtol=2e-6)
    assert 0 < vf_clipfrac < 1
    np.testing.assert_allclose(out.sums["value/clipfrac_avg"] / out.weight, vf_clipfrac.item(), rtol=1e-6)
    grad = jax.grad(lambda x: rl.ppo_value_loss(x, old, ret, MASK, cliprange_value=0.2, vf_coef=0.1).total)(
        jnp.asarray(garbage(v))
    )
    assert np.isfinite(grad).all() and (np.asarray(grad)[~MASK] == 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_per_token_kl_penalty_matches_trl(torch_trl, estimator):
    torch = torch_trl
    got = rl.per_token_kl_penalty(LOGPS, REF, estimator)
    # TRL: PPOTrainer.train, "4. compute rewards".
    logr = torch.tensor(REF) - torch.tensor(LOGPS)
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    np.testing.assert_allclose(got, kl.numpy(), rtol=1e-6, atol=1e-7)
    d = REF.astype(np.float64) - LOGPS
    np.testing.assert_allclose(got, -d if estimator == "k1" else np.exp(d) - 1 - d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kl_estimator"):
        rl.per_token_kl_penalty(LOGPS, REF, "k2")


def test_cases_exercise_every_bound():
    """The fixed vectors reach each clip bound, so the parity tests above are not vacuous."""
    base = ours("grpo", LOGPS, OLD, ADV, MASK)
    assert all(base.sums[f"clip_ratio/{side}_mean"] > 0 for side in ("low", "high"))
    assert ours("grpo", LOGPS, OLD, ADV, MASK, delta=1.25).total != base.total
    seq = ours("grpo", LOGPS, OLD, ADV, MASK, importance_sampling_level="sequence")
    assert all(seq.sums[f"clip_ratio/{side}_mean"] > 0 for side in ("low", "high"))
    assert ours("cispo", LOGPS, OLD, ADV, MASK, epsilon_high=1.1).sums["cispo_clip_ratio"] > 0
