from typing import Any

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np
import pytest
from conftest import TINY as _TINY
from conftest import tiny_model

import kithara
from kithara.models.scalar_head import ScalarHeadModel

TINY: dict[str, Any] = dict(_TINY)
# head_dim 12 != hidden 32 / 4 heads; odd lengths; right-padded rows of lengths 7, 4 and 1.
LENGTHS = np.array([7, 4, 1])


def batch(length: int = 7, fill: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.arange(length)[None, :] < LENGTHS[:, None]
    tokens = rng.integers(1, TINY["vocab_size"], size=(len(LENGTHS), length)).astype(np.int32)
    return {"token_ids": np.where(mask, tokens, fill).astype(np.int32), "padding_mask": mask}


def scalar_model(family: str = "qwen3", **kwargs) -> ScalarHeadModel:
    if family != "llama3":
        kwargs.setdefault("head_dim", 12)
    return ScalarHeadModel.from_config(family, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def model() -> ScalarHeadModel:
    return scalar_model(seed=1)


def backbone_output(model, variables, inputs):
    """``model.backbone``'s keras call on ``variables`` (passed in, not baked in as constants)."""
    values = {**variables.trainable, **variables.non_trainable}
    with keras.StatelessScope(state_mapping=[(v, values[v.path]) for v in model.backbone.variables]):
        return model.backbone(inputs)


def tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


@pytest.mark.parametrize(
    ("family", "precision", "variable_dtype"),
    [("qwen3", "float32", "float32"), ("gemma", "mixed_bfloat16", "float32"), ("llama3", "bfloat16", "bfloat16")],
)
def test_apply_gives_float32_scores_for_every_position(family, precision, variable_dtype):
    model = scalar_model(family, precision=precision)
    scores, new_non_trainable = jax.jit(lambda v, x: model.apply(v, x, training=False))(model.variables, batch())
    assert scores.shape == (3, 7, 1) and scores.dtype == jnp.float32
    assert np.isfinite(np.asarray(scores)).all()
    assert set(new_non_trainable) == set(model.variables.non_trainable)
    head = model.variables.trainable["score/kernel"]
    assert head.shape == (TINY["hidden_dim"], 1) and head.dtype == variable_dtype
    shardings = model.variable_shardings
    for part in ("trainable", "non_trainable"):
        for path, value in getattr(model.variables, part).items():
            assert value.sharding == getattr(shardings, part)[path], path
    # Llama 3's untied LM-head matrix plays no part: frozen. Everything else trains.
    frozen = set(model.variables.non_trainable)
    assert frozen == ({"token_embedding/reverse_embeddings"} if family == "llama3" else set())
    assert model.num_params == model.keras_model.count_params()


def test_score_reads_each_rows_last_token(model):
    inputs = batch()
    scores = np.asarray(model.apply(model.variables, inputs, training=False)[0])
    picked = np.asarray(model.score(model.variables, inputs))
    assert picked.dtype == np.float32
    np.testing.assert_array_equal(picked, scores[np.arange(3), LENGTHS - 1, 0])
    jitted = np.asarray(jax.jit(model.score)(model.variables, inputs))  # XLA may fuse differently
    np.testing.assert_allclose(jitted, picked, rtol=1e-5, atol=1e-6)
    # Left padding and an empty row (score 0).
    left = {"token_ids": inputs["token_ids"][:, ::-1].copy(), "padding_mask": inputs["padding_mask"][:, ::-1].copy()}
    left_scores = np.asarray(model.apply(model.variables, left, training=False)[0])
    np.testing.assert_array_equal(np.asarray(model.score(model.variables, left)), left_scores[:, -1, 0])
    empty = {"token_ids": inputs["token_ids"], "padding_mask": np.zeros_like(inputs["padding_mask"])}
    np.testing.assert_array_equal(np.asarray(model.score(model.variables, empty)), np.zeros(3, np.float32))


def test_scores_ignore_the_padding_after_a_row(model):
    short = batch(fill=0)
    noisy = batch(fill=5)  # other padding ids
    longer = {  # and more padding
        "token_ids": np.pad(short["token_ids"], ((0, 0), (0, 4)), constant_values=9),
        "padding_mask": np.pad(short["padding_mask"], ((0, 0), (0, 4))),
    }
    variables = model.variables
    score = jax.jit(model.score)
    reference = np.asarray(score(variables, short))
    np.testing.assert_array_equal(np.asarray(score(variables, noisy)), reference)
    np.testing.assert_allclose(np.asarray(score(variables, longer)), reference, rtol=1e-5, atol=1e-6)
    apply = jax.jit(lambda v, x: model.apply(v, x, training=False)[0])
    a = np.asarray(apply(variables, short))
    b = np.asarray(apply(variables, longer))[:, :7]
    mask = short["padding_mask"]
    np.testing.assert_allclose(a[mask], b[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "precision", "lora", "sharding"),
    [
        ("llama3", "mixed_bfloat16", None, None),
        ("gemma3", "float32", None, None),  # queries scaled by hidden/heads, not head_dim: a layer setting
        (
            "gemma",
            "float32",
            kithara.LoraConfig(rank=2, targets=("all",)),
            kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2),
        ),
    ],
)
def test_from_causal_lm_copies_the_backbone_exactly(family, precision, lora, sharding):
    kwargs = {} if family == "llama3" else {"head_dim": 12}
    if family == "gemma3":  # the Gemma-3-27B shape: a setting keras-hub keeps only on the built layers
        kwargs["query_head_dim_normalize"] = False
    lm = tiny_model(family, seed=3, lora=lora, sharding=sharding, precision=precision, **kwargs)
    if lora is not None:  # adapters that do something, so copying them matters
        lm.variables = kithara.ModelVariables(
            {p: v + 0.05 for p, v in lm.variables.trainable.items()}, lm.variables.non_trainable
        )
    value = ScalarHeadModel.from_causal_lm(lm, seed=5)
    assert value.strategy == lm.strategy and value.mesh == lm.mesh and value.family == family
    assert value.lora == lm.lora and value.backbone.dtype_policy.name == precision
    source = {**lm.variables.trainable, **lm.variables.non_trainable}
    copied = {**value.variables.trainable, **value.variables.non_trainable}
    assert set(copied) == set(source) | {"score/kernel"}
    for path, array in source.items():
        np.testing.assert_array_equal(np.asarray(copied[path]), np.asarray(array))
        assert copied[path].sharding == array.sharding
    if lora is not None:
        lora_paths = {p for p in source if p.rsplit("/", 1)[-1].startswith("lora_kernel")}
        assert set(value.variables.trainable) == lora_paths | {"score/kernel"}
    inputs = batch()
    hidden = np.asarray(jax.jit(lambda v, x: backbone_output(lm, v, x))(lm.variables, inputs))
    states = jax.jit(lambda v, x: value.hidden_states(v, x, training=False)[0])(value.variables, inputs)
    np.testing.assert_array_equal(np.asarray(states), hidden)
    scores = np.asarray(jax.jit(lambda v, x: value.apply(v, x, training=False)[0])(value.variables, inputs))
    head = np.asarray(value.variables.trainable["score/kernel"])
    # Under mixed_bfloat16, XLA may fuse the last norm into the float32 head (no bf16 rounding between).
    tolerance = 1e-5 if precision == "float32" else 5e-2
    np.testing.assert_allclose(scores, hidden.astype(np.float32) @ head, rtol=tolerance, atol=tolerance)
    if lora is None:  # the LM head matmul (3x for training) is replaced by the [hidden, 1] head
        b = lm.backbone
        saved = 3 * 2 * (b.vocabulary_size * b.hidden_dim - b.hidden_dim)
        assert lm.flops_per_token(16) - value.flops_per_token(16) == saved

    # Independent copies: a training update of one leaves the other as it was, even once
    # the other's buffers are donated (deleted).
    before = jax.tree.map(np.asarray, lm.variables)
    frozen = value.variables.non_trainable
    grads = jax.jit(jax.grad(lambda t: value.score(kithara.ModelVariables(t, frozen), inputs).sum()))(
        value.variables.trainable
    )
    value.variables = kithara.ModelVariables(
        jax.tree.map(lambda v, g: v - 0.5 * g, value.variables.trainable, grads), frozen
    )
    assert tree_equal(lm.variables, before)
    score = jax.jit(value.score)
    expected = np.asarray(score(value.variables, inputs))
    assert not np.allclose(expected, scores[np.arange(3), LENGTHS - 1, 0])  # it did train
    for array in jax.tree.leaves(lm.variables):
        array.delete()
    np.testing.assert_array_equal(np.asarray(score(value.variables, inputs)), expected)


def test_from_causal_lm_seeds_a_fresh_head(model):
    again = ScalarHeadModel.from_causal_lm(model, seed=1)  # a scalar model's backbone copies too
    other = ScalarHeadModel.from_causal_lm(model, seed=2)
    zero = ScalarHeadModel.from_causal_lm(model, head_init_std=0.0)
    head = model.variables.trainable["score/kernel"]
    np.testing.assert_array_equal(np.asarray(again.variables.trainable["score/kernel"]), np.asarray(head))
    assert not np.array_equal(np.asarray(other.variables.trainable["score/kernel"]), np.asarray(head))
    assert model.head_init_std == pytest.approx(1 / np.sqrt(TINY["hidden_dim"] + 1))
    np.testing.assert_array_equal(np.asarray(jax.jit(zero.score)(zero.variables, batch())), np.zeros(3, np.float32))


def test_gradient_reaches_the_head(model):
    inputs = batch()

    def total(trainable):
        return model.score(kithara.ModelVariables(trainable, model.variables.non_trainable), inputs).sum()

    grads = jax.jit(jax.grad(total))(model.variables.trainable)
    assert set(grads) == set(model.variables.trainable)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert np.abs(np.asarray(grads["score/kernel"])).sum() > 0
    assert np.abs(np.asarray(grads["transformer_layer_0/self_attention/query/kernel"])).sum() > 0


def test_lora_trains_only_adapters_and_the_head():
    lora = kithara.LoraConfig(rank=4, alpha=8, targets=("all",))
    adapted = scalar_model("gemma", seed=4, lora=lora)
    trainable = set(adapted.variables.trainable)
    assert "score/kernel" in trainable
    assert all(p == "score/kernel" or p.rsplit("/", 1)[-1] in ("lora_kernel_a", "lora_kernel_b") for p in trainable)
    assert len(trainable) == 1 + 2 * 7 * TINY["num_layers"]
    assert not any("lora" in p for p in adapted.variables.non_trainable)
    inputs = batch()
    frozen = adapted.variables.non_trainable
    grads = jax.jit(jax.grad(lambda t: adapted.score(kithara.ModelVariables(t, frozen), inputs).sum()))(
        adapted.variables.trainable
    )
    assert np.abs(np.asarray(grads["score/kernel"])).sum() > 0
    assert np.abs(np.asarray(grads["decoder_block_0/attention/query/lora_kernel_b"])).sum() > 0
    train_flops = adapted.flops_per_token(16)
    assert adapted.flops_per_token(16, training=False) < train_flops < 3 * adapted.flops_per_token(16, training=False)


def test_two_device_mesh_gives_the_one_device_scores():
    devices = jax.devices()
    assert len(devices) >= 2  # conftest forces 8 host devices
    inputs = batch()
    results = []
    for name, tensor_parallel, count in (("fsdp", 1, 1), ("fsdp", 1, 2), ("fsdp_tp", 2, 2)):
        strategy = kithara.ShardingStrategy(name, tensor_parallel=tensor_parallel, devices=devices[:count])
        model = scalar_model(seed=6, sharding=strategy)
        assert model.mesh.devices.size == count
        head = model.variables.trainable["score/kernel"]
        assert len(head.sharding.device_set) == count
        results.append(np.asarray(jax.jit(model.score)(model.variables, inputs)))
    assert kithara.ShardingStrategy("fsdp", devices=devices[:2]).make_mesh().shape["fsdp"] == 2
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-5, atol=1e-6)


def test_wrong_inputs_are_refused(model):
    inputs = batch()
    with pytest.raises(ValueError, match=r"lack \['padding_mask'\]"):
        model.apply(model.variables, {"token_ids": inputs["token_ids"]}, training=False)
    with pytest.raises(ValueError, match="lack"):
        model.score(model.variables, {"padding_mask": inputs["padding_mask"]})
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model.apply(model.variables, {**inputs, "padding_mask": inputs["padding_mask"][:, :3]}, training=False)
    with pytest.raises(ValueError, match="packed"):
        model.apply(model.variables, {**inputs, "segment_ids": inputs["token_ids"]}, training=False)
    with pytest.raises(TypeError, match="no LM head"):
        model.token_logps(model.variables, inputs, inputs["token_ids"], training=False)
    with pytest.raises(TypeError, match="mapping"):
        model.apply(model.variables, inputs["token_ids"], training=False)
    with pytest.raises(ValueError, match="Unknown model family"):
        ScalarHeadModel.from_config("gpt5", **TINY)
    with pytest.raises(TypeError):
        ScalarHeadModel.from_config("qwen3", head_dim=12, rope_wavelength=10, **TINY)
    with pytest.raises(ValueError, match="head_init_std"):
        ScalarHeadModel.from_causal_lm(model, head_init_std=-1.0)
    with pytest.raises(TypeError, match="from_causal_lm"):
        ScalarHeadModel(tiny_model().causal_lm)
    with pytest.raises(TypeError, match="Backbone"):
        ScalarHeadModel(model)
    with pytest.raises(TypeError, match="KerasHubModel"):
        ScalarHeadModel.from_causal_lm(model.backbone)
    assert isinstance(model.backbone, keras_hub.models.Backbone)


def test_num_labels_gives_a_score_per_label(model):
    classes = ScalarHeadModel.from_causal_lm(model, seed=2, num_labels=3, task="token_classification")
    assert classes.num_labels == 3 and classes.task == "token_classification" and model.num_labels == 1
    assert model.task == "sequence_classification"
    head = np.asarray(classes.variables.trainable["score/kernel"])
    assert head.shape == (TINY["hidden_dim"], 3)
    inputs = batch()
    scores = np.asarray(jax.jit(lambda v, x: classes.apply(v, x, training=False)[0])(classes.variables, inputs))
    assert scores.shape == (3, 7, 3) and scores.dtype == np.float32
    hidden = np.asarray(jax.jit(lambda v, x: classes.hidden_states(v, x, training=False)[0])(classes.variables, inputs))
    np.testing.assert_allclose(scores, hidden @ head, rtol=1e-5, atol=1e-6)
    picked = np.asarray(classes.score(classes.variables, inputs))
    assert picked.shape == (3, 3)
    eager = np.asarray(classes.apply(classes.variables, inputs, training=False)[0])
    np.testing.assert_array_equal(picked, eager[np.arange(3), LENGTHS - 1])
    empty = {"token_ids": inputs["token_ids"], "padding_mask": np.zeros_like(inputs["padding_mask"])}
    np.testing.assert_array_equal(np.asarray(classes.score(classes.variables, empty)), np.zeros((3, 3), np.float32))
    # The head's two extra columns are all that differ in FLOPs (6 per parameter when training).
    assert classes.flops_per_token(16) - model.flops_per_token(16) == 6 * 2 * TINY["hidden_dim"]
    built = scalar_model(num_labels=2, seed=1)
    assert built.num_labels == 2 and built.variables.trainable["score/kernel"].shape == (TINY["hidden_dim"], 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_labels"):
            ScalarHeadModel.from_causal_lm(model, num_labels=bad)
    with pytest.raises(ValueError, match="task must be one of"):
        ScalarHeadModel.from_causal_lm(model, task="regression")
