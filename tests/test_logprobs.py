"""Per-token log-probs and entropies: the chunked LM head of ``KerasHubModel.token_logps``
against log_softmax of ``apply``'s full logits (values and gradients, several families,
LoRA, packed rows), the pure chunking, the ``Model`` default, and the memory it saves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model, tiny_seq2seq

import kithara
from kithara.models.logprobs import auto_chunk_size, chunked_token_logps, logps_and_entropy

BATCH, LENGTH = 8, 13  # an odd length: chunks of 4 leave a padded last chunk


def batch_of(vocab: int = 64, length: int = LENGTH, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (BATCH, length)).astype(np.int32)
    mask = np.ones((BATCH, length), bool)
    mask[3, length - 4 :] = False  # a right-padded row
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100  # an ignored label scores 0
    return {"token_ids": ids, "padding_mask": mask}, labels


def reference(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log_softmax at the labels and the entropy, in float64 numpy."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = (labels >= 0) & (labels < z.shape[-1])
    picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np.where(valid, picked, 0.0), -(np.exp(logp) * logp).sum(-1)


def test_chunked_token_logps_pads_the_last_chunk_and_cuts_it_off():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, LENGTH, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    labels = rng.integers(0, 50, (3, LENGTH))
    labels[0, :2] = [-100, 50]  # outside the vocabulary: 0
    want_logps, want_entropy = reference(np.asarray(hidden @ kernel), labels)
    for chunk_size in (1, 4, 5, LENGTH, 64, None):
        logps, entropy = chunked_token_logps(hidden, lambda h: h @ kernel, jnp.asarray(labels), chunk_size)
        assert logps.shape == entropy.shape == (3, LENGTH) and logps.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logps), want_logps, atol=2e-5)
        np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=2e-5)
    assert np.asarray(logps)[0, 0] == 0.0 and np.asarray(logps)[0, 1] == 0.0
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_token_logps(hidden, lambda h: h @ kernel, jnp.asarray(labels), 0)


def test_auto_chunk_size_bounds_one_chunks_logits():
    assert auto_chunk_size(8, 4096, 128256) == 128  # 8 x 128 x 128256 x 4 B = 501 MiB
    assert auto_chunk_size(2, 13, 64) == 13
    assert auto_chunk_size(1024, 4096, 256000) == 1


FAMILIES = [
    ("llama3", {"tie_word_embeddings": False}),  # untied output embeddings
    ("gemma2", {"head_dim": 16}),  # head_dim != hidden / heads, final logit soft-cap 30
    ("gemma3", {"head_dim": 8}),
    ("qwen3", {"head_dim": 12}),
    ("mistral", {"head_dim": 16}),
]


@pytest.mark.parametrize(("family", "kwargs"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_token_logps_equal_log_softmax_of_apply(family, kwargs):
    model = tiny_model(family, seed=4, **kwargs)
    if family == "llama3":
        assert "token_embedding/reverse_embeddings" in model.variables.trainable
    if family == "gemma2":
        assert model.backbone.final_logit_soft_cap == 30.0
    inputs, labels = batch_of()

    @jax.jit
    def run(variables):
        logits, _ = model.apply(variables, inputs, training=False)
        hidden, _ = model.hidden_states(variables, inputs, training=False)
        logps, entropy, _ = model.token_logps(variables, inputs, labels, training=False, chunk_size=4)
        return logits, model.lm_head(variables, hidden), logps, entropy

    logits, head_logits, logps, entropy = run(model.variables)
    np.testing.assert_allclose(np.asarray(head_logits), np.asarray(logits), atol=1e-5)
    want_logps, want_entropy = reference(np.asarray(logits), labels)
    np.testing.assert_allclose(np.asarray(logps), want_logps, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-5)
    if family == "gemma2":  # the soft-cap bounds the logits
        assert np.abs(np.asarray(logits)).max() <= 30.0


def masked_sum_grads(model, variables, inputs, labels, *, chunked: bool):
    weights = jnp.asarray(inputs["padding_mask"], jnp.float32)

    def loss(trainable):
        v = kithara.ModelVariables(trainable, variables.non_trainable)
        if chunked:
            logps, entropy, _ = model.token_logps(v, inputs, labels, training=True, chunk_size=4)
        else:
            logps, entropy, _ = kithara.Model.token_logps(model, v, inputs, labels, training=True)
        return jnp.sum(logps * weights) + 0.1 * jnp.sum(entropy * weights)

    return jax.jit(jax.grad(loss))(variables.trainable)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradients_equal_those_through_apply(lora):
    model = tiny_model(seed=5, lora=kithara.LoraConfig(rank=4) if lora else None, tie_word_embeddings=lora)
    variables = model.variables
    if lora:  # B starts at zero, which would leave A's gradient zero: move it off
        rng = np.random.default_rng(0)
        trainable = {
            p: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) if p.endswith("lora_kernel_b") else v
            for p, v in variables.trainable.items()
        }
        variables = kithara.ModelVariables(trainable, variables.non_trainable)
    inputs, labels = batch_of()
    chunked = masked_sum_grads(model, variables, inputs, labels, chunked=True)
    full = masked_sum_grads(model, variables, inputs, labels, chunked=False)
    assert set(chunked) == set(variables.trainable)
    for path, grad in full.items():
        grad = np.asarray(grad)
        assert np.abs(grad).max() > 0, path
        np.testing.assert_allclose(np.asarray(chunked[path]), grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_packed_rows_score_as_in_apply():
    model = tiny_model(seed=6)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 64, (BATCH, 16)).astype(np.int32)
    segment_ids = np.repeat(np.array([[1] * 7 + [2] * 6 + [0] * 3]), BATCH, 0).astype(np.int32)
    positions = np.concatenate([np.arange(7), np.arange(6), np.zeros(3)]).astype(np.int32)
    inputs = {"token_ids": ids, "padding_mask": segment_ids > 0, "segment_ids": segment_ids,
              "positions": np.repeat(positions[None], BATCH, 0)}  # fmt: skip
    labels = np.roll(ids, -1, axis=1)
    logits, _ = jax.jit(lambda v: model.apply(v, inputs, training=False))(model.variables)
    logps, entropy, _ = jax.jit(lambda v: model.token_logps(v, inputs, labels, training=False, chunk_size=5))(
        model.variables
    )
    want_logps, want_entropy = reference(np.asarray(logits), labels)
    np.testing.assert_allclose(np.asarray(logps), want_logps, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-5)
    plain = {k: inputs[k] for k in ("token_ids", "padding_mask")}
    unpacked, _ = jax.jit(lambda v: model.apply(v, plain, training=False))(model.variables)
    assert not np.allclose(np.asarray(unpacked), np.asarray(logits), atol=1e-3)  # the segments mattered


def test_models_without_a_split_head_use_the_apply_default():
    model = tiny_seq2seq("bart", seed=1)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 64, (4, 8)).astype(np.int32)
    inputs = {"encoder_token_ids": ids, "encoder_padding_mask": np.ones((4, 8), bool),
              "decoder_token_ids": ids, "decoder_padding_mask": np.ones((4, 8), bool)}  # fmt: skip
    labels = np.roll(ids, -1, axis=1)
    logps, entropy, new_non_trainable = jax.jit(lambda v: model.token_logps(v, inputs, labels, training=False))(
        model.variables
    )
    logits, _ = jax.jit(lambda v: model.apply(v, inputs, training=False))(model.variables)
    want_logps, want_entropy = reference(np.asarray(logits), labels)
    np.testing.assert_allclose(np.asarray(logps), want_logps, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, atol=1e-5)
    assert set(new_non_trainable) == set(model.variables.non_trainable)


def test_logps_and_entropy_ignore_zero_probability_tokens():
    logits = jnp.array([[0.0, 1.0, -jnp.inf]])
    logps, entropy = logps_and_entropy(logits, jnp.array([1]))
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    np.testing.assert_allclose(np.asarray(logps), np.log(p[1:]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(entropy), [-(p * np.log(p)).sum()], rtol=1e-6)
    grad = jax.grad(lambda z: logps_and_entropy(z, jnp.array([1]))[1].sum())(logits)
    assert np.isfinite(np.asarray(grad)).all()


def test_chunked_head_needs_a_fraction_of_the_memory():
    """XLA's compiled temp memory for the forward and for the gradient of sum(logps): vocab
    4096 against hidden 32, batch 8 x length 256 (inputs unsharded and activations not held to
    the batch sharding: every device holds the whole batch's activations). The full version holds
    float32 [8, 256, 4096] logits (32 MiB) several times over; chunks of 16 add little to what the
    backbone alone needs."""
    model = tiny_model(seed=7, vocab_size=4096, num_layers=1, scale=kithara.ScaleConfig(activation_sharding=False))
    inputs, labels = batch_of(vocab=4096, length=256)
    weights = jnp.asarray(inputs["padding_mask"], jnp.float32)

    def temp_mib(how, grad):
        def per_token(trainable, inputs, labels):
            v = kithara.ModelVariables(trainable, model.variables.non_trainable)
            if how == "backbone":
                return model.hidden_states(v, inputs, training=True)[0].sum(-1)
            if how == "full":
                return kithara.Model.token_logps(model, v, inputs, labels, training=True)[0]
            return model.token_logps(v, inputs, labels, training=True, chunk_size=16)[0]

        f = jax.grad(lambda *a: jnp.sum(per_token(*a) * weights)) if grad else per_token
        compiled = jax.jit(f).lower(model.variables.trainable, inputs, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    for grad in (False, True):
        backbone, full, chunked = (temp_mib(how, grad) for how in ("backbone", "full", "chunked"))
        print(f"{'grad' if grad else 'forward'}: backbone alone {backbone:.1f} MiB, full logits {full:.1f} MiB, "
              f"chunks of 16 {chunked:.1f} MiB")  # fmt: skip
        assert chunked * (4 if grad else 2) < full
        assert (chunked - backbone) * 10 < full - backbone  # what the LM head adds
