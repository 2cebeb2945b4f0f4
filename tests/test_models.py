import jax
import numpy as np
import pytest
from conftest import TINY, tiny_model

import kithara
from kithara.models.families import FAMILIES

INPUTS = {"token_ids": np.tile(np.arange(1, 9, dtype=np.int32), (8, 1)), "padding_mask": np.ones((8, 8), bool)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_and_runs_sharded(family):
    model = tiny_model(family, head_dim=8)
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, training=False))(model.variables, INPUTS)
    assert logits.shape == (8, 8, TINY["vocab_size"])
    assert np.isfinite(np.asarray(logits)).all()
    keras_count = model.causal_lm.count_params()
    assert model.num_params == keras_count
    assert model.num_trainable_params == keras_count  # no LoRA: everything trains
    for path, value in model.variables.trainable.items():
        assert value.sharding == model.variable_shardings.trainable[path]


def test_gemma_intermediate_dim_counts_one_projection():
    model = tiny_model("gemma", head_dim=8)
    shapes = {p: v.shape for p, v in model.variables.trainable.items()}
    assert shapes["decoder_block_0/ffw_gating/kernel"] == (TINY["hidden_dim"], TINY["intermediate_dim"])


def test_architecture_is_validated():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny_model(num_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown model family"):
        tiny_model("gpt5")
    with pytest.raises(ValueError, match="Unknown precision"):
        tiny_model(precision="fp8")


@pytest.mark.parametrize(
    ("precision", "variable_dtype", "logits_dtype"),
    [
        ("float32", "float32", "float32"),
        ("bfloat16", "bfloat16", "bfloat16"),
        ("mixed_bfloat16", "float32", "bfloat16"),
    ],
)
def test_precision_policies(precision, variable_dtype, logits_dtype):
    model = tiny_model(precision=precision)
    assert model.variables.trainable["transformer_layer_0/self_attention/query/kernel"].dtype == variable_dtype
    logits, _ = model.apply(model.variables, INPUTS, training=False)
    assert logits.dtype == logits_dtype


def test_lora_makes_only_adapters_trainable():
    lora = kithara.LoraConfig(rank=4, alpha=8, targets=("query", "value", "down"))
    model = tiny_model(lora=lora)
    trainable = set(model.variables.trainable)
    assert trainable and all(p.rsplit("/", 1)[-1] in ("lora_kernel_a", "lora_kernel_b") for p in trainable)
    adapted = {p.rsplit("/", 2)[-2] for p in trainable}
    assert adapted == {"query", "value", "feedforward_output_dense"}
    assert model.num_trainable_params == sum(int(np.prod(v.shape)) for v in model.variables.trainable.values())
    assert model.num_trainable_params < model.num_params / 5
    summary = model.summary()
    assert "LoRA rank 4, alpha 8" in summary and "trainable" in summary


def test_lora_bias_stays_frozen_and_targets_are_checked():
    model = tiny_model("qwen2", lora=kithara.LoraConfig(rank=2, targets=("all",)))
    assert not any(p.endswith("/bias") for p in model.variables.trainable)
    with pytest.raises(ValueError, match="Unknown LoRA targets"):
        kithara.LoraConfig(targets=("q_proj",))


def test_lora_starts_as_the_base_model():
    base = tiny_model(seed=3)
    adapted = tiny_model(seed=3, lora=kithara.LoraConfig(rank=4, targets=("all",)))
    a, _ = base.apply(base.variables, INPUTS, training=False)
    b, _ = adapted.apply(adapted.variables, INPUTS, training=False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # B starts at zero


def test_two_models_live_side_by_side():
    first, second = tiny_model(seed=1), tiny_model("gemma", seed=2, head_dim=8)
    a = np.asarray(first.apply(first.variables, INPUTS, training=False)[0])
    second.variables = jax.tree.map(lambda x: x * 0, second.variables)
    np.testing.assert_array_equal(a, np.asarray(first.apply(first.variables, INPUTS, training=False)[0]))


def test_variables_setter_checks_structure_and_shapes():
    model = tiny_model()
    variables = model.variables
    with pytest.raises(ValueError, match="missing"):
        model.variables = kithara.ModelVariables({}, variables.non_trainable)
    bad = dict(variables.trainable)
    bad["token_embedding/embeddings"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        model.variables = kithara.ModelVariables(bad, variables.non_trainable)


def test_from_preset_round_trip_and_errors(tmp_path):
    model = tiny_model(seed=7)
    model.causal_lm.save_to_preset(str(tmp_path / "preset"))
    loaded = kithara.KerasHubModel.from_preset(str(tmp_path / "preset"), sharding="fsdp_tp")
    for path, value in model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(loaded.variables.trainable[path]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "empty"))


def test_generate_is_greedy_and_stops():
    model = tiny_model(seed=5)
    prompts = [[1, 2, 3], [4, 5]]
    first = model.generate(prompts, max_length=12)
    assert first == model.generate(prompts, max_length=12)
    assert [len(r) for r in first] == [9, 10]
    # Greedy: each new token is the argmax of the logits of the sequence so far.
    seq = prompts[0] + first[0][:1]
    logits, _ = model.apply(
        model.variables, {"token_ids": np.asarray([prompts[0]]), "padding_mask": np.ones((1, 3), bool)}, training=False
    )
    assert int(np.argmax(np.asarray(logits)[0, -1])) == seq[3]
    stop = first[0][2]
    stopped = model.generate(prompts[:1], max_length=12, stop_token_ids=[stop])
    assert stopped[0] == first[0][: first[0].index(stop)]


def test_flops_per_token_counts_weights_and_attention():
    model = tiny_model()
    b = model.backbone
    kernels = sum(int(np.prod(v.shape)) for p, v in model.variables.trainable.items() if p.endswith("/kernel"))
    forward = 2 * (kernels + b.vocabulary_size * b.hidden_dim) + 4 * b.num_layers * 16 * b.hidden_dim
    assert model.flops_per_token(16, training=False) == forward
    assert model.flops_per_token(16) == 3 * forward
