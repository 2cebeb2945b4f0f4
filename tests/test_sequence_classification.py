"""Hugging Face sequence/token classifiers <-> ScalarHeadModel: score parity with transformers,
exact export round trips, LoRA merged and as a PEFT adapter, and the errors."""

import json
import logging

import numpy as np
import pytest
from conftest import word_tokenizer

import kithara
from kithara.models.scalar_head import ScalarHeadModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd sizes throughout: vocab 131, hidden 48 over 6 query / 3 key-value heads, intermediate 37,
# an rms epsilon and rope theta no default has. head_dim 12 != 48 / 6 where the family allows it.
ODD = dict(vocab_size=131, hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=37)
ODD |= dict(num_hidden_layers=2, rms_norm_eps=3e-3, rope_theta=300.0, pad_token_id=0)
WIDE = {"head_dim": 12}
GEMMA = {**WIDE, "query_pre_attn_scalar": 8}
# name -> (transformers config class, settings beyond ODD, num_labels)
CASES = {
    "llama": ("LlamaConfig", {}, 3),
    "mistral": ("MistralConfig", WIDE, 1),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}, 1),
    "qwen3": ("Qwen3Config", WIDE, 3),
    "gemma": ("GemmaConfig", WIDE, 1),
    "gemma2": ("Gemma2Config", {**GEMMA, "sliding_window": 5, "final_logit_softcapping": 5.0}, 3),
    "gemma3_text": ("Gemma3TextConfig", {**GEMMA, "sliding_window": 5}, 1),
}
LENGTHS = np.array([9, 5, 1])
TOLERANCE = 1e-5  # float32 on both sides


def tokens(length: int = 11, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(token_ids, padding_mask)`` with pad id 0 (never a real token here)."""
    rng = np.random.default_rng(seed)
    mask = np.arange(length)[None, :] < LENGTHS[:, None]
    ids = np.where(mask, rng.integers(1, ODD["vocab_size"], (len(LENGTHS), length)), 0).astype(np.int32)
    return ids, mask


def hf_classifier(path, case, *, token=False, seed=0, **overrides):
    """A tiny random transformers classifier of ``case``, saved to ``path``, with a score layer
    of unit-scale weights (the default 0.02 init would make every score tiny)."""
    class_name, settings, labels = CASES[case]
    config = getattr(transformers, class_name)(**{**ODD, **settings, "num_labels": labels, **overrides})
    auto = transformers.AutoModelForTokenClassification if token else transformers.AutoModelForSequenceClassification
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
        if model.score.bias is not None:
            model.score.bias.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return model


def hf_scores(model, ids, mask):
    """transformers' ``(per-position scores [B, L, N], logits)``: the sequence classifier's
    logits are per row, the token classifier's per position."""
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        hidden = model.model(ids_t, attention_mask=mask_t).last_hidden_state
        return model.score(hidden).numpy(), model(ids_t, attention_mask=mask_t).logits.numpy()


def kithara_scores(model, ids, mask):
    inputs = {"token_ids": ids, "padding_mask": mask}
    return np.asarray(model.apply(model.variables, inputs, training=False)[0]), np.asarray(
        model.score(model.variables, inputs)
    )


def all_variables(model):
    return {k: np.asarray(v) for k, v in {**model.variables.trainable, **model.variables.non_trainable}.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_classifier_matches_transformers_and_round_trips(tmp_path, case):
    reference = hf_classifier(tmp_path / "in", case)
    labels = CASES[case][2]
    model = ScalarHeadModel.from_preset(str(tmp_path / "in"), sharding="fsdp")
    assert (model.num_labels, model.task, model.family) == (
        labels,
        "sequence_classification",
        reference.config.model_type,
    )
    assert model.variables.trainable["score/kernel"].shape == (ODD["hidden_size"], labels)
    ids, mask = tokens()
    expected_positions, expected = hf_scores(reference, ids, mask)
    positions, scores = kithara_scores(model, ids, mask)
    diff = np.abs(positions - expected_positions)[mask].max()
    assert diff < TOLERANCE, f"{case}: max |score difference| {diff}"
    assert scores.shape == ((3,) if labels == 1 else (3, labels))
    np.testing.assert_allclose(scores.reshape(expected.shape), expected, rtol=0, atol=TOLERANCE)

    model.save_in_hf_format(tmp_path / "out", max_shard_size=20_000)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(reference).__name__] and len(config["id2label"]) == labels
    exported, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert type(exported) is type(reference) and exported.config.num_labels == labels
    expected_state, got_state = reference.state_dict(), exported.state_dict()
    assert expected_state.keys() == got_state.keys()
    for name in expected_state:
        assert torch.equal(expected_state[name], got_state[name]), name
    again = ScalarHeadModel.from_preset(str(tmp_path / "out"))
    before, after = all_variables(model), all_variables(again)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


@pytest.mark.parametrize(("case", "settings"), [("qwen3", {}), ("gemma2", {"token_classification_bias": False})])
def test_token_classifier_matches_transformers_and_round_trips(tmp_path, case, settings):
    reference = hf_classifier(tmp_path / "in", case, token=True, **settings)
    labels = CASES[case][2]
    model = ScalarHeadModel.from_preset(str(tmp_path / "in"))
    assert (model.task, model.num_labels) == ("token_classification", labels)
    assert ("score/bias" in model.variables.trainable) == (not settings)
    ids, mask = tokens()
    _, expected = hf_scores(reference, ids, mask)  # eval mode: no dropout
    positions, _ = kithara_scores(model, ids, mask)
    diff = np.abs(positions - expected)[mask].max()
    assert diff < TOLERANCE, f"{case}: max |score difference| {diff}"

    model.save_in_hf_format(tmp_path / "out")
    exported, info = transformers.AutoModelForTokenClassification.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    assert type(exported) is type(reference)
    for name, value in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    again = ScalarHeadModel.from_preset(str(tmp_path / "out"))
    assert again.task == "token_classification"
    for path, value in all_variables(model).items():
        np.testing.assert_array_equal(all_variables(again)[path], value, err_msg=path)


def test_a_causal_lm_gets_a_new_head(tmp_path, caplog):
    config = transformers.LlamaConfig(**ODD)
    torch.manual_seed(0)
    causal = transformers.AutoModelForCausalLM.from_config(config).eval()
    causal.save_pretrained(tmp_path / "lm")
    with caplog.at_level(logging.INFO, logger="kithara.models.hf.classification"):
        model = ScalarHeadModel.from_preset(str(tmp_path / "lm"), seed=4)
    assert "a new 1-label score head is added" in caplog.text
    assert (model.num_labels, model.task) == (1, "sequence_classification")
    # No LM-head matrix is kept: the backbone is built with tied embeddings.
    assert "token_embedding/reverse_embeddings" not in all_variables(model)
    ids, mask = tokens()
    hidden = np.asarray(
        model.hidden_states(model.variables, {"token_ids": ids, "padding_mask": mask}, training=False)[0]
    )
    with torch.no_grad():
        expected = causal.model(torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    assert np.abs(hidden - expected)[mask].max() < TOLERANCE
    # The same head as the policy-copy route seeds (TRL's RewardTrainer adds one the same way).
    lm = kithara.KerasHubModel.from_preset(str(tmp_path / "lm"))
    copy = ScalarHeadModel.from_causal_lm(lm, seed=4)
    head = np.asarray(model.variables.trainable["score/kernel"])
    np.testing.assert_array_equal(head, np.asarray(copy.variables.trainable["score/kernel"]))
    assert head.std() == pytest.approx(1 / np.sqrt(ODD["hidden_size"] + 1), rel=0.3)
    three = ScalarHeadModel.from_preset(str(tmp_path / "lm"), num_labels=3, task="token_classification")
    assert three.variables.trainable["score/kernel"].shape == (ODD["hidden_size"], 3)

    # Exported, it is a LlamaForSequenceClassification with the causal LM's backbone tensors.
    copy.save_in_hf_format(tmp_path / "out", tokenizer=word_tokenizer())
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(exported).__name__ == "LlamaForSequenceClassification"
    for name, value in causal.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], value), name
    np.testing.assert_array_equal(exported.score.weight.detach().numpy(), head.T)


def test_lora_is_merged_on_export_and_written_as_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    reference = hf_classifier(tmp_path / "in", "qwen3")
    lora = kithara.LoraConfig(rank=2, alpha=4, targets=("all",))
    model = ScalarHeadModel.from_preset(str(tmp_path / "in"), lora=lora, sharding="fsdp")
    assert set(model.variables.trainable) == {"score/kernel"} | {
        p for p in model.variables.trainable if p.rsplit("/", 1)[-1].startswith("lora_kernel")
    }
    rng = np.random.default_rng(1)  # adapters (and a head) that change the scores
    model.variables = kithara.ModelVariables(
        {p: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for p, v in model.variables.trainable.items()},
        model.variables.non_trainable,
    )
    ids, mask = tokens()
    _, scores = kithara_scores(model, ids, mask)
    _, before = hf_scores(reference, ids, mask)
    assert np.abs(scores - before).max() > 1e-2  # the adapters matter

    model.save_in_hf_format(tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    np.testing.assert_allclose(hf_scores(merged, ids, mask)[1], scores, rtol=0, atol=TOLERANCE)

    model.save_peft_adapter(tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "in", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        logits = adapted(input_ids=ids_t, attention_mask=mask_t).logits.numpy()
    np.testing.assert_allclose(logits, scores, rtol=0, atol=TOLERANCE)


def test_exported_pad_token_id_is_the_tokenizers(tmp_path):
    """transformers reads the score at the last token that is not pad_token_id; kithara at the
    last position of padding_mask. They agree unless a row ends in the pad id."""
    hf_classifier(tmp_path / "in", "llama", pad_token_id=None)
    model = ScalarHeadModel.from_preset(str(tmp_path / "in"))
    tok = word_tokenizer()
    model.save_in_hf_format(tmp_path / "out", tokenizer=tok)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tok.pad_id == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").pad_token_id == tok.pad_id
    exported = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask = tokens()
    np.testing.assert_allclose(hf_scores(exported, ids, mask)[1], kithara_scores(model, ids, mask)[1], atol=TOLERANCE)
    ends_in_pad = ids.copy()
    ends_in_pad[0, LENGTHS[0] - 1] = tok.pad_id  # a real token that is the pad id (pad = EOS, say)
    positions, kithara_rows = kithara_scores(model, ends_in_pad, mask)
    hf_rows = hf_scores(exported, ends_in_pad, mask)[1]
    np.testing.assert_allclose(kithara_rows[0], positions[0, LENGTHS[0] - 1], atol=TOLERANCE)
    np.testing.assert_allclose(hf_rows[0], positions[0, LENGTHS[0] - 2], atol=TOLERANCE)  # an earlier token


def test_bad_checkpoints_and_settings_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_classifier(tmp_path / "in", "llama")
    with pytest.raises(ValueError, match=r"a LlamaForSequenceClassification .* kithara.ScalarHeadModel.from_preset"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "in"))
    with pytest.raises(ValueError, match=r"num_labels=2 but .* has 3 labels"):
        ScalarHeadModel.from_preset(str(tmp_path / "in"), num_labels=2)
    with pytest.raises(ValueError, match=r"task=.token_classification. but .* LlamaForSequenceClassification"):
        ScalarHeadModel.from_preset(str(tmp_path / "in"), task="token_classification")

    def edited(name, config_change=None, drop=None):
        out = tmp_path / name
        out.mkdir()
        config = json.loads((tmp_path / "in" / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, **(config_change or {})}))
        tensors = load_file(str(tmp_path / "in" / "model.safetensors"))
        save_file({k: v for k, v in tensors.items() if k != drop}, str(out / "model.safetensors"))
        return str(out)

    with pytest.raises(
        ValueError, match=r"'LlamaForQuestionAnswering' .* not supported .* LlamaForTokenClassification"
    ):
        ScalarHeadModel.from_preset(edited("qa", {"architectures": ["LlamaForQuestionAnswering"]}))
    with pytest.raises(ValueError, match=r"no 'score.weight', the classification head"):
        ScalarHeadModel.from_preset(edited("headless", drop="score.weight"))
    with pytest.raises(ValueError, match=r"'score.bias' is missing"):
        ScalarHeadModel.from_preset(edited("token", {"architectures": ["LlamaForTokenClassification"]}))
    with pytest.raises(ValueError, match="model_type 'falcon' is not supported"):
        ScalarHeadModel.from_preset(edited("falcon", {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="multimodal Gemma3ForSequenceClassification"):
        ScalarHeadModel.from_preset(edited("mm", {"architectures": ["Gemma3ForSequenceClassification"]}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ScalarHeadModel.from_preset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        ScalarHeadModel.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="head_bias=True needs task='token_classification'"):
        ScalarHeadModel.from_config("qwen3", head_bias=True, **kithara_tiny())
    gemma3 = ScalarHeadModel.from_config("gemma3", task="token_classification", **kithara_tiny())
    with pytest.raises(ValueError, match="no token_classification class for model_type 'gemma3_text'"):
        gemma3.save_in_hf_format(tmp_path / "gemma3")


def kithara_tiny():
    return dict(vocab_size=67, num_layers=1, hidden_dim=16, num_heads=2, num_kv_heads=1, intermediate_dim=24)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A LlamaForSequenceClassification reward model saved with its tokenizer (word_tokenizer's;
    not a Qwen2 one: transformers' AutoTokenizer makes a Qwen2Tokenizer for a qwen2 config.json)."""
    path = tmp_path_factory.mktemp("reward") / "tiny-rm"
    model = hf_classifier(path, "llama", seed=3, num_labels=1)
    word_tokenizer().backend.save_pretrained(path)
    return path, model


def test_grpo_takes_a_reward_model_directory(reward_dir, tmp_path):
    from rl_worker import PROMPTS, target_share

    from kithara.objectives import rollouts

    path, reference = reward_dir
    policy = kithara.KerasHubModel.from_config("qwen3", head_dim=12, **{**kithara_tiny(), "vocab_size": 64})
    tok = word_tokenizer()
    trainer = kithara.GRPOTrainer(
        policy,
        [str(path), target_share],
        train_dataset=[{"prompt": p} for p in PROMPTS],
        processing_class=tok,
        args=kithara.GRPOConfig(num_generations=4, per_device_train_batch_size=1, max_steps=1),
    )
    reward = trainer.reward_funcs[0]
    assert isinstance(reward, rollouts.ModelReward) and trainer.reward_names == ["tiny-rm", "target_share"]
    assert isinstance(reward.model, ScalarHeadModel) and reward.model.mesh == policy.mesh
    assert reward.tokenizer is not tok and reward.tokenizer.vocab_size == tok.vocab_size  # the directory's own
    prompts, completions = ["hello how", "bye"], [" are you", " ok ok thanks"]
    got = reward(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, got, strict=True):
        # RewardTrainer's encoding of a text row: [BOS] prompt + completion EOS.
        ids = torch.tensor([[*tok.encode_text(prompt + completion), tok.eos_id]], dtype=torch.long)
        with torch.no_grad():
            expected = reference(ids).logits.numpy()[0, 0]
        assert abs(score - expected) < TOLERANCE
    # On a given strategy; and a reward must be one score per completion, from a trained head.
    funcs = rollouts.reward_functions([path], None, tok, sharding=kithara.ShardingStrategy("dp"))
    assert funcs[0].model.strategy.name == "dp" and funcs[0](prompts, completions) == pytest.approx(got, abs=1e-6)
    hf_classifier(tmp_path / "three", "llama")
    with pytest.raises(ValueError, match="num_labels=3"):
        rollouts.reward_functions([str(tmp_path / "three")], None, tok)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**ODD)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="a causal LM: a reward model must be a trained"):
        rollouts.reward_functions([str(tmp_path / "lm")], None, tok)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        rollouts.reward_functions(["org/some-reward-model"], None, tok)
