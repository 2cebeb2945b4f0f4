import jax.numpy as jnp
import numpy as np

from kithara.trainer.losses import next_token_cross_entropy


def _reference(logits, labels, mask):
    logits = logits.astype(np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    return (nll * mask).sum(), mask.sum(), ((logits.argmax(-1) == labels) * mask).sum()


def test_cross_entropy_matches_numpy_on_masked_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 5))
    mask = rng.random((3, 5)) < 0.6
    out = next_token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    total, weight, correct = _reference(logits, labels, mask)
    np.testing.assert_allclose(float(out.total), total, rtol=1e-6)
    assert float(out.weight) == weight
    assert float(out.sums["token_accuracy"]) == correct


def test_masked_positions_cannot_poison_the_loss():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 2] = np.nan  # e.g. a fully padded position
    out = next_token_cross_entropy(jnp.asarray(logits), jnp.zeros((1, 3), jnp.int32), jnp.asarray([[1, 1, 0]]))
    np.testing.assert_allclose(float(out.total), 2 * np.log(4), rtol=1e-6)
    assert float(out.weight) == 2


def test_bfloat16_logits_are_reduced_in_float32():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 4, 7)).astype(np.float32)
    labels, mask = rng.integers(0, 7, (2, 4)), np.ones((2, 4))
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    out = next_token_cross_entropy(bf16, jnp.asarray(labels), jnp.asarray(mask))
    total, _, _ = _reference(np.asarray(bf16.astype(jnp.float32)), labels, mask)
    np.testing.assert_allclose(float(out.total), total, rtol=1e-6)


def test_accuracy_counts_labels_holding_the_largest_logit_and_gradient_is_softmax_minus_onehot():
    import jax

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (2, 6, 9)).astype(np.float32)
    labels = rng.integers(0, 9, (2, 6))
    labels[0, :4] = logits[0, :4].argmax(-1)  # some predictions right, so the count is informative
    mask = np.ones((2, 6), bool)
    mask[1, 5] = False
    out = next_token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    _, _, correct = _reference(logits, labels, mask)
    assert correct >= 4 and float(out.sums["token_accuracy"]) == correct

    def loss(x):
        return next_token_cross_entropy(x, jnp.asarray(labels), jnp.asarray(mask)).total

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    expected = (shifted / shifted.sum(-1, keepdims=True) - np.eye(9)[labels]) * mask[..., None]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
