"""kithara.utils: compute_accuracy against TRL's code, disable_dropout, freeze_layers,
count_parameters by hand, empty_cache and cast_adapters on tiny models."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, tiny_model

import kithara
from kithara.utils import (
    cast_adapters,
    compute_accuracy,
    count_parameters,
    disable_dropout,
    empty_cache,
    freeze_layers,
)


def trl_compute_accuracy(eval_pred):
    """TRL's ``trl.trainer.utils.compute_accuracy`` (0.12-0.24; TRL 1.x no longer ships it),
    transcribed without its accelerate logging."""
    predictions, labels = eval_pred
    if predictions.ndim == 3:
        predictions = np.argmax(predictions, axis=2)
        predictions = np.array(
            [
                p
                for prediction, label in zip(predictions, labels, strict=True)
                for (p, lbl) in zip(prediction, label, strict=True)
                if lbl != -100
            ]
        )
        labels = np.array([lbl for label in labels for lbl in label if lbl != -100])
    else:
        equal_mask = predictions[:, 0] == predictions[:, 1]
        predictions = predictions[~equal_mask]
        labels = labels[~equal_mask]
        predictions = np.argmax(predictions, axis=1)
    accuracy = np.array(predictions == labels, dtype=float).mean().item()
    return {"accuracy": accuracy}


def test_compute_accuracy_is_trls():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 4, size=(64, 2)).astype(np.float32)  # many ties
    labels = rng.integers(0, 2, size=64)
    assert compute_accuracy((pairs, labels)) == trl_compute_accuracy((pairs, labels))
    # By hand: pairs 1 and 3 are right, 2 is wrong, the tie is left out.
    hand = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, -1.0]])
    assert compute_accuracy((hand, np.zeros(4, int))) == {"accuracy": 2 / 3}
    tokens = rng.normal(size=(4, 7, 3))
    token_labels = rng.integers(0, 3, size=(4, 7))
    token_labels[rng.random((4, 7)) < 0.4] = -100
    assert compute_accuracy((tokens, token_labels)) == pytest.approx(trl_compute_accuracy((tokens, token_labels)))

    class EvalPrediction:  # transformers' object form
        predictions, label_ids = hand, np.zeros(4, int)

    assert compute_accuracy(EvalPrediction()) == {"accuracy": 2 / 3}
    assert np.isnan(compute_accuracy((np.ones((2, 2)), np.zeros(2, int)))["accuracy"])  # all ties
    with pytest.raises(ValueError, match=r"predictions must be \[rows, 2\]"):
        compute_accuracy((np.ones((3, 4)), np.zeros(3)))
    with pytest.raises(ValueError, match="need labels of shape"):
        compute_accuracy((tokens, token_labels[:, :3]))


INPUTS = {"token_ids": jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 60 + 3, "padding_mask": jnp.ones((2, 8), bool)}


def with_seeds(model, seed_state):
    """The model's variables with every dropout seed state set to ``seed_state``."""
    variables = model.variables
    seeds = {p: jnp.full_like(v, seed_state) for p, v in variables.non_trainable.items() if "seed_generator" in p}
    assert seeds, "the model should have dropout seed generators"
    return kithara.ModelVariables(variables.trainable, {**variables.non_trainable, **seeds})


def test_disable_dropout_makes_training_forwards_deterministic():
    model = tiny_model(dropout=0.5)
    train = jax.jit(lambda v: model.apply(v, INPUTS, training=True)[0])  # traces (reads the rates) once
    assert not np.allclose(train(with_seeds(model, 1)), train(with_seeds(model, 2)))  # dropout draws differ
    assert disable_dropout(model) == 4  # residual and attention dropout of each of 2 layers
    train = jax.jit(lambda v: model.apply(v, INPUTS, training=True)[0])
    first, second = np.asarray(train(with_seeds(model, 1))), np.asarray(train(with_seeds(model, 2)))
    np.testing.assert_array_equal(first, second)
    evaluation = jax.jit(lambda v: model.apply(v, INPUTS, training=False)[0])
    np.testing.assert_allclose(first, np.asarray(evaluation(model.variables)), rtol=1e-6, atol=1e-6)
    assert model.backbone.get_config()["dropout"] == 0.0
    assert disable_dropout(model) == 0


def llama_parameters(vocab, layers, hidden, heads, kv_heads, intermediate, head_dim=None):
    """Trainable parameters of a keras-hub Llama 3 with untied embeddings, by hand."""
    head_dim = head_dim or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    feedforward = 3 * hidden * intermediate
    return 2 * vocab * hidden + layers * (attention + feedforward + 2 * hidden) + hidden


def test_count_parameters_by_hand():
    model = tiny_model()
    by_hand = llama_parameters(
        TINY["vocab_size"], TINY["num_layers"], TINY["hidden_dim"], TINY["num_heads"], TINY["num_kv_heads"],
        TINY["intermediate_dim"],
    )  # fmt: skip
    assert count_parameters(model, trainable_only=True) == by_hand == 22688
    assert count_parameters(model) == by_hand  # no dropout: no seed generators
    seeds = 2 * 2 * TINY["num_layers"]  # with dropout, two [2] seed states per layer (attention and residual)
    assert count_parameters(tiny_model(dropout=0.1)) == by_hand + seeds
    # keras' EinsumDense LoRA: a is the kernel's shape but its last axis (rank), b [rank, last axis]:
    # query kernel [32, 4 heads, 8], value kernel [32, 2 heads, 8].
    lora = tiny_model(lora=kithara.LoraConfig(rank=2))
    per_layer = (32 * 4 * 2 + 2 * 8) + (32 * 2 * 2 + 2 * 8)
    assert count_parameters(lora, trainable_only=True) == TINY["num_layers"] * per_layer
    assert count_parameters(lora) == by_hand + count_parameters(lora, trainable_only=True)
    with pytest.raises(TypeError, match=r"must be a kithara\.Model"):
        count_parameters(object())


def trainer_for(model, examples, steps=2):
    loader = kithara.Dataloader(examples[:16], 1, seed=0)
    return kithara.Trainer(model, kithara.optimizers.adamw(1e-2), loader, steps=steps, progress_bar=False)


def slot_sizes(trainer):
    leaves = jax.tree.leaves(trainer.abstract_state().opt_state)
    return sum(x.size for x in leaves if x.ndim), sum(x.size * x.dtype.itemsize for x in leaves if x.ndim)


def test_freeze_layers_drops_optimizer_state_and_keeps_frozen_weights(examples):
    whole = slot_sizes(trainer_for(tiny_model(), examples))
    model = tiny_model()
    before = {p: np.asarray(v) for p, v in model.variables.trainable.items()}
    frozen = freeze_layers(model, [r"^token_embedding/", r"transformer_layer_0/.*_dense/"])
    assert frozen == [
        "token_embedding/embeddings",
        "token_embedding/reverse_embeddings",
        "transformer_layer_0/feedforward_intermediate_dense/kernel",
        "transformer_layer_0/feedforward_gate_dense/kernel",
        "transformer_layer_0/feedforward_output_dense/kernel",
    ]
    assert not set(frozen) & set(model.variables.trainable) and set(frozen) <= set(model.variables.non_trainable)
    frozen_size = sum(before[p].size for p in frozen)
    assert count_parameters(model, trainable_only=True) == sum(v.size for v in before.values()) - frozen_size
    trainer = trainer_for(model, examples)
    count, size = slot_sizes(trainer)
    assert (count, size) == (whole[0] - 2 * frozen_size, whole[1] - 2 * 4 * frozen_size)  # AdamW mu, nu float32
    trainer.train()
    after = {**model.variables.trainable, **model.variables.non_trainable}
    for path, value in before.items():
        if path in frozen:
            np.testing.assert_array_equal(np.asarray(after[path]), value, err_msg=path)
        else:
            assert not np.array_equal(np.asarray(after[path]), value), path
    assert freeze_layers(model, "^token_embedding/") == []  # already frozen: nothing new, no error


def test_freeze_layers_refuses_patterns_that_match_nothing():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'transformer_layer_7/query' matches no variable path.*transformer_layer_"):
        freeze_layers(model, "transformer_layer_7/query")
    with pytest.raises(ValueError, match="is not a regular expression"):
        freeze_layers(model, "query[")
    with pytest.raises(ValueError, match="patterns must be"):
        freeze_layers(model, [])
    with pytest.raises(ValueError, match="would leave nothing to train"):
        freeze_layers(model, ".")
    with pytest.raises(TypeError, match="kithara model built on keras"):
        freeze_layers(object(), ".")
    assert len(model.variables.trainable) == 21  # nothing was frozen by the refused calls


def test_empty_cache_clears_compiled_programs_and_cycles():
    double = jax.jit(lambda x: 2 * x)
    double(jnp.ones(3))
    assert double._cache_size() == 1

    class Node:
        pass

    node = Node()
    node.self, node.array = node, jnp.ones(1000)  # a cycle: freed only by the collector
    alive = weakref.ref(node)
    del node
    gc.disable()
    try:
        assert alive() is not None
        assert empty_cache() is True  # glibc: malloc_trim ran
        assert alive() is None
    finally:
        gc.enable()
    assert double._cache_size() == 0


def test_cast_adapters_to_bfloat16_and_train(examples):
    model = tiny_model(lora=kithara.LoraConfig(rank=2))
    cast = cast_adapters(model)
    assert len(cast) == 8 and all("lora_kernel" in p for p in cast)
    dtypes = {p: v.dtype for p, v in {**model.variables.trainable, **model.variables.non_trainable}.items()}
    assert all(dtypes[p] == jnp.bfloat16 for p in cast)
    assert {d for p, d in dtypes.items() if p not in cast} == {np.dtype("float32")}
    shardings = model.variable_shardings.trainable
    assert all(model.variables.trainable[p].sharding == shardings[p] for p in cast)
    before = {p: np.asarray(v.astype(jnp.float32)) for p, v in model.variables.trainable.items()}
    trainer = trainer_for(model, examples)
    history = trainer.train()
    assert all(np.isfinite(h["loss"]) for h in history)
    assert {v.dtype for v in jax.tree.leaves(trainer.train_state.opt_state) if v.ndim} == {np.dtype(jnp.bfloat16)}
    after = model.variables.trainable
    assert all(after[p].dtype == jnp.bfloat16 for p in cast)
    assert any(not np.array_equal(np.asarray(after[p].astype(jnp.float32)), before[p]) for p in cast if "_b" in p)
    with pytest.raises(ValueError, match="has no LoRA factors"):
        cast_adapters(tiny_model())
    with pytest.raises(ValueError, match="dtype must be one of"):
        cast_adapters(model, "int8")
