import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model, word_tokenizer

import kithara
from kithara.data import PreferenceDataset, PromptCompletionDataset
from kithara.objectives import dpo_losses

ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731


def reference_pairs():
    np.random.seed(0)
    policy = np.random.normal(0, 5, (8, 4)).sum(-1)
    ref = np.random.normal(0, 5, (8, 4)).sum(-1)
    return policy[:4], policy[4:], ref[:4], ref[4:]


def pairs(lengths=(4.0, 4.0)):
    c, r, c0, r0 = reference_pairs()
    n = np.full(4, lengths[0]), np.full(4, lengths[1])
    return dpo_losses.PairLogps(*map(jnp.asarray, (c, r, c0, r0, *n))), (c, r, c0, r0)


def loss(name, e=0.0, lengths=(4.0, 4.0), beta=0.1):
    p, _ = pairs(lengths)
    return float(dpo_losses.LOSSES[name](p, beta, e).mean())


def test_sigmoid_matches_the_reference_vector():
    assert loss("sigmoid") == pytest.approx(0.7530593502919607, abs=1e-6)
    assert loss("sigmoid", 0.3) == pytest.approx(0.9254464725571975, abs=1e-6)


@pytest.mark.parametrize("name", sorted(set(dpo_losses.LOSSES) - {"sigmoid"}))
def test_each_loss_matches_hand_computation(name):
    _, (c, r, c0, r0) = pairs((3.0, 5.0))
    b, e = 0.1, 0.2
    rw, rl = c - c0, r - r0
    h = rw - rl
    expected = {
        "hinge": np.maximum(0, 1 - b * h),
        "ipo": (rw / 3 - rl / 5 - 1 / (2 * b)) ** 2,
        "robust": (-(1 - e) * ls(b * h) + e * ls(-b * h)) / (1 - 2 * e),
        "bco_pair": -ls(b * rw) - ls(-b * rl),
        "sppo_hard": (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2,
        "nca_pair": -ls(b * rw) - 0.5 * ls(-b * rw) - 0.5 * ls(-b * rl),
        "apo_zero": 1 - sig(b * rw) + sig(b * rl),
        "apo_down": sig(b * rw) + 1 - sig(b * h),
        "sft": -c / 3,
    }[name].mean()
    assert loss(name, e, (3.0, 5.0)) == pytest.approx(expected, rel=1e-5)


def test_combined_loss_is_the_weighted_sum():
    p, _ = pairs()
    rpo = dpo_losses.combined_loss(p, {"sigmoid": 1.0, "sft": 0.5}, 0.1, 0.0)
    np.testing.assert_allclose(rpo, dpo_losses.sigmoid_loss(p, 0.1, 0.0) + 0.5 * dpo_losses.sft_loss(p, 0.1, 0.0), 1e-6)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown DPO loss"):
        dpo_losses.loss_weights("dpo_magic", beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match="robust loss needs"):
        dpo_losses.loss_weights("robust", beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_losses.loss_weights("sigmoid", beta=0.1, label_smoothing=1.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_losses.loss_weights("sigmoid", beta=0.0, label_smoothing=0.0)


def test_sequence_logps_sums_completion_tokens_only():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 5)), jnp.float32)
    labels = jnp.asarray([[1, 2, 3, 4], [0, 1, 0, 0]])
    mask = jnp.asarray([[False, True, True, False], [False, False, False, False]])
    logps, lengths, _ = dpo_losses.sequence_logps(logits, labels, mask)
    lp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(logps, [lp[0, 1, 2] + lp[0, 2, 3], 0.0], rtol=1e-6)
    np.testing.assert_array_equal(lengths, [2.0, 0.0])


ROWS = [
    {"prompt": p, "chosen": c, "rejected": r}
    for p, c, r in [
        ("how are you", "fine thanks", "bye"),
        ("hi", "hello", "bye bye"),
        ("hello", "hi how are you", "ok"),
        ("bye", "bye", "hello hello"),
    ]
    * 4
]


def loader(rows=ROWS, per_device=1):
    ds = PreferenceDataset(rows, word_tokenizer(), max_length=12)
    return kithara.Dataloader(ds, per_device, seed=0, num_devices=8)


def dpo(model, **kwargs):
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("steps", 2)
    return kithara.DPOTrainer(model, kithara.optimizers.adamw(1e-2), loader(), **kwargs)


def test_reference_modes_agree():
    lora = kithara.LoraConfig(rank=4, targets=("query", "value"))
    model = tiny_model(lora=lora)
    plain = tiny_model()
    plain.variables = ModelVariablesFrom(model, plain)
    batch = next(iter(loader().epoch(0)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    off = dpo(model)
    frozen = dpo(tiny_model(lora=lora), ref_model=plain)
    a = off.reference_logps(model.variables, batch)
    b = frozen.reference_logps(model.variables, batch)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Adapter off equals the policy itself when lora_kernel_b is zero-initialised.
    live = off.compute_loss(model.variables, batch, jax.random.key(0), off.frozen)[0]
    assert float(live.sums["rewards/margins"]) == pytest.approx(0.0, abs=1e-4)
    # Precomputed == live.
    pre = dpo(model, precompute_ref_log_probs=True)
    cached = next(iter(pre.train_dataloader.epoch(0)))
    assert "ref_chosen_logps" in cached
    lb = {k: jnp.asarray(v) for k, v in cached.items()}
    np.testing.assert_allclose(
        [lb["ref_chosen_logps"], lb["ref_rejected_logps"]], off.reference_logps(model.variables, lb), rtol=1e-5
    )
    assert float(pre.compute_loss(model.variables, lb, jax.random.key(0), pre.frozen)[0].total) == pytest.approx(
        float(off.compute_loss(model.variables, lb, jax.random.key(0), off.frozen)[0].total), rel=1e-5
    )


def ModelVariablesFrom(lora_model, plain):
    """The plain model's variables taken from the LoRA model's base weights."""
    src = {**lora_model.variables.trainable, **lora_model.variables.non_trainable}
    v = plain.variables
    return kithara.ModelVariables({p: src[p] for p in v.trainable}, {p: src[p] for p in v.non_trainable})


def test_refuses_bad_reference_setups_and_data():
    model = tiny_model()
    with pytest.raises(ValueError, match="ref_model is the model"):
        dpo(model, ref_model=model)
    with pytest.raises(ValueError, match="Unknown DPO loss"):
        dpo(model, ref_model=tiny_model(), loss_type="nope")
    with pytest.raises(ValueError, match="needs train_dataloader"):
        kithara.DPOTrainer(model)
    rows = [{"prompt": "hi", "completion": "hello"}] * 8
    sft_rows = kithara.Dataloader(PromptCompletionDataset(rows, word_tokenizer(), max_length=8), 1)
    with pytest.raises(ValueError, match="needs preference data in train_dataloader"):
        kithara.DPOTrainer(model, train_dataloader=sft_rows)
    with pytest.raises(ValueError, match="raw data: pass tokenizer"):
        kithara.DPOTrainer(model, train_dataset=ROWS)


def test_frozen_copy_reference_equals_a_separate_frozen_model():
    """Without LoRA, ref_model or precomputing, the reference is an on-device copy of the
    starting weights: training equals training against a separate, identical frozen model."""
    copy_trainer = dpo(tiny_model(), steps=3)
    assert copy_trainer.reference == "frozen_copy"
    separate = dpo(tiny_model(), steps=3, ref_model=tiny_model())
    assert separate.reference == "ref_model"
    a, b = copy_trainer.train(), separate.train()
    assert a[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts at the reference
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["rewards/margins"] == pytest.approx(y["rewards/margins"], rel=1e-5, abs=1e-7)
    assert a[-1]["loss"] < a[0]["loss"]


def test_raw_rows_and_default_optimizer():
    trainer = kithara.DPOTrainer(
        tiny_model(lora=kithara.LoraConfig(rank=4)), train_dataset=ROWS, eval_dataset=ROWS[:4],
        tokenizer=word_tokenizer(), max_length=12, per_device_train_batch_size=1, steps=2, progress_bar=False,
    )  # fmt: skip
    assert trainer.reference == "adapters_off"
    assert isinstance(trainer.train_dataloader.dataset, PreferenceDataset)
    assert trainer.train_dataloader.dataset.truncation_mode == "keep_end"
    assert not trainer.eval_dataloader.shuffle
    trainer.train()
    metrics = trainer.evaluate()
    assert "perplexity" not in metrics and "rewards/accuracies" in metrics


def test_dpo_end_to_end_raises_reward_accuracy():
    model = tiny_model(lora=kithara.LoraConfig(rank=4, targets=("query", "value", "up")))
    trainer = dpo(model, steps=8, eval_dataloader=loader(), eval_steps_interval=8)
    history = trainer.train()
    keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"}  # fmt: skip
    assert keys <= set(history[0]) and keys <= set(trainer.eval_history[-1])
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.compilations == {"train_step": 1, "eval_step": 1, "score": 0}
    first = next(trainer.train_dataloader.epoch(0))
    assert history[0]["tokens"] == first["chosen_padding_mask"].sum() + first["rejected_padding_mask"].sum()
    assert trainer.eval_history[-1]["rewards/margins"] > 0
    assert trainer.eval_history[-1]["rewards/accuracies"] > 0.5


def peak_bytes(trainer, batch):
    state = trainer.init_state()
    stacked = {k: np.asarray(v)[None] for k, v in batch.items()}
    stats = trainer.lower_train_step(state, stacked).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def test_adapter_off_reference_keeps_peak_memory_close_to_sft():
    lora = kithara.LoraConfig(rank=4, targets=("query", "value"))
    kw = dict(vocab_size=512, hidden_dim=128, intermediate_dim=256, lora=lora)
    dpo_trainer = kithara.DPOTrainer(tiny_model(**kw), kithara.optimizers.adamw(1e-2), loader(), progress_bar=False)
    pair_batch = next(iter(dpo_trainer.train_dataloader.epoch(0)))
    # SFT on the same rows: chosen and rejected as 2B separate sequences.
    rows = [
        {k.split("_", 1)[1]: v[i] for k, v in pair_batch.items() if k.startswith(side)}
        for side in ("chosen_", "rejected_")
        for i in range(len(pair_batch["chosen_token_ids"]))
    ]
    sft_loader = kithara.Dataloader(rows, 2, shuffle=False, num_devices=8)
    sft_trainer = kithara.Trainer(tiny_model(**kw), kithara.optimizers.adamw(1e-2), sft_loader, progress_bar=False)
    sft_batch = next(iter(sft_loader.epoch(0)))
    dpo_peak, sft_peak = peak_bytes(dpo_trainer, pair_batch), peak_bytes(sft_trainer, sft_batch)
    assert dpo_peak < 1.25 * sft_peak, (dpo_peak, sft_peak)


def test_precomputed_reference_trains_end_to_end_and_eval_masks_rows():
    trainer = dpo(tiny_model(), precompute_ref_log_probs=True, steps=3, eval_dataloader=loader(), max_eval_samples=5)
    history = trainer.train()
    assert np.isfinite([h["loss"] for h in history]).all()
    # The first step starts at the reference: zero rewards, loss log(2).
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert trainer.eval_history[-1]["rewards/accuracies"] * 5 == pytest.approx(
        round(trainer.eval_history[-1]["rewards/accuracies"] * 5), abs=1e-5
    )


CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": p}],
        "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}],
    }
    for p, c, r in [("hi", "hello", "bye"), ("how are you", "fine thanks", "ok"), ("bye", "bye", "hi hi")] * 6
]


def test_conversational_pairs_with_gradient_accumulation_equal_one_large_batch():
    def run(per_device, accumulation):
        model = tiny_model(lora=kithara.LoraConfig(rank=4, targets=("query", "value")))
        trainer = kithara.DPOTrainer(
            model, optax.sgd(0.5), loader(CHAT_ROWS, per_device), steps=1,
            gradient_accumulation_steps=accumulation, progress_bar=False,
        )  # fmt: skip
        return trainer.train()[0], model.variables.trainable

    (big, big_vars), (acc, acc_vars) = run(2, 1), run(1, 2)
    for key in ("loss", "rewards/accuracies", "logps/chosen", "logits/rejected"):
        assert acc[key] == pytest.approx(big[key], rel=1e-5)
    for path, value in big_vars.items():
        np.testing.assert_allclose(np.asarray(acc_vars[path]), np.asarray(value), rtol=1e-5, atol=1e-7)


def test_frozen_reference_model_trains_and_evaluates():
    policy, ref = tiny_model(), tiny_model()  # same seed: the reference equals the start
    trainer = dpo(policy, ref_model=ref, steps=2, eval_dataloader=loader(), eval_steps_interval=2)
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert np.isfinite(trainer.eval_history[-1]["rewards/margins"])
    # The reference stays frozen.
    for path, value in tiny_model().variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(ref.variables.trainable[path]), np.asarray(value))


def test_resume_with_precomputed_reference_is_exact(tmp_path):
    def run(steps, checkpointer=None):
        model = tiny_model(lora=kithara.LoraConfig(rank=4, targets=("query", "value")))
        trainer = dpo(model, steps=steps, precompute_ref_log_probs=True, checkpointer=checkpointer)
        return [h["loss"] for h in trainer.train()], model.variables.trainable

    expected, final = run(4)
    run(2, kithara.Checkpointer(str(tmp_path), save_interval=2))
    resumed, variables = run(4, kithara.Checkpointer(str(tmp_path), save_interval=2))
    np.testing.assert_allclose(resumed, expected[2:], rtol=1e-6)
    for path, value in final.items():
        np.testing.assert_allclose(np.asarray(variables[path]), np.asarray(value), rtol=1e-6, atol=1e-7)


def test_sharded_dpo_matches_one_device():
    def run(sharding, per_device, num_devices):
        model = tiny_model(sharding=sharding, lora=kithara.LoraConfig(rank=4, targets=("query", "value")))
        data = kithara.Dataloader(
            PreferenceDataset(ROWS, word_tokenizer(), max_length=12), per_device, seed=0, num_devices=num_devices
        )
        trainer = kithara.DPOTrainer(model, optax.sgd(0.5), data, steps=3, progress_bar=False)
        return [h["loss"] for h in trainer.train()]

    single = run(kithara.ShardingStrategy("dp", devices=jax.devices()[:1]), 8, 1)
    sharded = run(kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2), 1, 8)
    np.testing.assert_allclose(sharded, single, rtol=2e-6)
