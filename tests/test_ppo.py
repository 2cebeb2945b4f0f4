"""PPOTrainer: config mapping, the loss wiring against rl_losses by hand, the value function
in the train state, learning the toy reward of rl_worker, and bit-identical resume."""

import jax
import numpy as np
import pytest
from conftest import tiny_model, word_tokenizer
from rl_worker import PROMPTS, target_share

import kithara
from kithara.objectives import rl_losses


def make_ppo(steps, output_dir=None, value_model=False, **overrides):
    settings = dict(
        per_device_train_batch_size=1,
        max_prompt_length=8,
        max_completion_length=8,
        learning_rate=3e-3,
        max_steps=steps,
        logging_steps=1,
        seed=3,
        output_dir=output_dir,
        num_ppo_epochs=2,
    )
    settings.update(overrides)
    if output_dir is None:
        settings["save_strategy"] = "no"
    policy = tiny_model("qwen3", sharding="fsdp", head_dim=12, tie_word_embeddings=False)
    value = kithara.ScalarHeadModel.from_causal_lm(policy, head_init_std=0.0) if value_model else None
    return kithara.PPOTrainer(
        policy,
        reward_funcs=target_share,
        train_dataset=[{"prompt": p} for p in PROMPTS],
        processing_class=word_tokenizer(),
        value_model=value,
        args=kithara.PPOConfig(**settings),
    )


def test_config_has_trl_defaults_and_one_source_of_truth():
    c = kithara.PPOConfig()
    assert (c.num_ppo_epochs, c.num_mini_batches, c.kl_coef, c.kl_estimator, c.cliprange) == (4, 1, 0.05, "k1", 0.2)
    assert (c.vf_coef, c.cliprange_value, c.gamma, c.lam, c.whiten_rewards) == (0.1, 0.2, 1.0, 0.95, False)
    assert c.missing_eos_penalty is None and c.num_generations == 1
    # The GRPO machinery's names follow the PPO ones.
    assert (c.num_iterations, c.beta, c.steps_per_generation) == (4, 0.05, 1)
    c = kithara.PPOConfig(num_ppo_epochs=2, num_mini_batches=3, gradient_accumulation_steps=2, kl_coef=0.0)
    assert (c.num_iterations, c.beta, c.steps_per_generation) == (2, 0.0, 6)
    assert kithara.PPOConfig(num_iterations=4, beta=0.05, steps_per_generation=1).num_iterations == 4
    with pytest.raises(ValueError, match="num_iterations"):
        kithara.PPOConfig(num_iterations=2)
    with pytest.raises(ValueError, match="kl_coef"):
        kithara.PPOConfig(beta=0.1)
    with pytest.raises(ValueError, match="num_mini_batches"):
        kithara.PPOConfig(steps_per_generation=3)
    with pytest.raises(ValueError, match="generation_batch_size"):
        kithara.PPOConfig(generation_batch_size=8)
    with pytest.raises(ValueError, match="estimator 'k2'"):
        kithara.PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="vf_coef"):
        kithara.PPOConfig(vf_coef=-1.0)
    with pytest.raises(TypeError, match="max_completion_length"):
        kithara.PPOConfig(response_length=16)


def test_one_update_is_the_rl_losses_composed_by_hand():
    """The rollout's targets and the first update's loss, recomputed from the rollout arrays
    with rl_losses: rewards with the score at the last completion token, GAE, whitening,
    the clipped policy loss plus vf_coef times the clipped value loss."""
    trainer = make_ppo(1, kl_coef=0.1, missing_eos_penalty=0.5, num_ppo_epochs=1)
    initial = jax.device_get(trainer.model.variables)
    history = trainer.train()
    arrays, args = trainer.rollout.arrays, trainer.args
    mask = arrays["completion_mask"].astype(bool)
    rows = mask.shape[0]
    assert mask.any(1).all()
    # The score sits at the last completion token: the last valid position of each row.
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    ends = arrays["padding_mask"].sum(1)
    np.testing.assert_array_equal(last, ends - 2)
    ids = [arrays["labels"][i][mask[i]].tolist() for i in range(rows)]
    score = np.asarray(target_share(None, None, ids), np.float32)
    stopped = np.array([i[-1] in trainer.stop_token_ids for i in ids])
    score = score - 0.5 * ~stopped
    kl = np.where(mask, np.asarray(rl_losses.per_token_kl_penalty(arrays["old_logps"], arrays["ref_logps"])), 0)
    token_rewards = -0.1 * kl
    token_rewards[np.arange(rows), last] += score
    adv, returns = rl_losses.gae(token_rewards, arrays["values"], mask, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(arrays["returns"], returns, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["advantages"], rl_losses.whiten(adv, mask), rtol=1e-5, atol=1e-5)
    assert history[0]["objective/scores"] == pytest.approx(score.mean(), abs=1e-6)
    assert history[0]["objective/kl"] == pytest.approx(kl.sum(1).mean(), abs=1e-6)

    # The update's loss from the starting variables, by hand: one micro-batch of all rows.
    model = trainer.model
    logps, _, values, _ = model.forward(initial, arrays, arrays["labels"], training=False, chunk_size=None)
    np.testing.assert_allclose(logps * mask, arrays["old_logps"] * mask, atol=1e-5)  # one policy: ratio 1
    np.testing.assert_allclose(values * mask, arrays["values"] * mask, atol=1e-5)
    pg = rl_losses.ppo_policy_loss(logps, arrays["old_logps"], arrays["advantages"], mask, cliprange=args.cliprange)
    vf = rl_losses.ppo_value_loss(
        values, arrays["values"], arrays["returns"], mask, cliprange_value=args.cliprange_value, vf_coef=args.vf_coef
    )
    n = mask.sum()
    assert history[0]["loss"] == pytest.approx(float(pg.total + vf.total) / n, abs=1e-5)
    assert history[0]["loss/policy_avg"] == pytest.approx(float(pg.total) / n, abs=1e-5)
    assert history[0]["loss/value_avg"] == pytest.approx(float(vf.sums["value/loss_avg"]) / n, abs=1e-5)
    for key in ("policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "objective/rlhf_reward"):
        assert key in history[0]


@pytest.mark.slow
def test_a_value_model_is_trained_and_checkpointed(tmp_path):
    trainer = make_ppo(2, output_dir=str(tmp_path / "run"), save_steps=2, value_model=True, missing_eos_penalty=1.0)
    before = jax.device_get(trainer.model.variables.trainable)
    trainer.train()
    after = jax.device_get(trainer.model.variables.trainable)
    value_paths = [p for p in before if p.startswith("value/")]
    assert "value/score/kernel" in value_paths and len(value_paths) > 1
    for side in ("policy/", "value/"):
        assert any(not np.array_equal(before[p], after[p]) for p in before if p.startswith(side)), side
    resumed = make_ppo(2, output_dir=str(tmp_path / "run"), save_steps=2, value_model=True)
    resumed.train()
    assert resumed.start_step == 2
    again = jax.device_get(resumed.model.variables.trainable)
    for p in after:
        np.testing.assert_array_equal(again[p], after[p])


def test_ppo_raises_the_reward_of_a_tiny_model():
    """The share of the target word climbs well above its start (~1/64), with a separate
    value model (zero head: the first advantages are the discounted scores)."""
    trainer = make_ppo(16, learning_rate=2e-2, kl_coef=0.0, num_ppo_epochs=1, value_model=True)
    history = trainer.train()
    rewards = [h["rewards/target_share/mean"] for h in history]
    assert np.mean(rewards[:2]) < 0.1
    assert np.mean(rewards[-4:]) > 0.3, rewards
    assert trainer.compilations["train_step"] == 1


def summary(history):
    keys = ("loss", "reward", "objective/kl", "loss/value_avg", "completions/mean_length")
    return [{k: h[k] for k in keys} for h in history]


def test_value_head_is_trained_and_resume_is_bit_identical(tmp_path):
    """A value head on the policy (the default): it and the policy change, both are in the
    checkpoint; a checkpoint inside a rollout (num_ppo_epochs=2) resumes exactly."""
    straight_trainer = make_ppo(3, missing_eos_penalty=1.0)
    before = jax.device_get(straight_trainer.model.variables.trainable)
    straight = summary(straight_trainer.train())
    after = jax.device_get(straight_trainer.model.variables.trainable)
    assert [p for p in before if p.startswith("value/")] == ["value/score/kernel"]
    assert all(p.startswith(("policy/", "value/")) for p in before)
    for side in ("policy/", "value/"):
        assert any(not np.array_equal(before[p], after[p]) for p in before if p.startswith(side)), side
    make_ppo(1, output_dir=str(tmp_path / "run"), save_steps=1, missing_eos_penalty=1.0).train()
    resumed = make_ppo(3, output_dir=str(tmp_path / "run"), save_steps=1, missing_eos_penalty=1.0)
    tail = summary(resumed.train())
    assert resumed.start_step == 1  # inside the first rollout: it comes from the checkpoint
    assert tail == straight[1:]
    assert straight[0]["objective/kl"] == 0.0 and straight[2]["objective/kl"] != 0.0
    np.testing.assert_array_equal(
        jax.device_get(resumed.model.variables.trainable)["value/score/kernel"], after["value/score/kernel"]
    )
