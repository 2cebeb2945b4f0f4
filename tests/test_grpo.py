"""GRPOTrainer: rollout rows, rewards, the learning signal, resume, and two processes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_model, word_tokenizer, xla_flags
from rl_worker import TARGET, make_trainer, summary, target_share
from test_distributed import TESTS, finish, free_port, worker_env

import kithara
from kithara.objectives import rollouts


def test_training_rows_put_completions_right_after_prompts_and_mask_only_them():
    rows = rollouts.training_rows([[1, 5, 6], [1, 7]], [[8, 9, 2], [10, 11]], [True, False], length=7)
    np.testing.assert_array_equal(rows["token_ids"], [[1, 5, 6, 8, 9, 2, 0], [1, 7, 10, 11, 0, 0, 0]])
    np.testing.assert_array_equal(rows["labels"], [[5, 6, 8, 9, 2, 0, 0], [7, 10, 11, 0, 0, 0, 0]])
    # The first row's labels 8, 9, 2 (its completion, EOS included) are supervised; the second row is not.
    np.testing.assert_array_equal(rows["completion_mask"][0], [0, 0, 1, 1, 1, 0, 0])
    assert not rows["completion_mask"][1].any()
    np.testing.assert_array_equal(rows["padding_mask"].sum(1), [6, 4])
    with pytest.raises(ValueError, match="does not fit"):
        rollouts.training_rows([[1] * 5], [[2] * 3], [True], length=7)


def test_prompts_read_text_messages_and_columns_and_refuse_bad_rows():
    tok = word_tokenizer()
    text = rollouts.read_prompt({"prompt": "hi how are you", "answer": "ok"}, "row 0", tok, max_prompt_length=3)
    assert text.ids == tok.encode_text("hi how are you")[-3:] and text.columns == {"answer": "ok"}
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    conv = rollouts.read_prompt({"messages": chat}, "row 1", tok, max_prompt_length=64)
    assert conv.value == chat[:1] and conv.conversational
    assert conv.ids == tok.encode_chat(chat[:1], add_generation_prompt=True)[0]
    with pytest.raises(kithara.data.RowError, match=r"row 2.*'prompt'"):
        rollouts.read_prompt({"question": "hi"}, "row 2", tok, max_prompt_length=8)
    with pytest.raises(kithara.data.RowError, match="completions"):
        rollouts.read_prompt({"prompt": "hi", "completions": 1}, "row 3", tok, max_prompt_length=8)


def test_rewards_are_weighted_and_none_means_not_applicable():
    def half(prompts, completions, completion_ids, flag, **_):
        return [1.0 if f else None for f in flag]

    prompts = [rollouts.Prompt([1], "p", {"flag": f}) for f in (True, False, True)]
    per_func = rollouts.score_rewards([half, target_share], prompts, ["a", "b", "c"], [[TARGET], [3], []], None)
    np.testing.assert_array_equal(np.isnan(per_func), [[False, False], [True, False], [False, False]])
    np.testing.assert_array_equal(per_func[:, 1], [1.0, 0.0, 0.0])

    def wrong(prompts, **_):
        return [1.0]

    with pytest.raises(ValueError, match="'wrong' returned 1 rewards for 3"):
        rollouts.score_rewards([wrong], prompts, ["a", "b", "c"], [[1], [1], [1]], None)


def test_grpo_raises_the_reward_of_a_tiny_model():
    """The learning signal: the share of the target word in completions climbs well above
    its start (a uniform-ish tiny model writes it ~1/64 of the time)."""
    trainer = make_trainer(
        24, num_iterations=1, beta=0.0, learning_rate=2e-2, reward_weights=[1.0, 0.0], loss_type="dapo"
    )
    history = trainer.train()
    rewards = [h["rewards/target_share/mean"] for h in history]
    assert np.mean(rewards[:3]) < 0.1
    assert np.mean(rewards[-4:]) > 0.5, rewards
    assert trainer.compilations["train_step"] == 1
    assert trainer.model.generate_compilations <= 2  # one decode program per prompt-length bucket
    for key in ("kl", "entropy", "clip_ratio/region_mean", "frac_reward_zero_std", "completions/clipped_ratio"):
        assert key in history[-1] or key == "kl"


def test_several_updates_per_rollout_resume_bit_identically(tmp_path):
    """num_iterations=2: a checkpoint inside a rollout carries it; the resumed run repeats
    the straight run's losses and rewards exactly."""
    straight = summary(make_trainer(6).train())
    first = make_trainer(3, output_dir=str(tmp_path / "run"), save_steps=1)
    first.train()
    resumed = make_trainer(6, output_dir=str(tmp_path / "run"), save_steps=1)
    tail = summary(resumed.train())
    assert resumed.start_step == 3
    assert tail == straight[3:]
    # The reference is the start: no KL before the first update, then the policy leaves it (the
    # first update with a gradient depends on the sampled completions: a first rollout whose
    # every group has equal rewards moves nothing).
    assert straight[0]["kl"] == 0.0 and max(step["kl"] for step in straight) > 0.0


def test_grpo_refuses_contradictory_settings():
    tok = word_tokenizer()
    rows = [{"prompt": "hi"}] * 8
    with pytest.raises(ValueError, match="not a multiple of num_generations"):
        kithara.GRPOTrainer(
            tiny_model(), target_share, train_dataset=rows, processing_class=tok,
            args=kithara.GRPOConfig(num_generations=3, per_device_train_batch_size=1),
        )  # fmt: skip
    with pytest.raises(ValueError, match="loss type 'gspo'"):
        kithara.GRPOConfig(loss_type="gspo")
    with pytest.raises(TypeError, match="use_vllm"):
        kithara.GRPOConfig(use_vllm=True)
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        kithara.GRPOTrainer(
            tiny_model(), target_share, train_dataset=rows, processing_class=tok,
            args=kithara.GRPOConfig(num_generations=8, per_device_train_batch_size=1, reward_weights=[1, 2]),
        )  # fmt: skip
    with pytest.raises(ValueError, match="train_dataset has 8 prompts; one rollout takes 16"):
        kithara.GRPOTrainer(
            tiny_model(), target_share, train_dataset=rows, processing_class=tok,
            args=kithara.GRPOConfig(num_generations=1, per_device_train_batch_size=2),
        )  # fmt: skip


@pytest.mark.slow
def test_two_processes_give_the_losses_and_rewards_of_one(tmp_path):
    """Prompts sampled on one 8-device mesh, rewards computed on each process's share and
    gathered: the same per-step losses and rewards as one process with the same devices.
    (With a dense reward: a step whose every group has equal rewards has a zero gradient,
    and Adam would turn the layouts' different rounding noise into different updates.)"""
    reference = summary(make_trainer(4, dense_reward=True).train())
    env = {**worker_env(str(TESTS)), "XLA_FLAGS": xla_flags(4)}
    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "rl_worker.py"), coordinator, str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], logs
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["processes"] == 2
    for got, want in zip(result["steps"], reference, strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-5)
