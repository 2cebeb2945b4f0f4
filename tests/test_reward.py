"""RewardTrainer: its loss against TRL's own code, tokenization against TRL's, end-to-end parity
with transformers' LlamaForSequenceClassification, errors, and a tiny learning check."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import word_tokenizer

import kithara
from kithara.data.reward_data import RewardDataset
from kithara.data.sources import RowError
from kithara.models.scalar_head import ScalarHeadModel
from kithara.objectives import reward_losses
from kithara.objectives.reward import RewardTrainer
from kithara.objectives.reward_configs import RewardConfig

# Odd sizes (head_dim 6, vocab 37), grouped key/values, untied embeddings (llama3's default).
SIZES = dict(vocab_size=37, num_layers=2, hidden_dim=24, num_heads=4, num_kv_heads=2, intermediate_dim=36)
WORDS = ["hi", "hello", "how", "are", "you", "fine", "thanks", "bye", "ok"]


def text_pairs(n, seed=0, margins=True):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = (" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(3))
        row = {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected + " bye"}
        if margins:
            row["margin"] = float(i % 3) * 0.5
        rows.append(row)
    return rows


def trl_compute_loss(logits, margin=None, center=None):
    """TRL 1.16's RewardTrainer.compute_loss, run on given logits ([2P, 1]: chosen rows, then rejected)."""
    from trl import RewardTrainer as TRLRewardTrainer

    model = types.SimpleNamespace(training=True)
    outputs = types.SimpleNamespace(logits=logits)
    fake = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics={"train": __import__("collections").defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(logits.shape[0], 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = TRLRewardTrainer.compute_loss(fake, lambda **_: outputs, inputs)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_pair_loss_matches_trl_code(with_margin, center):
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(0, 2, 6).astype(np.float32), rng.normal(0, 2, 6).astype(np.float32)
    margin = rng.uniform(0, 1, 6).astype(np.float32) if with_margin else np.zeros(6, np.float32)
    ours = reward_losses.pair_loss(
        jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(margin), center_rewards_coefficient=center
    )
    logits = torch.tensor(np.concatenate([chosen, rejected]))[:, None]
    expected, _ = trl_compute_loss(logits, torch.tensor(margin) if with_margin else None, center)
    assert float(ours.mean()) == pytest.approx(expected, rel=1e-6)


def test_pair_loss_hand_formula():
    c, r, m = np.array([1.0, -0.5]), np.array([0.25, 0.5]), np.array([0.1, 0.0])
    hand = np.log1p(np.exp(-(c - r - m))) + 0.5 * (c + r) ** 2
    ours = reward_losses.pair_loss(*map(jnp.asarray, (c, r, m)), center_rewards_coefficient=0.5)
    np.testing.assert_allclose(ours, hand, rtol=1e-6)
    assert reward_losses.LOSSES["ranking"] is reward_losses.ranking_loss


def trl_tokenized(rows, hf_tokenizer, max_length):
    """TRL 1.16's own RewardTrainer preprocessing (EOS, tokenizing, the max_length filter)."""
    from datasets import Dataset
    from trl import RewardTrainer as TRLRewardTrainer

    args = types.SimpleNamespace(max_length=max_length, dataset_num_proc=None)  # the RewardConfig fields it reads
    data = TRLRewardTrainer._prepare_dataset(None, Dataset.from_list(rows), hf_tokenizer, args, "train")
    return [(row["chosen_ids"], row["rejected_ids"]) for row in data]


def ours_tokenized(rows, tokenizer, max_length):
    ds = RewardDataset(rows, tokenizer, max_length=max_length)
    examples = [ds[i] for i in range(len(rows))]
    return [(e["chosen_token_ids"].tolist(), e["rejected_token_ids"].tolist()) for e in examples if e is not None]


def chat(text, role):
    return [{"role": role, "content": text}]


@pytest.mark.parametrize("form", ["text", "implicit_text", "chat", "implicit_chat"])
def test_tokenization_matches_trl(form):
    tok = word_tokenizer()
    rows = text_pairs(6, margins=False)
    if form == "implicit_text":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    elif form == "chat":
        rows = [
            {"prompt": chat(r["prompt"], "user"), "chosen": chat(r["chosen"], "assistant"),
             "rejected": chat(r["rejected"], "assistant")} for r in rows
        ]  # fmt: skip
    elif form == "implicit_chat":
        rows = [
            {"chosen": chat(r["prompt"], "user") + chat(r["chosen"], "assistant"),
             "rejected": chat(r["prompt"], "user") + chat(r["rejected"], "assistant")} for r in rows
        ]  # fmt: skip
    lengths = [max(len(c), len(r)) for c, r in ours_tokenized(rows, tok, 1000)]
    max_length = max(lengths) - 1  # the longest pairs are filtered by both
    ours = ours_tokenized(rows, tok, max_length)
    assert ours == trl_tokenized(rows, tok.backend, max_length)
    assert 0 < len(ours) < len(rows)


@pytest.fixture(scope="module")
def trainer():
    policy = kithara.KerasHubModel.from_config("llama3", **SIZES)
    args = RewardConfig(max_length=12, max_steps=2, per_device_train_batch_size=1, center_rewards_coefficient=0.01,
                        learning_rate=1e-2, disable_tqdm=True)  # fmt: skip
    trainer = RewardTrainer(policy, args=args, train_dataset=text_pairs(24), processing_class=word_tokenizer())
    return policy, trainer


def test_loss_and_rewards_equal_transformers(trainer, tmp_path):
    """Same weights in transformers' LlamaForSequenceClassification (fp32, CPU) and TRL's loss
    formula give RewardTrainer's loss, each sequence's reward and the metrics."""
    from transformers import LlamaForSequenceClassification

    _, trainer = trainer
    model = trainer.model
    assert isinstance(model, ScalarHeadModel)
    model.save_in_hf_format(tmp_path, tokenizer=trainer.tokenizer)
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 0

    batch = next(iter(trainer.train_dataloader.epoch(0)))
    out, _ = trainer.compute_loss(model.variables, jax.tree.map(jnp.asarray, batch), jax.random.key(0), None)
    chosen, rejected, _ = trainer.pair_rewards(model.variables, jax.tree.map(jnp.asarray, batch))

    ids = np.concatenate([batch["chosen_token_ids"], batch["rejected_token_ids"]])
    mask = np.concatenate([batch["chosen_padding_mask"], batch["rejected_padding_mask"]])
    assert (ids[~mask] == 0).all() and not (ids[mask] == 0).any()  # HF finds the last token by the pad id
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(np.concatenate([chosen, rejected]), logits[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    loss, metrics = trl_compute_loss(logits, torch.tensor(batch["margin"]), center=0.01)
    weight = float(out.weight)
    assert weight == len(batch["margin"])
    assert float(out.total) / weight == pytest.approx(loss, rel=1e-5)
    for name in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert float(out.sums[name]) / weight == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), name

    # The directory trains on as it is: head and tokenizer loaded from it.
    reloaded = RewardTrainer(str(tmp_path), args=RewardConfig(max_length=12, max_steps=1, disable_tqdm=True),
                             train_dataset=text_pairs(8))  # fmt: skip
    np.testing.assert_array_equal(reloaded.model.variables.trainable["score/kernel"], kernel_of(model))


def kernel_of(model):
    return np.asarray(model.variables.trainable["score/kernel"])


def test_trains_the_head_and_backbone_and_leaves_the_policy(trainer):
    policy, trainer = trainer
    before = {k: np.asarray(v) for k, v in trainer.model.variables.trainable.items()}
    policy_before = {k: np.asarray(v) for k, v in policy.variables.trainable.items()}
    history = trainer.train()
    assert {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= set(history[-1])
    after = trainer.model.variables.trainable
    assert not np.allclose(before["score/kernel"], after["score/kernel"])
    assert sum(not np.allclose(before[k], after[k]) for k in before) > len(before) // 2
    assert all(np.array_equal(policy_before[k], policy.variables.trainable[k]) for k in policy_before)
    assert trainer.compilations["train_step"] == 1


def test_lora_trains_adapters_and_head_only():
    policy = kithara.KerasHubModel.from_config("llama3", **SIZES, lora=kithara.LoraConfig(rank=2))
    trainer = RewardTrainer(policy, args=RewardConfig(max_length=12, max_steps=1, per_device_train_batch_size=1,
                                                      disable_tqdm=True),
                            train_dataset=text_pairs(8), processing_class=word_tokenizer())  # fmt: skip
    names = set(trainer.model.variables.trainable)
    assert "score/kernel" in names and all("lora" in n or n == "score/kernel" for n in names)
    trainer.train()


def test_evaluation_reports_the_pairwise_metrics():
    model = ScalarHeadModel.from_config("llama3", **SIZES)
    rows = text_pairs(12)
    trainer = RewardTrainer(model, args=RewardConfig(max_length=12, max_steps=1, per_device_train_batch_size=1,
                                                     disable_tqdm=True),
                            train_dataset=rows[:8], eval_dataset=rows, processing_class=word_tokenizer())  # fmt: skip
    metrics = trainer.evaluate()
    assert set(metrics) == {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward",
                            "rewards/chosen", "rewards/rejected"}  # fmt: skip
    assert metrics["min_reward"] <= metrics["mean_reward"] <= metrics["max_reward"]


def test_config_names_and_defaults_follow_trl():
    from trl import RewardConfig as TRLRewardConfig

    trl_defaults = TRLRewardConfig.__dataclass_fields__
    for name in ("learning_rate", "max_length", "disable_dropout", "center_rewards_coefficient", "logging_steps"):
        assert RewardConfig.defaults()[name] == trl_defaults[name].default, name
    for name in ("eos_token", "pad_to_multiple_of", "dataset_num_proc", "chat_template_path"):
        with pytest.raises((TypeError, NotImplementedError, ValueError), match=name):
            RewardConfig(**{name: None})
    with pytest.raises(ValueError, match="loss_type"):
        RewardConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="max_length=None"):
        RewardConfig(max_length=None)
    assert RewardConfig(loss_type="ranking", margin=0.1).margin == 0.1


def test_bad_inputs_raise_clear_errors(tmp_path):
    tok = word_tokenizer()
    bad = [{"prompt": "hi", "chosen": " ok", "rejected": " bye", "margin": "big"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(text_pairs(1)[0]) + "\n" + json.dumps(bad[0]) + "\n")
    with pytest.raises(RowError, match=r"pairs.jsonl:2.*'margin': expected a number, got str 'big'"):
        RewardDataset(str(path), tok, max_length=8)[1]
    with pytest.raises(RowError, match="margin"):
        RewardDataset([{**bad[0], "margin": float("nan")}], tok, max_length=8)[0]
    with pytest.raises(RowError, match="chosen"):
        RewardDataset([{"prompt": "hi", "rejected": " bye"}], tok, max_length=8)[0]
    args = RewardConfig(max_length=12, max_steps=1, disable_tqdm=True)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(ScalarHeadModel.from_config("llama3", **SIZES, num_labels=2), args=args,
                      train_dataset=text_pairs(8), processing_class=tok)  # fmt: skip
    seq2seq = kithara.KerasHubSeq2SeqModel.from_config(
        "bart", vocab_size=37, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32, max_sequence_length=16
    )
    with pytest.raises(TypeError, match="cannot be converted"):
        RewardTrainer(seq2seq, args=args, train_dataset=text_pairs(8), processing_class=tok)
    with pytest.raises(ValueError, match="RewardDataset"):
        RewardTrainer(ScalarHeadModel.from_config("llama3", **SIZES), args=args, processing_class=tok,
                      train_dataset=kithara.data.PreferenceDataset(text_pairs(8), tok, max_length=12))  # fmt: skip


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def sorting_pairs(n, seed):
    """The chosen answer sorts the prompt's letters; the rejected one is another order of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(list(LETTERS), size=4, replace=False))
        good, bad = "".join(sorted(word)), word
        while bad == good:
            bad = "".join(rng.permutation(list(word)))
        rows.append({"prompt": f"sort {word} =", "chosen": " " + good, "rejected": " " + bad})
    return rows


@pytest.mark.slow
def test_learns_a_checkable_preference():
    """Held-out pairwise accuracy from chance to high, from a causal LM with the automatic head."""
    tok = kithara.Tokenizer.from_pretrained("kithara/assets/demo/tokenizer")
    policy = kithara.KerasHubModel.from_config("llama3", **{**SIZES, "vocab_size": tok.vocab_size, "num_layers": 1,
                                                            "hidden_dim": 32})  # fmt: skip
    args = RewardConfig(max_length=24, max_steps=60, learning_rate=3e-3, per_device_train_batch_size=2,
                        disable_tqdm=True, logging_steps=50, eval_strategy="no")  # fmt: skip
    trainer = RewardTrainer(policy, args=args, train_dataset=sorting_pairs(512, 0),
                            eval_dataset=sorting_pairs(128, 1), processing_class=tok)  # fmt: skip
    before = trainer.evaluate()["accuracy"]
    trainer.train()
    after = trainer.evaluate()["accuracy"]
    assert 0.25 < before < 0.75 and after > 0.85, (before, after)


def test_two_micro_batches_equal_one_batch_of_both():
    """Gradient accumulation: the mean over all pairs of the step, whatever the split."""
    import optax

    rows, tok = text_pairs(32), word_tokenizer()
    results = []
    for per_device, accumulation in ((2, 1), (1, 2)):
        model = ScalarHeadModel.from_config("llama3", **SIZES)
        args = RewardConfig(max_length=12, max_steps=1, per_device_train_batch_size=per_device,
                            gradient_accumulation_steps=accumulation, center_rewards_coefficient=0.1,
                            disable_tqdm=True)  # fmt: skip
        trainer = RewardTrainer(model, args=args, train_dataset=rows, processing_class=tok, optimizer=optax.sgd(0.5))
        history = trainer.train()
        results.append((history[-1], {k: np.asarray(v) for k, v in trainer.model.variables.trainable.items()}))
    (one, weights_one), (two, weights_two) = results
    for name in ("loss", "accuracy", "margin", "mean_reward"):
        assert one[name] == pytest.approx(two[name], rel=1e-5, abs=1e-6), name
    for name in weights_one:
        np.testing.assert_allclose(weights_one[name], weights_two[name], rtol=1e-5, atol=1e-6, err_msg=name)
