"""Online DPO, XPO and Nash-MD: losses against TRL's lines, pair selection by judge and by
reward (missing EOS penalty, undecided pairs), the mixture sampler, configs, and the demo."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, word_tokenizer

import kithara
from kithara.judges import BasePairwiseJudge
from kithara.objectives.nash_md import MixtureGenerator, MixtureVariables, NashMDTrainer, mixture_logits, nash_md_losses
from kithara.objectives.online_configs import NashMDConfig, OnlineDPOConfig, XPOConfig
from kithara.objectives.online_dpo import OnlineDPOTrainer, online_dpo_losses
from kithara.objectives.xpo import XPOTrainer, xpo_losses

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hi", "hello how", "how are you", "fine thanks", "bye", "ok ok", "you", "thanks hi"]
ROWS = [{"prompt": p} for p in PROMPTS]


def token_batch(seed, pairs=6, length=5):
    """TRL's layout: ``[2B, T]`` token log-probs (first half: completion 0 of each prompt,
    second half: completion 1) of the policy and the reference, a padding mask, and scores."""
    rng = np.random.default_rng(seed)
    logps = -rng.gamma(2.0, 0.5, (2 * pairs, length))
    ref = logps + rng.normal(0, 0.3, logps.shape)
    lengths = rng.integers(1, length + 1, 2 * pairs)
    mask = np.arange(length)[None] < lengths[:, None]
    scores = rng.normal(size=2 * pairs)
    scores[1] = scores[pairs + 1]  # a tie: TRL gives it to the first completion
    return logps, ref, mask, scores


def ours_pairs(x_2BxT):
    """TRL's ``[2B, ...]`` halves as kithara's ``[pairs, 2, ...]``."""
    half = x_2BxT.shape[0] // 2
    return np.stack([x_2BxT[:half], x_2BxT[half:]], axis=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_loss_equals_trls_lines_and_the_hand_formula(loss_type):
    logps, ref, mask, scores = token_batch(0)
    beta, batch_size = 0.3, logps.shape[0] // 2
    # TRL 1.16 OnlineDPOTrainer.training_step, transcribed.
    rewards = torch.tensor(scores)
    first_half, second_half = rewards.split(batch_size)
    tmask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    chosen_indices = batch_range + (~tmask * batch_size)
    rejected_indices = batch_range + (tmask * batch_size)
    cr_indices = torch.cat((chosen_indices, rejected_indices), dim=0)
    cr_logprobs, cr_ref_logprobs = torch.tensor(logps)[cr_indices], torch.tensor(ref)[cr_indices]
    cr_padding_mask = ~torch.tensor(mask)[cr_indices]
    cr_logprobs_sum = (cr_logprobs * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (cr_ref_logprobs * ~cr_padding_mask).sum(1)
    chosen_logprobs_sum, rejected_logprobs_sum = torch.split(cr_logprobs_sum, batch_size)
    chosen_ref_logprobs_sum, rejected_ref_logprobs_sum = torch.split(cr_ref_logprobs_sum, batch_size)
    logits = (chosen_logprobs_sum - rejected_logprobs_sum) - (chosen_ref_logprobs_sum - rejected_ref_logprobs_sum)
    trl = -F.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2

    first = OnlineDPOTrainer.rank_by_rewards(scores[:batch_size], scores[batch_size:])
    with jax.enable_x64(True):
        sums = [jnp.asarray(ours_pairs(np.where(mask, x, 0.0).sum(-1))) for x in (logps, ref)]
        ours = online_dpo_losses(*sums, jnp.asarray(first), jnp.full(batch_size, beta), loss_type)
        np.testing.assert_allclose(np.asarray(ours), trl.numpy(), rtol=1e-6)
    # By hand: chosen is the higher score's completion, ties to the first.
    s = np.where(mask, logps, 0).sum(-1) - np.where(mask, ref, 0).sum(-1)
    c = np.where(scores[:batch_size] >= scores[batch_size:], s[:batch_size], s[batch_size:])
    r = np.where(scores[:batch_size] >= scores[batch_size:], s[batch_size:], s[:batch_size])
    hand = np.log1p(np.exp(-beta * (c - r))) if loss_type == "sigmoid" else (c - r - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(trl.numpy(), hand, rtol=1e-6)


def test_xpo_loss_equals_trls_lines():
    logps, ref, mask, scores = token_batch(1)
    beta, alpha, half = 0.2, 0.05, logps.shape[0] // 2
    # TRL XPOTrainer._compute_losses: rows of model data (the policy's completions) and of ref data.
    t = {k: torch.tensor(np.where(mask, v, 0.0)) for k, v in {"pi": logps, "ref": ref}.items()}
    model_logprobs_model_data_sum, model_logprobs_ref_data_sum = t["pi"][:half].sum(1), t["pi"][half:].sum(1)
    ref_logprobs_model_data_sum, ref_logprobs_ref_data_sum = t["ref"][:half].sum(1), t["ref"][half:].sum(1)
    chosen_mask = torch.tensor(scores[:half] >= scores[half:])
    chosen_model_logprobs = torch.where(chosen_mask, model_logprobs_model_data_sum, model_logprobs_ref_data_sum)
    chosen_ref_logprobs = torch.where(chosen_mask, ref_logprobs_model_data_sum, ref_logprobs_ref_data_sum)
    chosen_log_ratios = chosen_model_logprobs - chosen_ref_logprobs
    rejected_model_logprobs = torch.where(~chosen_mask, model_logprobs_model_data_sum, model_logprobs_ref_data_sum)
    rejected_ref_logprobs = torch.where(~chosen_mask, ref_logprobs_model_data_sum, ref_logprobs_ref_data_sum)
    rejected_log_ratios = rejected_model_logprobs - rejected_ref_logprobs
    logits = chosen_log_ratios - rejected_log_ratios
    trl_dpo = -F.logsigmoid(beta * logits)
    trl_xpo = alpha * model_logprobs_ref_data_sum

    first = OnlineDPOTrainer.rank_by_rewards(scores[:half], scores[half:])
    with jax.enable_x64(True):
        sums = [jnp.asarray(ours_pairs(np.where(mask, x, 0.0).sum(-1))) for x in (logps, ref)]
        dpo, xpo = xpo_losses(*sums, jnp.asarray(first), jnp.full(half, beta), jnp.full(half, alpha), "sigmoid")
        np.testing.assert_allclose(np.asarray(dpo), trl_dpo.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(xpo), trl_xpo.numpy(), rtol=1e-6)


def test_nash_md_loss_and_its_gradient_equal_trls():
    logps, ref, mask, scores = token_batch(2)
    beta, half = 0.1, logps.shape[0] // 2
    logps, ref, mask = logps[:half], ref[:half], mask[:half]  # the policy's completions
    probability = 1 / (1 + np.exp(-(scores[:half] - scores[half:])))
    # TRL NashMDTrainer: padding filled with 0, then _compute_losses.
    model_logprobs_model_data = torch.tensor(np.where(mask, logps, 0.0), requires_grad=True)
    ref_logprobs_model_data = torch.tensor(np.where(mask, ref, 0.0))
    score = (torch.tensor(probability) - 0.5) * model_logprobs_model_data.sum(1)
    with torch.no_grad():
        log_ratio = model_logprobs_model_data - ref_logprobs_model_data
        kl_div_log = log_ratio.sum(1)
    kl_div_loss = (log_ratio * model_logprobs_model_data).sum(1)
    trl = beta * kl_div_loss - score
    trl.mean().backward()

    with jax.enable_x64(True):
        args = (jnp.asarray(ref), jnp.asarray(mask), jnp.asarray(probability), jnp.full(half, beta))
        loss, sc, kl = nash_md_losses(jnp.asarray(logps), *args)
        grad = jax.grad(lambda x: nash_md_losses(x, *args)[0].mean())(jnp.asarray(logps))
        np.testing.assert_allclose(np.asarray(loss), trl.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(sc), score.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(kl), kl_div_log.numpy(), rtol=1e-6, atol=1e-12)
        # TRL's padding is a masked_fill of the model's log-probs: no gradient reaches the model there.
        trl_grad = np.where(mask, model_logprobs_model_data.grad.numpy(), 0.0)
        np.testing.assert_allclose(np.where(mask, grad, 0.0), trl_grad, rtol=1e-6, atol=1e-12)
        assert np.abs(trl_grad).min(where=mask, initial=1.0) > 0  # every real token gets a gradient


def test_mixture_logits_equal_trls_geometric_mixture():
    rng = np.random.default_rng(3)
    policy, ref = rng.normal(size=(3, 11)) * 3, rng.normal(size=(3, 11)) * 3
    for m in (0.0, 0.3, 1.0):
        # TRL GeometricMixtureWrapper.forward.
        trl = F.log_softmax(m * torch.tensor(ref) + (1 - m) * torch.tensor(policy), dim=-1).numpy()
        ours = mixture_logits(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.float32(m))
        np.testing.assert_allclose(np.asarray(ours), trl, rtol=1e-5, atol=1e-5)


def mixture_reference(policy, ref, prompt, steps, m):
    """Greedy tokens from full forward passes of both models, mixed by the formula."""
    ids = list(prompt)
    for _ in range(steps):
        inputs = {"token_ids": jnp.asarray([ids]), "padding_mask": jnp.ones((1, len(ids)), bool)}
        lp = policy.apply(policy.variables, inputs, training=False)[0][:, -1]
        lr = ref.apply(ref.variables, inputs, training=False)[0][:, -1]
        ids.append(int(jnp.argmax(mixture_logits(lp, lr, jnp.float32(m)), -1)[0]))
    return ids[len(prompt) :]


def test_mixture_decoder_follows_the_formula_greedy_and_sampled():
    policy, ref = tiny_model(seed=0), tiny_model(seed=1)
    generator = MixtureGenerator(policy, ref)
    prompts = [[1, 5, 9], [1, 7]]

    def decode(m, rows=prompts, steps=4, temperature=0.0, seed=0):
        variables = MixtureVariables(policy.variables, ref.variables, jnp.float32(m))
        return generator.sample(
            rows, steps, variables=variables, temperature=temperature, top_k=None, top_p=None, min_p=None,
            stop_token_ids=[], seed=jax.random.key(seed),
        )[0]  # fmt: skip

    mixed = decode(0.5)
    assert mixed == [mixture_reference(policy, ref, p, 4, 0.5) for p in prompts]
    assert decode(0.0) == policy.generate(prompts, max_new_tokens=4, stop_token_ids=[])
    assert decode(1.0) == ref.generate(prompts, max_new_tokens=4, stop_token_ids=[])
    assert decode(0.0) != decode(1.0)  # the two models differ, so the check above means something
    # One sampled token from many copies of a prompt: its frequencies follow softmax(mixture / t).
    n, t, prompt = 4096, 0.02, [1, 5, 9]  # tiny random models: near-flat logits, so sharpen them
    drawn = np.array(decode(0.4, rows=[prompt] * n, steps=1, temperature=t, seed=7))[:, 0]
    inputs = {"token_ids": jnp.asarray([prompt]), "padding_mask": jnp.ones((1, 3), bool)}
    lp = policy.apply(policy.variables, inputs, training=False)[0][:, -1]
    lr = ref.apply(ref.variables, inputs, training=False)[0][:, -1]
    expected = np.asarray(jax.nn.softmax(mixture_logits(lp, lr, jnp.float32(0.4)) / t))[0]
    found = np.bincount(drawn, minlength=expected.size) / n
    # Total variation from the formula within sampling noise (its mean under the formula: ``noise``),
    # and far from either model alone.
    noise = 0.5 * np.sqrt(2 * expected * (1 - expected) / (np.pi * n)).sum()
    candidates = {"mixture": mixture_logits(lp, lr, jnp.float32(0.4)), "policy": lp, "ref": lr}
    tv = {name: 0.5 * np.abs(found - np.asarray(jax.nn.softmax(x / t))[0]).sum() for name, x in candidates.items()}
    assert tv["mixture"] < 1.5 * noise and min(tv["policy"], tv["ref"]) > 4 * noise, (tv, noise)


class LongerJudge(BasePairwiseJudge):
    """The longer completion (in words) wins; equal lengths are undecided (-1)."""

    def judge(self, prompts, completions, shuffle_order=True):
        return [
            -1 if len(a.split()) == len(b.split()) else int(len(b.split()) > len(a.split())) for a, b in completions
        ]


def make(trainer_class=OnlineDPOTrainer, config_class=OnlineDPOConfig, **kwargs):
    settings = dict(per_device_train_batch_size=1, max_new_tokens=4, max_length=12, max_steps=2, logging_steps=1,
                    save_strategy="no", learning_rate=1e-3, seed=1)  # fmt: skip
    settings.update(kwargs.pop("args", {}))
    return trainer_class(
        tiny_model(), train_dataset=ROWS, processing_class=word_tokenizer(), args=config_class(**settings), **kwargs
    )


def test_judge_picks_chosen_and_undecided_pairs_leave_the_loss():
    trainer = make(judge=LongerJudge())
    state = trainer.init_state()
    rollout = trainer.make_rollout(state, 0, list(range(8)))
    a, tok = rollout.arrays, trainer.tokenizer
    rows = len(a["token_ids"])
    assert rows == 16  # 8 prompts (1 per device x 8 devices), two completions each
    texts = []
    for i in range(rows):
        ids = a["labels"][i][a["completion_mask"][i]]
        texts.append(tok.decode(ids.tolist(), skip_special_tokens=True))
    verdicts = LongerJudge().judge(PROMPTS, [[texts[i], texts[i + 1]] for i in range(0, rows, 2)])
    assert -1 in verdicts and set(verdicts) - {-1}, verdicts  # both kinds occur with this seed
    np.testing.assert_array_equal(a["pair_weight"][0::2], [v != -1 for v in verdicts])
    np.testing.assert_array_equal(a["chosen_first"][0::2][np.array(verdicts) != -1],
                                  [v == 0 for v in verdicts if v != -1])  # fmt: skip
    assert rollout.metrics["objective/undecided_rate"] == pytest.approx(np.mean(np.array(verdicts) == -1))

    # The loss: TRL's sigmoid loss over the decided pairs only, on the model's own log-probs.
    batch = {k: jnp.asarray(v) for k, v in a.items()}
    out, _ = jax.jit(lambda v, b: trainer.compute_loss(v, b, jax.random.key(0), None))(state.model, batch)
    logps = trainer.model.token_logps(state.model, batch, batch["labels"], training=False)[0]
    sums = np.asarray(jnp.where(batch["completion_mask"], logps, 0).sum(-1)).reshape(-1, 2)
    ref = np.where(a["completion_mask"], a["ref_logps"], 0).sum(-1).reshape(-1, 2)
    r = sums - ref
    first = a["chosen_first"][0::2] > 0
    margin = np.where(first, r[:, 0] - r[:, 1], r[:, 1] - r[:, 0])
    valid = a["pair_weight"][0::2] > 0
    expected = np.log1p(np.exp(-0.1 * margin))[valid].sum()
    assert float(out.weight) == valid.sum()
    np.testing.assert_allclose(float(out.total), expected, rtol=1e-5)


def test_rewards_pick_chosen_with_the_missing_eos_penalty_and_none_means_undecided():
    def count_you(prompts, completions, completion_ids, **_):
        # "ok ok" rows have no reward (None): their pairs are undecided.
        return [None if p == "ok ok" else float(c.count("you")) for p, c in zip(prompts, completions, strict=True)]

    trainer = make(reward_funcs=count_you, args=dict(missing_eos_penalty=0.5, beta=[0.1, 0.2]))
    rollout = trainer.make_rollout(trainer.init_state(), 0, list(range(8)))
    a, tok = rollout.arrays, trainer.tokenizer
    texts, stopped = [], []
    for i in range(16):
        ids = a["labels"][i][a["completion_mask"][i]].tolist()
        texts.append(tok.decode(ids, skip_special_tokens=True))
        stopped.append(ids[-1] == tok.eos_id)
    prompts = [p for p in PROMPTS for _ in range(2)]
    rewards = np.array([np.nan if p == "ok ok" else t.count("you") for p, t in zip(prompts, texts, strict=True)])
    rewards = rewards - 0.5 * ~np.array(stopped)
    assert not all(stopped), "the penalty must apply to some completion for this test to mean anything"
    np.testing.assert_allclose(a["scores"], np.nan_to_num(rewards), rtol=1e-6)
    decided = ~np.isnan(rewards[0::2] + rewards[1::2])
    np.testing.assert_array_equal(a["pair_weight"][0::2] > 0, decided)
    np.testing.assert_array_equal((a["chosen_first"][0::2] > 0)[decided], (rewards[0::2] >= rewards[1::2])[decided])
    assert rollout.metrics["beta"] == 0.1 and a["beta"][0] == pytest.approx(0.1)
    assert trainer.make_rollout(trainer.init_state(), 1, list(range(8))).metrics["beta"] == 0.2  # epoch 1


class SoftLongerJudge(BasePairwiseJudge):
    """P(first is better): 0.8 when it has more words, 0.3 when fewer; -1 on a tie. Without
    ``return_scores``, the index of the longer."""

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        out = []
        for a, b in completions:
            la, lb = len(a.split()), len(b.split())
            out.append(-1 if la == lb else (0.8 if la > lb else 0.3) if return_scores else int(lb > la))
        return out


def rollout_of(trainer, perturb):
    """A rollout of all 8 prompts and its batch, with the policy moved off the reference
    (so the log-ratios are not all zero) when ``perturb``."""
    state = trainer.init_state()
    if perturb:
        moved = {p: v * 1.1 if "kernel" in p else v for p, v in state.model.trainable.items()}
        state = dataclasses.replace(state, model=dataclasses.replace(state.model, trainable=moved))
    rollout = trainer.make_rollout(state, 0, list(range(8)))
    batch = {k: jnp.asarray(v) for k, v in rollout.arrays.items()}
    out, _ = jax.jit(lambda v, b: trainer.compute_loss(v, b, jax.random.key(0), None))(state.model, batch)
    logps = trainer.model.token_logps(state.model, batch, batch["labels"], training=False)[0]
    return rollout.arrays, out, np.asarray(logps, np.float64)


def test_xpo_loss_on_a_rollout_is_dpo_plus_alpha_times_the_reference_completions_logp():
    trainer = make(XPOTrainer, XPOConfig, judge=LongerJudge(), args={"alpha": 0.3})
    a, out, logps = rollout_of(trainer, perturb=True)
    mask = a["completion_mask"]
    policy = np.where(mask, logps, 0).sum(-1).reshape(-1, 2)  # [policy completion, reference completion]
    ref = np.where(mask, a["ref_logps"], 0).sum(-1).reshape(-1, 2)
    r = policy - ref
    first, valid = a["chosen_first"][0::2] > 0, a["pair_weight"][0::2] > 0
    assert valid.any() and not valid.all()  # decided and undecided pairs both occur
    margin = np.where(first, r[:, 0] - r[:, 1], r[:, 1] - r[:, 0])
    expected = (np.log1p(np.exp(-0.1 * margin)) + 0.3 * policy[:, 1])[valid].sum()
    np.testing.assert_allclose(float(out.total), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["loss/xpo"]), (0.3 * policy[:, 1])[valid].sum(), rtol=1e-5)


def test_nash_md_loss_on_a_rollout_uses_the_judges_probabilities_and_the_policys_row():
    trainer = make(NashMDTrainer, NashMDConfig, judge=SoftLongerJudge())
    a, out, logps = rollout_of(trainer, perturb=True)
    tok, rows = trainer.tokenizer, len(a["token_ids"])
    ids = [a["labels"][i][a["completion_mask"][i]].tolist() for i in range(rows)]
    texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
    soft = SoftLongerJudge().judge(PROMPTS, [[texts[i], texts[i + 1]] for i in range(0, rows, 2)], return_scores=True)
    decided = np.array([p != -1 for p in soft])
    assert decided.any() and not decided.all()
    np.testing.assert_array_equal(a["pair_weight"][0::2] > 0, decided)
    np.testing.assert_allclose(a["probability"][0::2][decided], np.array(soft)[decided], rtol=1e-6)
    mask = a["completion_mask"][0::2]  # the policy's completions
    pol, ref = np.where(mask, logps[0::2], 0), np.where(mask, a["ref_logps"][0::2], 0)
    assert np.abs(pol - ref).max() > 1e-3  # the policy is not the reference: the KL term counts
    p = np.where(decided, np.array(soft, dtype=float), 0.5)
    expected = (0.1 * ((pol - ref) * pol).sum(-1) - (p - 0.5) * pol.sum(-1))[decided].sum()
    np.testing.assert_allclose(float(out.total), expected, rtol=1e-5)
    # The KL sum is a difference of nearly equal log-prob sums computed by two programs: its float32
    # rounding scales with the log-probs' size, not with the small difference (float32 eps x 8 terms).
    kl = (pol - ref).sum(-1)[decided].sum()
    np.testing.assert_allclose(float(out.sums["loss/kl"]), kl, rtol=1e-5, atol=1e-6 * np.abs(pol[decided]).sum())


class FirstJudge(BasePairwiseJudge):
    def judge(self, prompts, completions, shuffle_order=True):
        return [0] * len(prompts)


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer_class, config_class, extra",
    [(OnlineDPOTrainer, OnlineDPOConfig, {}), (XPOTrainer, XPOConfig, {"alpha": [1e-3, 1e-4]}),
     (NashMDTrainer, NashMDConfig, {"mixture_coef": 0.25})],
)  # fmt: skip
def test_each_trainer_trains_and_logs_trls_metrics(trainer_class, config_class, extra):
    trainer = make(trainer_class, config_class, judge=FirstJudge(), eval_dataset=ROWS[:4], args=extra)
    history = trainer.train()
    assert trainer.compilations["train_step"] == 1
    first = history[0]
    names = {
        OnlineDPOTrainer: ["objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/margins"],
        XPOTrainer: ["loss/dpo", "loss/xpo", "alpha", "objective/win_rate", "val/ref_contain_eos_token"],
        NashMDTrainer: ["loss/kl", "loss/score", "rewards/probabilities", "mixture_coef"],
    }[trainer_class]
    for name in [*names, "beta", "rewards/accuracies", "logps/chosen", "objective/undecided_rate"]:
        assert name in first, name
    # Step 1: the policy is the reference, so the log-ratios are zero.
    kl = first["loss/kl"] if trainer_class is NashMDTrainer else first["objective/kl"]
    assert abs(kl) < 1e-4
    if trainer_class is XPOTrainer:
        assert [h["alpha"] for h in history] == [1e-3, 1e-4]  # one rollout per epoch: the schedule
        assert first["objective/win_rate"] == 1.0  # the judge always picks the policy's (first) completion
    if trainer_class is OnlineDPOTrainer:
        assert first["loss"] == pytest.approx(np.log(2), rel=1e-5)  # -log sigmoid(0)
        assert trainer.evaluate()["win_rate"] == 1.0  # the policy's completion is passed first


def test_ref_model_is_the_reference_and_lora_adapters_off_otherwise():
    policy, ref = tiny_model(seed=0), tiny_model(seed=5)
    trainer = OnlineDPOTrainer(policy, ref_model=ref, judge=FirstJudge(), train_dataset=ROWS,
                               processing_class=word_tokenizer(),
                               args=OnlineDPOConfig(per_device_train_batch_size=1, max_new_tokens=3, max_length=10,
                                                    max_steps=1, save_strategy="no"))  # fmt: skip
    assert trainer.reference == "ref_model"
    rollout = trainer.make_rollout(trainer.init_state(), 0, list(range(8)))
    batch = {k: jnp.asarray(rollout.arrays[k]) for k in ("token_ids", "padding_mask", "labels")}
    expected = ref.token_logps(ref.variables, batch, batch["labels"], training=False)[0]
    m = rollout.arrays["completion_mask"]
    np.testing.assert_allclose(rollout.arrays["ref_logps"][m], np.asarray(expected)[m], rtol=1e-5, atol=1e-6)
    lora = XPOTrainer(tiny_model(lora=kithara.LoraConfig(rank=4)), judge=FirstJudge(), train_dataset=ROWS,
                      processing_class=word_tokenizer(), args=XPOConfig(per_device_train_batch_size=1))  # fmt: skip
    assert lora.reference == "adapters_off" and lora.frozen_variables() is None
    with pytest.raises(ValueError, match="ref_model is the model being trained"):
        OnlineDPOTrainer(policy, ref_model=policy, judge=FirstJudge(), train_dataset=ROWS,
                         processing_class=word_tokenizer(),
                         args=OnlineDPOConfig(per_device_train_batch_size=1))  # fmt: skip


def test_configs_refuse_bad_settings_clearly():
    with pytest.raises(ValueError, match="unknown loss type 'robust'"):
        OnlineDPOConfig(loss_type="robust")
    with pytest.raises(TypeError, match="use_vllm"):
        OnlineDPOConfig(use_vllm=True)
    with pytest.raises(TypeError, match="vllm_server_port"):
        XPOConfig(vllm_server_port=8000)
    with pytest.raises(ValueError, match="num_generations is 2"):
        OnlineDPOConfig(num_generations=4)
    with pytest.raises(ValueError, match="max_new_tokens < max_length"):
        OnlineDPOConfig(max_new_tokens=64, max_length=64)
    with pytest.raises(ValueError, match="derives max_completion_length"):
        OnlineDPOConfig(max_new_tokens=8, max_completion_length=16)
    with pytest.raises(ValueError, match="beta must be > 0"):
        OnlineDPOConfig(beta=[0.1, 0.0])
    with pytest.raises(ValueError, match="GRPO setting"):
        OnlineDPOConfig(num_iterations=2)
    with pytest.raises(ValueError, match=r"mixture_coef must be in \[0, 1\]"):
        NashMDConfig(mixture_coef=1.5)
    with pytest.raises(ValueError, match="loss_type='ipo' would be ignored"):
        NashMDConfig(loss_type="ipo")
    config = XPOConfig(beta=[0.1, 0.05], alpha=[1e-4], max_new_tokens=8, max_length=40)
    assert (config.beta_at(0), config.beta_at(5), config.alpha, config.max_prompt_length) == (0.1, 0.05, 1e-4, 32)
    tok, model = word_tokenizer(), tiny_model()
    with pytest.raises(ValueError, match=r"needs judge= .* or reward_funcs="):
        OnlineDPOTrainer(model, train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ValueError, match="judge= or reward_funcs=, not both"):
        OnlineDPOTrainer(model, judge=FirstJudge(), reward_funcs=len, train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ValueError, match="missing_eos_penalty adjusts rewards"):
        OnlineDPOTrainer(model, judge=FirstJudge(), train_dataset=ROWS, processing_class=tok, missing_eos_penalty=1.0)
    with pytest.raises(TypeError, match="pairwise judge"):
        OnlineDPOTrainer(model, judge=object(), train_dataset=ROWS, processing_class=tok)


def test_a_judge_answering_out_of_range_is_refused():
    class Bad(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [2] * len(prompts)

    trainer = make(judge=Bad())
    with pytest.raises(ValueError, match=r"returns 0 or 1 .* or -1 \(undecided\) per prompt; got 2"):
        trainer.make_rollout(trainer.init_state(), 0, list(range(8)))


@pytest.mark.slow
def test_demo_online_dpo_raises_the_held_out_win_rate_against_the_start(tmp_path):
    """examples/online_dpo.py --tiny: Online DPO from an SFT start with a rule judge; the
    held-out win rate against the start rises well above its ~0.5."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "online_dpo.py"), "--tiny", "--output-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    before, after = map(float, re.search(r"Online DPO: .* ([\d.]+) -> ([\d.]+)", done.stdout).groups())
    assert 0.35 < before < 0.65 and after > before + 0.1, done.stdout
