"""Remat policies (ScaleConfig.remat, gradient_checkpointing): the same losses and gradients as the
policy-free step for every policy and family, packed rows and LoRA included; each policy changes
what the backward pass keeps; dropout state threads through; TRL's gradient_checkpointing."""

import contextlib
import io
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, tiny_seq2seq

import kithara
from kithara.models import remat
from kithara.models.model import ModelVariables
from kithara.models.scale_config import REMAT_POLICIES

POLICIES = [p for p in REMAT_POLICIES if p != "none"]
VOCAB, LENGTH, ROWS = 61, 13, 8
# qwen3: head_dim != hidden / heads; gemma2: soft-capping and sliding window; untied LM heads.
FAMILIES = {
    "llama3": dict(tie_word_embeddings=False),
    "qwen3": dict(head_dim=12, tie_word_embeddings=False),
    "gemma2": dict(sliding_window_size=4),
    "gemma3": dict(sliding_window_size=4),
}
SHAPE = dict(vocab_size=VOCAB, num_layers=2, hidden_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=48)


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """``ROWS`` rows of three examples each, some rows ending in padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (ROWS, LENGTH + 1)).astype(np.int32)
    segment_ids = np.zeros((ROWS, LENGTH), np.int32)
    positions = np.zeros((ROWS, LENGTH), np.int32)
    for row in range(ROWS):
        bounds = [0, *sorted(rng.choice(np.arange(2, LENGTH - 2), 2, replace=False)), LENGTH - row % 3]
        for segment, (start, end) in enumerate(itertools.pairwise(bounds), start=1):
            segment_ids[row, start:end] = segment
            positions[row, start:end] = np.arange(end - start)
    valid = segment_ids > 0
    return {
        "token_ids": tokens[:, :-1] * valid,
        "padding_mask": valid,
        "segment_ids": segment_ids,
        "positions": positions,
        "labels": tokens[:, 1:],
        "label_mask": valid,
    }


def padded_batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (ROWS, LENGTH + 1)).astype(np.int32)
    valid = np.arange(LENGTH)[None, :] < rng.integers(4, LENGTH + 1, (ROWS, 1))
    return {"token_ids": tokens[:, :-1] * valid, "padding_mask": valid, "labels": tokens[:, 1:], "label_mask": valid}


def loss_fn(model, batch, *, training=True):
    """Masked next-token NLL of ``model`` as a function of its trainable variables."""
    non_trainable = model.variables.non_trainable
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}

    def loss(trainable):
        logits, new_non_trainable = model.apply(ModelVariables(trainable, non_trainable), inputs, training=training)
        logps = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logps, batch["labels"][..., None], -1)[..., 0]
        mask = batch["label_mask"].astype(jnp.float32)
        return jnp.sum(nll * mask) / jnp.sum(mask), new_non_trainable

    return loss


def loss_and_grads(model, batch, **kwargs):
    (loss, state), grads = jax.jit(jax.value_and_grad(loss_fn(model, batch, **kwargs), has_aux=True))(
        model.variables.trainable
    )
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, state)


def assert_same_step(got, want):
    """Losses to rtol 1e-5; each gradient to rtol 1e-5 of its elements, with a floor of 1e-5 of the
    tensor's largest entry for elements that cancel to near zero (float32 rounding of a
    recomputation that XLA fuses differently)."""
    (loss, grads, state), (want_loss, want_grads, want_state) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for path, grad in want_grads.items():
        np.testing.assert_allclose(grads[path], grad, rtol=1e-5, atol=1e-5 * np.abs(grad).max(), err_msg=path)
    for path, value in want_state.items():
        np.testing.assert_array_equal(state[path], value, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_policy_gives_the_policy_free_step_on_packed_rows(family):
    model = tiny_model(family, **{**SHAPE, **FAMILIES[family]})
    batch = packed_batch()
    want = loss_and_grads(model, batch)
    for policy in POLICIES:
        model.scale = kithara.ScaleConfig(remat=policy)
        assert_same_step(loss_and_grads(model, batch), want)


@pytest.mark.slow
def test_every_policy_gives_the_policy_free_step_with_lora():
    lora = kithara.LoraConfig(rank=4, targets=("query", "value", "down"))
    model = tiny_model("qwen3", **{**SHAPE, **FAMILIES["qwen3"]}, lora=lora)
    batch = padded_batch()
    want = loss_and_grads(model, batch)
    assert all("lora" in path for path in want[1])
    for policy in POLICIES:
        model.scale = kithara.ScaleConfig(remat=policy)
        assert_same_step(loss_and_grads(model, batch), want)


def test_dropout_seed_state_threads_through_remat():
    """Dropout writes its seed generator's state inside the checkpointed block: the new state leaves
    jax.checkpoint as an output, and the recomputation draws the same masks."""
    model = tiny_model("llama3", **SHAPE, dropout=0.25)
    batch = padded_batch()
    want = loss_and_grads(model, batch)
    assert any("seed_generator" in path for path in want[2])
    for policy in ("full", "attention_out"):
        model.scale = kithara.ScaleConfig(remat=policy)
        got = loss_and_grads(model, batch)
        assert_same_step(got, want)
        for path, value in got[2].items():
            if "seed_generator" in path:
                # Advanced: dropout drew its masks, inside the checkpointed block.
                assert not np.array_equal(value, np.asarray(model.variables.non_trainable[path]))


def test_scalar_head_models_get_remat_too():
    model = kithara.ScalarHeadModel.from_config("gemma2", **SHAPE, sliding_window_size=4)
    batch = padded_batch()

    def step():
        def loss(trainable):
            variables = ModelVariables(trainable, model.variables.non_trainable)
            return jnp.sum(model.score(variables, batch, training=True) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(model.variables.trainable)
        return float(value), jax.tree.map(np.asarray, grads), {}

    want = step()
    remat.enable_gradient_checkpointing(model)
    assert model.scale.remat == "full"
    assert "remat2" in str(jax.make_jaxpr(lambda v: model.score(v, batch, training=True))(model.variables))
    assert_same_step(step(), want)
    copy = kithara.ScalarHeadModel.from_causal_lm(model)
    assert copy.scale == model.scale


def residual_bytes(model, batch):
    """Bytes the backward pass keeps (not counting the arguments), on device and on host, read
    from ``jax.ad_checkpoint.print_saved_residuals``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda t: loss_fn(model, batch)(t)[0], model.variables.trainable)
    saved = {"device": 0, "host": 0}
    for line in out.getvalue().splitlines():
        match = re.match(r"(\w+)(<host>)?\[([\d,]*)\] (.*)", line)
        assert match, line
        dtype, host, shape, source = match.groups()
        if "from the argument" in source:
            continue
        bits = re.search(r"\d+$", dtype)  # short dtype names: f32, i32, bf16, ...; bool is a byte
        size = int(np.prod([int(d) for d in shape.split(",") if d])) * (int(bits.group()) // 8 if bits else 1)
        saved["host" if host else "device"] += size
    return saved


def test_each_policy_changes_what_the_backward_pass_keeps():
    model = tiny_model("llama3", **{**SHAPE, "num_layers": 4})
    batch = padded_batch()
    saved = {}
    for policy in REMAT_POLICIES:
        model.scale = kithara.ScaleConfig(remat=policy)
        saved[policy] = residual_bytes(model, batch)
    device = {policy: s["device"] for policy, s in saved.items()}
    assert device["none"] > device["dots"] > device["dots_no_batch"] > device["attention_out"] > device["full"]
    block_input = ROWS * LENGTH * SHAPE["hidden_dim"] * 4
    # attention_out keeps one [batch, length, hidden] attention output per block more than full.
    assert device["attention_out"] - device["full"] == 4 * block_input
    # offload keeps full's four block inputs on the host instead of on device.
    assert saved["offload"]["host"] == 4 * block_input
    assert device["offload"] == device["full"] - 4 * block_input
    assert all(s["host"] == 0 for policy, s in saved.items() if policy != "offload")
    # (XLA:CPU's compiled temp_size_in_bytes does not show this: it is the same with and without
    # jax.checkpoint even for a pure-JAX block chain; see docs/scale.md.)


def test_offload_is_refused_where_devices_have_no_host_memory():
    class Memory:
        kind = "device"

    class Device:
        platform = "fancy"

        def addressable_memories(self):
            return [Memory()]

    with pytest.raises(ValueError, match=r"remat='offload'\) needs 'pinned_host' memory.*use remat='full'"):
        remat.check_offload_supported(Device())
    remat.check_offload_supported()  # XLA:CPU has pinned_host memory
    with pytest.raises(ValueError, match="Unknown remat policy 'fast'"):
        remat.jax_policy("fast")


def test_attention_names_leave_generation_unchanged():
    model = tiny_model("gemma3", **SHAPE, sliding_window_size=4)
    before = model.generate([[5, 9, 2], [7, 1]], max_new_tokens=5)
    model.scale = kithara.ScaleConfig(remat="attention_out")
    step = jax.value_and_grad(lambda t: loss_fn(model, padded_batch())(t)[0])
    assert remat.ATTENTION_OUT in str(jax.make_jaxpr(step)(model.variables.trainable))  # the wrappers are in
    assert model.generate([[5, 9, 2], [7, 1]], max_new_tokens=5) == before


def trained_losses(model, **fields):
    loader = kithara.Dataloader(pattern_examples(48, vocab=VOCAB), 1, seed=0)
    trainer = kithara.Trainer(model, kithara.optimizers.adamw(1e-2), loader, steps=3, progress_bar=False, **fields)
    return [h["loss"] for h in trainer.train()]


def test_gradient_checkpointing_trains_like_no_checkpointing():
    plain = tiny_model("llama3", vocab_size=VOCAB)
    want = trained_losses(plain)
    model = tiny_model("llama3", vocab_size=VOCAB)
    got = trained_losses(model, gradient_checkpointing=True)
    assert model.scale.remat == "full" and plain.scale.remat == "none"
    np.testing.assert_allclose(got, want, rtol=1e-5)
    chosen = tiny_model(scale=kithara.ScaleConfig(remat="dots"))
    remat.enable_gradient_checkpointing(chosen)
    assert chosen.scale.remat == "dots"  # a policy set on the model is kept


def test_gradient_checkpointing_refuses_models_without_a_decoder_seam():
    with pytest.raises(ValueError, match="KerasHubSeq2SeqModel has no decoder-block remat"):
        remat.enable_gradient_checkpointing(tiny_seq2seq())
