"""Activation sharding (ScaleConfig.activation_sharding): the compiled train step gathers no
decoder activation over the global batch, and its results are those of the unconstrained step."""

import re

import jax
import numpy as np
import optax
import pytest
from conftest import pattern_examples
from jax.sharding import PartitionSpec

import kithara
from kithara.models.activation_sharding import constrain_hidden, hidden_spec

VOCAB, LENGTH, HIDDEN, ROWS = 61, 16, 64, 8
SHAPE = dict(vocab_size=VOCAB, num_layers=2, hidden_dim=HIDDEN, num_heads=4, num_kv_heads=2, intermediate_dim=96)


def activation_gathers(hlo: str, share: int, weights: set[tuple[int, ...]]) -> list[str]:
    """The all-gathers of a compiled program whose result has the global batch (``ROWS``) first,
    rank >= 3 and more elements than ``share``, one device's part of a ``[batch, length,
    hidden]`` hidden state, and is not a whole weight (a shape in ``weights``): activations
    gathered over the batch axes. (Embedding lookups may gather ``[batch, length, hidden /
    fsdp]`` token embeddings, which is one device's share.)"""
    found = []
    for line in hlo.splitlines():
        op = re.search(r" all-gather(-start)?\(", line)
        if op is None:
            continue
        for dims in re.findall(r"\w+\[([\d,]+)\]", line[: op.start()]):
            shape = [int(d) for d in dims.split(",")]
            if len(shape) >= 3 and shape[0] == ROWS and np.prod(shape) > share and tuple(shape) not in weights:
                found.append(line.strip()[:200])
                break
    return found


def compiled_step(strategy, family, activation_sharding, **kwargs):
    """A trainer's first train step (SGD, so parameter updates are the gradients) compiled and
    run: its HLO text, metrics and the updates."""
    scale = kithara.ScaleConfig(activation_sharding=activation_sharding)
    model = kithara.KerasHubModel.from_config(family, **SHAPE, **kwargs, sharding=strategy, scale=scale)
    loader = kithara.Dataloader(pattern_examples(ROWS, length=LENGTH, vocab=VOCAB), 1, shuffle=False)
    trainer = kithara.Trainer(model, optax.sgd(100.0), loader, steps=1, progress_bar=False)
    batch = next(trainer.batches(0, None))[1]
    hlo = trainer.lower_train_step(trainer.init_state(), batch).compile().as_text()
    before = jax.tree.map(np.asarray, model.variables.trainable)
    state, metrics = trainer.jitted_train_step(trainer.init_state(), batch)
    updates = {path: (value - np.asarray(state.model.trainable[path])) / 100.0 for path, value in before.items()}
    return hlo, jax.tree.map(np.asarray, metrics), updates, model


def weight_shapes(model) -> set[tuple[int, ...]]:
    return {tuple(v.shape) for v in jax.tree.leaves(model.variables)}


@pytest.mark.parametrize(
    ("strategy", "family", "kwargs"),
    [
        ("dp", "llama3", {}),
        ("fsdp", "qwen3", dict(head_dim=12, tie_word_embeddings=False)),
        (kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2), "gemma2", dict(sliding_window_size=4)),
    ],
    ids=["dp", "fsdp", "fsdp_tp"],
)
def test_compiled_step_gathers_no_activation_over_the_batch(strategy, family, kwargs):
    hlo, metrics, updates, model = compiled_step(strategy, family, True, **kwargs)
    mesh, weights = model.mesh, weight_shapes(model)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    share = ROWS * LENGTH * HIDDEN // shards
    assert activation_gathers(hlo, share, weights) == []
    plain_hlo, plain_metrics, plain_updates, _ = compiled_step(strategy, family, False, **kwargs)
    if shards > 1 and mesh.shape["data"] == 1:  # under FSDP, XLA's propagation gathers without the constraints
        assert len(activation_gathers(plain_hlo, share, weights)) > 0
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-5)
    for path, update in plain_updates.items():
        np.testing.assert_allclose(updates[path], update, rtol=1e-5, atol=1e-5 * np.abs(update).max(), err_msg=path)


def test_constraint_applies_only_where_the_batch_divides():
    x = np.zeros((ROWS, 5, 4), np.float32)

    def constrained(mesh, value):
        return "sharding_constraint" in str(jax.make_jaxpr(lambda v: constrain_hidden(v, mesh))(value))

    for strategy in ("dp", "fsdp", kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2)):
        mesh = kithara.sharding.as_strategy(strategy).make_mesh()
        assert constrained(mesh, x)
        assert not constrained(mesh, x[:3])  # 3 rows do not divide over the batch shards
        assert not constrained(mesh, x[:, :, 0])  # not [batch, length, hidden]
    one_shard = kithara.ShardingStrategy("fsdp_tp", tensor_parallel=8).make_mesh()
    assert not constrained(one_shard, x)
    assert constrain_hidden("not an array", one_shard) == "not an array"
    assert hidden_spec() == PartitionSpec(("data", "fsdp"), None, None)
