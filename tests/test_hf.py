"""Hugging Face interop: logits parity with transformers, exact export round trips, LoRA."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import word_tokenizer, xla_flags

import kithara
from kithara.models.hf.config import UnsupportedConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCH = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16}
# Settings the cases below would otherwise make equal, pulled apart: head_dim != hidden_size
# / num_attention_heads (64 / 4 = 16), an rms epsilon and rope theta no default has, and odd
# sizes (vocab 131, intermediate 37, 6 query over 3 key/value heads, 3 layers).
WIDE = {"head_dim": 32, "rms_norm_eps": 3e-3, "rope_theta": 100.0}
ODD = {"vocab_size": 131, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}
ODD |= {"intermediate_size": 37, "num_hidden_layers": 3, "rms_norm_eps": 3e-3, "rope_theta": 300.0}
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0}
# name -> (transformers config class, settings beyond ARCH). Every case has GQA (4 query
# heads, 2 key/value heads) unless it says otherwise; the *_tied / *_rope cases move the
# settings keras-hub's converters used to drop.
CASES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "llama_tied_llama3_rope": (
        "LlamaConfig",
        {"num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama_mha": ("LlamaConfig", {"num_key_value_heads": 4, "rope_parameters": {"rope_theta": 1e4}}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2}),
    "mistral_window": (
        "MistralConfig",
        {"num_key_value_heads": 1, "rms_norm_eps": 1e-5, "sliding_window": 4, "rope_parameters": {"rope_theta": 1e6}},
    ),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen2_tied": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "qwen3_tied_wide_heads": (
        "Qwen3Config",
        {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    ),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, **GEMMA}),
    "gemma_rope": ("GemmaConfig", {"num_key_value_heads": 1, **GEMMA, "rms_norm_eps": 1e-5, "rope_theta": 5000.0}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, **GEMMA}),
    "gemma2_window_caps": (
        "Gemma2Config",
        {
            "num_key_value_heads": 2,
            **GEMMA,
            "rms_norm_eps": 1e-5,
            "sliding_window": 4,
            "final_logit_softcapping": 5.0,
            "attn_logit_softcapping": 3.0,
        },
    ),
    "gemma3": ("Gemma3TextConfig", {"num_key_value_heads": 2, **GEMMA}),
    "gemma3_rope_window": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 2,
            **GEMMA,
            "num_hidden_layers": 7,  # one global layer among sliding ones
            "rms_norm_eps": 1e-5,
            "sliding_window": 4,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
            },
        },
    ),
    "mistral_wide_heads": ("MistralConfig", {"num_key_value_heads": 2, **WIDE}),
    "qwen3_narrow_heads_eps": ("Qwen3Config", {"num_key_value_heads": 2, **WIDE, "head_dim": 8}),
    # (transformers' Gemma ignores query_pre_attn_scalar: it scales by head_dim.)
    "gemma_wide_heads": ("GemmaConfig", {"num_key_value_heads": 2, **WIDE, "query_pre_attn_scalar": 256}),
    # Gemma 2/3 9B: queries scaled by head_dim; 27B: by hidden_size / num_attention_heads.
    "gemma2_wide_heads": ("Gemma2Config", {"num_key_value_heads": 2, **WIDE, "query_pre_attn_scalar": 32}),
    "gemma2_27b_scale": ("Gemma2Config", {"num_key_value_heads": 2, **WIDE, "query_pre_attn_scalar": 16}),
    "gemma3_wide_heads": ("Gemma3TextConfig", {"num_key_value_heads": 2, **WIDE, "query_pre_attn_scalar": 32}),
    "gemma3_27b_scale": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 2,
            **WIDE,
            "query_pre_attn_scalar": 16,
            "num_hidden_layers": 6,  # the sixth is global
            "sliding_window": 5,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 100.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        },
    ),
    "llama_odd": ("LlamaConfig", ODD),
    "llama_odd_tied_llama3_rope": (
        "LlamaConfig",
        {**ODD, "tie_word_embeddings": True, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 300.0}},
    ),
    "mistral_odd_linear_rope": ("MistralConfig", {**ODD, "rope_parameters": LINEAR_ROPE}),
    "qwen2_odd": ("Qwen2Config", ODD),
    "qwen2_odd_tied_linear_rope": ("Qwen2Config", {**ODD, "tie_word_embeddings": True, "rope_parameters": LINEAR_ROPE}),
    "qwen3_odd_tied_linear_rope": (
        "Qwen3Config",
        {**ODD, "head_dim": 12, "tie_word_embeddings": True, "rope_parameters": LINEAR_ROPE},
    ),
    "gemma_odd": ("GemmaConfig", {**ODD, "head_dim": 12}),
    "gemma2_odd": ("Gemma2Config", {**ODD, "head_dim": 12, "query_pre_attn_scalar": 8, "sliding_window": 5}),
    "gemma3_odd": ("Gemma3TextConfig", {**ODD, "head_dim": 12, "query_pre_attn_scalar": 8, "sliding_window": 5}),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)


def hf_checkpoint(path, case):
    """A tiny random transformers model of ``case``, saved to ``path``; returns the model."""
    class_name, settings = CASES[case]
    config = getattr(transformers, class_name)(**{**ARCH, **settings})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def kithara_logits(model, tokens=TOKENS):
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}
    logits, _ = model.apply(model.variables, inputs, training=False)
    return np.asarray(logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    reference = hf_checkpoint(tmp_path, case)
    model = kithara.KerasHubModel.from_preset(str(tmp_path), sharding="fsdp")
    diff = np.abs(kithara_logits(model) - hf_logits(reference)).max()
    assert diff < 1e-4, f"{case}: max |logit difference| {diff}"


@pytest.mark.parametrize("case", ["llama_tied_llama3_rope", "mistral", "qwen3", "gemma2_27b_scale", "gemma3_27b_scale"])
def test_round_trip_gives_identical_weights(tmp_path, case):
    reference = hf_checkpoint(tmp_path / "in", case)
    model = kithara.KerasHubModel.from_preset(str(tmp_path / "in"), sharding="fsdp")
    model.save_in_hf_format(tmp_path / "out", max_shard_size=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    expected, got = reference.state_dict(), exported.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert np.array_equal(hf_logits(exported), hf_logits(reference))
    # ... and the sharded export loads back into kithara unchanged.
    again = kithara.KerasHubModel.from_preset(str(tmp_path / "out"))
    assert np.array_equal(kithara_logits(again), kithara_logits(model))


def test_single_file_export_with_generation_config_and_tokenizer(tmp_path):
    # (Not qwen2: transformers' AutoTokenizer rebuilds a Qwen2Tokenizer for a qwen2 config.json,
    # which this word-level test tokenizer is not.)
    hf_checkpoint(tmp_path / "in", "llama")
    # Extra stop ids and sampling defaults exist only in the source's generation_config.json
    # (as for Llama 3 Instruct's <|eot_id|>): the export must keep them.
    source = {"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.9, "do_sample": True}
    (tmp_path / "in" / "generation_config.json").write_text(json.dumps(source))
    model = kithara.KerasHubModel.from_preset(str(tmp_path / "in"))
    tokenizer = word_tokenizer()
    model.save_in_hf_format(tmp_path / "out", tokenizer=tokenizer)
    assert (tmp_path / "out" / "model.safetensors").exists()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded.encode("hello how are you") == tokenizer.backend.encode("hello how are you")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (generation.eos_token_id, generation.temperature, generation.top_p) == ([2, 5], 0.6, 0.9)
    from_config = kithara.KerasHubModel.from_config("llama3", vocab_size=64, num_layers=1, hidden_dim=32,
                                                    num_heads=4, num_kv_heads=2, intermediate_dim=64)  # fmt: skip
    from_config.save_in_hf_format(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    assert plain.get("eos_token_id") == config.get("eos_token_id")


def test_lora_export_merges_adapters(tmp_path):
    hf_checkpoint(tmp_path / "in", "llama")
    model = kithara.KerasHubModel.from_preset(
        str(tmp_path / "in"), lora=kithara.LoraConfig(rank=4, alpha=8, targets=("query", "value", "down"))
    )
    variables = model.variables
    rng = np.random.default_rng(1)
    trainable = {
        path: 0.1 * rng.standard_normal(value.shape).astype(np.float32) for path, value in variables.trainable.items()
    }
    model.variables = kithara.ModelVariables(trainable=trainable, non_trainable=variables.non_trainable)
    model.save_in_hf_format(tmp_path / "merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    diff = np.abs(hf_logits(exported) - kithara_logits(model)).max()
    assert diff < 1e-4


@pytest.mark.parametrize(
    ("family", "settings"),
    [
        *[(f, {}) for f in ("llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")],
        ("mistral", {"head_dim": 32}),
        ("qwen3", {"head_dim": 8}),
        ("gemma", {"head_dim": 32}),
        # Gemma 2/3 27B: queries scaled by hidden_dim / num_heads, not head_dim (keras-hub's
        # decoder blocks used to drop the setting, so kithara computed one scale and wrote the other).
        ("gemma2", {"head_dim": 32, "query_head_dim_normalize": False}),
        ("gemma3", {"head_dim": 32, "query_head_dim_normalize": False, "num_layers": 6}),
        ("gemma3", {"head_dim": 32, "query_head_dim_normalize": True}),
    ],
)
def test_export_from_config_model(tmp_path, family, settings):
    arch = dict(vocab_size=128, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=96)
    model = kithara.KerasHubModel.from_config(family, **{**arch, **settings})
    model.save_in_hf_format(tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    diff = np.abs(hf_logits(exported) - kithara_logits(model)).max()
    assert diff < 1e-4, f"{family} {settings}: max |logit difference| {diff}"


def test_export_refuses_a_query_scale_transformers_lacks(tmp_path):
    # transformers' Gemma (1) always scales queries by head_dim.
    model = kithara.KerasHubModel.from_config(
        "gemma", vocab_size=128, num_layers=1, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=96,
        head_dim=32, query_head_dim_normalize=False,
    )  # fmt: skip
    with pytest.raises(UnsupportedConfig, match="query_head_dim_normalize"):
        model.save_in_hf_format(tmp_path)


@pytest.mark.parametrize(
    ("case", "legacy"),
    [
        ("llama_tied_llama3_rope", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
        ("qwen3", {"rope_theta": 20000.0}),
        (
            "gemma3_rope_window",
            {
                "rope_theta": 100000.0,
                "rope_local_base_freq": 5000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            },
        ),
    ],
)
def test_configs_written_before_transformers_5_load(tmp_path, case, legacy):
    """Older config.json files carry rope_theta / rope_scaling (and Gemma 3's
    rope_local_base_freq) instead of rope_parameters."""
    hf_checkpoint(tmp_path, case)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**config, **legacy}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = kithara.KerasHubModel.from_preset(str(tmp_path))
    assert np.abs(kithara_logits(model) - hf_logits(reference)).max() < 1e-4


@pytest.mark.parametrize(
    ("class_name", "settings", "field"),
    [
        ("MistralConfig", {"tie_word_embeddings": True}, "tie_word_embeddings"),
        ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}, "rope_parameters"),
        ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window"),
        ("LlamaConfig", {"hidden_act": "gelu"}, "hidden_act"),
        # Llama3Backbone and QwenBackbone derive head_dim as hidden_size / num_attention_heads.
        ("LlamaConfig", {"head_dim": 32}, "head_dim"),
        ("Qwen2Config", {"head_dim": 32}, "head_dim"),
        ("GemmaConfig", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, class_name, settings, field):
    config = getattr(transformers, class_name)(**ARCH, **settings)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedConfig, match=field):
        kithara.KerasHubModel.from_preset(str(tmp_path))


def test_broken_checkpoints_fail_clearly(tmp_path):
    from safetensors.numpy import load_file, save_file

    good = tmp_path / "good"
    hf_checkpoint(good, "llama")
    tensors = load_file(str(good / "model.safetensors"))

    def variant(name, change):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text((good / "config.json").read_text())
        save_file(change(dict(tensors)), str(path / "model.safetensors"), metadata={"format": "pt"})
        return str(path)

    missing = variant("missing", lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(ValueError, match=r"has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        kithara.KerasHubModel.from_preset(missing)
    extra = variant(
        "extra", lambda t: {**t, "model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]}
    )
    with pytest.raises(ValueError, match=r"1 tensors its config\.json does not account for"):
        kithara.KerasHubModel.from_preset(extra)
    key = "model.layers.0.self_attn.q_proj.weight"
    wrong = variant("wrong", lambda t: {**t, key: t[key][:, :-1]})
    with pytest.raises(ValueError, match="q_proj"):
        kithara.KerasHubModel.from_preset(wrong)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((good / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        kithara.KerasHubModel.from_preset(str(corrupt))
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        kithara.KerasHubModel.from_preset(str(corrupt))


def trained_lora_model(path, targets):
    """A kithara model from the checkpoint at ``path`` with random (non-zero) adapters."""
    lora = kithara.LoraConfig(rank=2, alpha=6, targets=targets)
    model = kithara.KerasHubModel.from_preset(str(path), lora=lora)
    variables = model.variables
    rng = np.random.default_rng(2)
    trainable = {p: 0.1 * rng.standard_normal(v.shape).astype(np.float32) for p, v in variables.trainable.items()}
    model.variables = kithara.ModelVariables(trainable=trainable, non_trainable=variables.non_trainable)
    return model


@pytest.mark.parametrize("case", ["qwen2", "gemma2"])
def test_peft_adapter_round_trip(tmp_path, case):
    peft = pytest.importorskip("peft")
    base = hf_checkpoint(tmp_path / "base", case)
    targets = ("query", "key", "value", "attention_output", "gate", "down")
    model = trained_lora_model(tmp_path / "base", targets)
    model.save_peft_adapter(tmp_path / "adapter")
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    expected = kithara_logits(model)
    assert np.abs(hf_logits(with_adapter) - expected).max() < 1e-4
    # ... and back: the PEFT adapter folded into a fresh kithara model gives the same logits.
    fresh = kithara.KerasHubModel.from_preset(str(tmp_path / "base"), sharding="fsdp")
    assert fresh.merge_peft_adapter(tmp_path / "adapter") == 2 * 6
    assert np.abs(kithara_logits(fresh) - expected).max() < 1e-4
    # ... or loaded as adapters, to go on training them: every adapter variable comes back.
    again = kithara.KerasHubModel.from_preset(str(tmp_path / "base"), lora=kithara.LoraConfig(2, 6, targets))
    assert again.load_peft_adapter(tmp_path / "adapter") == 2 * 6
    for name, value in model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(again.variables.trainable[name]), np.asarray(value))


def test_peft_trained_adapter_merges_and_refuses_to_load_per_head(tmp_path):
    peft = pytest.importorskip("peft")
    base = hf_checkpoint(tmp_path / "base", "qwen3")
    adapter_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    tuned = peft.get_peft_model(base, adapter_config).eval()
    tuned.save_pretrained(tmp_path / "adapter")
    model = kithara.KerasHubModel.from_preset(str(tmp_path / "base"))
    assert model.merge_peft_adapter(tmp_path / "adapter") == 2 * 2
    assert np.abs(kithara_logits(model) - hf_logits(tuned)).max() < 1e-4
    adapted = kithara.KerasHubModel.from_preset(
        str(tmp_path / "base"), lora=kithara.LoraConfig(rank=4, alpha=8, targets=("query", "down"))
    )
    with pytest.raises(ValueError, match="merge_peft_adapter"):
        adapted.load_peft_adapter(tmp_path / "adapter")


@pytest.mark.slow
def test_two_process_export(tmp_path):
    """Two processes, one sharded model: variables are gathered across processes and
    process 0 writes the same checkpoint one process would."""
    reference = hf_checkpoint(tmp_path / "in", "gemma2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("hf_export_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(kithara.__file__).resolve().parents[1])}
    env["XLA_FLAGS"] = xla_flags()  # the worker asks for its own devices
    args = [str(tmp_path / "in"), str(tmp_path / "out")]
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, *args], env=env) for i in range(2)]
    try:
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
    finally:  # a crashed worker leaves its peer waiting at a barrier: never leave them running
        for p in procs:
            if p.poll() is None:
                p.kill()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected, got = reference.state_dict(), exported.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("case", ["gemma3_27b_scale", "qwen3_narrow_heads_eps", "gemma_rope"])
def test_rebuilt_backbone_gets_layer_settings_back(tmp_path, case):
    """A backbone rebuilt from a loaded one's ``get_config`` (as ``ScalarHeadModel.from_causal_lm``
    copies one) loses what was set on the loaded one's layers (query scale, norm epsilons, Gemma
    rope theta: 0.05-4.5 apart in hidden states); ``copy_layer_settings`` gives it back."""
    from kithara.models.building import copy_layer_settings

    hf_checkpoint(tmp_path, case)
    source = kithara.KerasHubModel.from_preset(str(tmp_path)).backbone
    rebuilt = type(source).from_config(source.get_config())
    for theirs, ours in zip(source.weights, rebuilt.weights, strict=True):
        ours.assign(theirs.value)
    copy_layer_settings(source, rebuilt)
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS, bool)}
    np.testing.assert_array_equal(np.asarray(rebuilt(inputs)), np.asarray(source(inputs)))
