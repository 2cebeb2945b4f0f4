"""Packed sequences: each segment of a packed row gets the logits it would get alone."""

import jax
import numpy as np
import pytest
from conftest import TINY, tiny_model
from keras_hub.src.layers.modeling.rotary_embedding import RotaryEmbedding
from keras_hub.src.models.llama.llama_rotary_embedding import LlamaRotaryEmbedding

import kithara
from kithara.models import segments
from kithara.models.families import FAMILIES

LENGTH = 16
# Example lengths packed into each of the two rows; the rest of a row is padding.
ROWS = ((5, 3, 6), (2, 9, 4))
# Small windows so sliding-window attention actually cuts into these short sequences. (keras-hub's
# Qwen2 applies its window only off the fused-attention path, which the JAX backend never takes.)
WINDOWED = [
    ("mistral", {"sliding_window": 3}),
    ("gemma2", {"sliding_window_size": 4}),
    ("gemma3", {"sliding_window_size": 4}),
]
CONFIGS = [(family, {}) for family in sorted(FAMILIES)] + WINDOWED


def _examples(seed: int = 0) -> list[list[np.ndarray]]:
    """Random token ids for every example of every row."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(1, TINY["vocab_size"], size=n).astype(np.int32) for n in row] for row in ROWS]


def _packed_batch(examples: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Packs each row's examples one after another, as the data pipeline does."""
    batch = {key: np.zeros((len(examples), LENGTH), np.int32) for key in ("token_ids", "segment_ids", "positions")}
    for b, row in enumerate(examples):
        start = 0
        for s, tokens in enumerate(row, start=1):
            end = start + len(tokens)
            batch["token_ids"][b, start:end] = tokens
            batch["segment_ids"][b, start:end] = s
            batch["positions"][b, start:end] = np.arange(len(tokens))
            start = end
    return {**batch, "padding_mask": batch["segment_ids"] > 0}


def _unpacked_batch(examples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One example per row, starting at position 0, padded to ``LENGTH``."""
    token_ids = np.zeros((len(examples), LENGTH), np.int32)
    for i, tokens in enumerate(examples):
        token_ids[i, : len(tokens)] = tokens
    lengths = np.asarray([len(t) for t in examples])
    return {"token_ids": token_ids, "padding_mask": np.arange(LENGTH)[None, :] < lengths[:, None]}


def _logits(model: kithara.KerasHubModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Float32 logits from a freshly traced, jitted ``apply``."""
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, training=False))(model.variables, inputs)
    return np.asarray(logits, np.float32)


@pytest.fixture
def unpatched(monkeypatch):
    """Puts the original keras-hub methods back for the duration of a ``with`` block."""
    segments.install()

    class _Unpatched:
        def __enter__(self):
            for (cls, name), original in segments._ORIGINALS.items():
                monkeypatch.setattr(cls, name, original)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return _Unpatched()


@pytest.mark.parametrize(("family", "kwargs"), CONFIGS, ids=[f + ("-window" if k else "") for f, k in CONFIGS])
def test_packed_segments_match_examples_run_alone(family, kwargs):
    model = tiny_model(family, head_dim=8, **kwargs)
    assert model.supports_packing
    examples = _examples()
    packed = _logits(model, _packed_batch(examples))
    alone = _logits(model, _unpacked_batch([t for row in examples for t in row]))
    # RoPE is relative, so per-segment position offsets cancel in the check above; spreading the
    # positions out shows the given positions really reach every attention layer.
    spread = _packed_batch(examples)
    spread["positions"] *= 2
    assert np.abs(_logits(model, spread) - packed)[spread["padding_mask"]].max() > 1e-4
    i = 0
    for b, row in enumerate(examples):
        start = 0
        for tokens in row:
            n = len(tokens)
            np.testing.assert_allclose(packed[b, start : start + n], alone[i, :n], atol=1e-5, rtol=1e-5)
            start, i = start + n, i + 1
    assert segments._CURRENT.get() is None


@pytest.mark.parametrize("layer", [RotaryEmbedding(), LlamaRotaryEmbedding(max_wavelength=500000)])
def test_rope_uses_packed_positions_only_without_a_cache_offset(layer):
    segments.install()
    x = np.random.default_rng(3).normal(size=(2, LENGTH, 4, 8)).astype(np.float32)
    positions = _packed_batch(_examples())["positions"]
    with segments.packed_inputs(positions > 0, positions):
        packed, offset = np.asarray(layer(x)), np.asarray(layer(x, start_index=3))
    np.testing.assert_array_equal(packed, np.asarray(layer(x, positions=positions)))
    assert not np.allclose(packed, np.asarray(layer(x)))
    np.testing.assert_array_equal(offset, np.asarray(layer(x, start_index=3)))


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_unpacked_apply_is_bitwise_unchanged(family, unpatched):
    model = tiny_model(family, head_dim=8)
    inputs = _unpacked_batch([t for row in _examples(1) for t in row])
    with unpatched:
        before = _logits(model, inputs)
    # One jitted function traced first packed, then unpacked: the packed trace must not leak.
    fn = jax.jit(lambda v, x: model.apply(v, x, training=False)[0])
    fn(model.variables, _packed_batch(_examples(1)))
    np.testing.assert_array_equal(np.asarray(fn(model.variables, inputs)), before)
    np.testing.assert_array_equal(_logits(model, inputs), before)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_single_segment_row_is_the_plain_computation(family):
    model = tiny_model(family, head_dim=8)
    tokens = np.random.default_rng(2).integers(1, TINY["vocab_size"], size=(2, LENGTH)).astype(np.int32)
    plain = {"token_ids": tokens, "padding_mask": np.ones((2, LENGTH), bool)}
    packed = {
        **plain,
        "segment_ids": np.ones((2, LENGTH), np.int32),
        "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (2, 1)),
    }
    np.testing.assert_allclose(_logits(model, packed), _logits(model, plain), atol=1e-5, rtol=1e-5)


def test_uncovered_backbone_rejects_packed_inputs(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(segments, "SEGMENT_AWARE_BACKBONES", ())
    assert not model.supports_packing
    with pytest.raises(ValueError, match=r"Llama3Backbone does not support packed.*leak attention.*packing off"):
        model.apply(model.variables, _packed_batch(_examples()), training=False)
    assert segments._CURRENT.get() is None
    # Unpacked inputs still work.
    model.apply(model.variables, _unpacked_batch(_examples()[0]), training=False)


def test_model_does_not_support_packing_by_default():
    class Stub(kithara.Model):
        mesh = variables = variable_shardings = None  # type: ignore[assignment]

        def apply(self, variables, inputs, *, training):
            raise NotImplementedError

        def flops_per_token(self, sequence_length, *, training=True):
            return 0.0

    assert Stub().supports_packing is False


def test_packed_inputs_need_positions_and_matching_shapes():
    model = tiny_model()
    batch = _packed_batch(_examples())
    with pytest.raises(ValueError, match="no positions"):
        model.apply(model.variables, {k: v for k, v in batch.items() if k != "positions"}, training=False)
    with pytest.raises(ValueError, match=r"must both be \[batch, length\]"):
        model.apply(model.variables, {**batch, "positions": batch["positions"][:, :8]}, training=False)
    with pytest.raises(ValueError, match="sequence length"):
        model.apply(
            model.variables,
            {**batch, "segment_ids": batch["segment_ids"][:, :8], "positions": batch["positions"][:, :8]},
            training=False,
        )
    assert segments._CURRENT.get() is None


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_generate_is_unchanged_after_install(family, unpatched):
    prompts = [[1, 2, 3], [4, 5]]
    with unpatched:
        before = tiny_model(family, head_dim=8, seed=5).generate(prompts, max_length=12)
    model = tiny_model(family, head_dim=8, seed=5)
    _logits(model, _packed_batch(_examples()))  # installs the wrappers and uses them
    assert model.generate(prompts, max_length=12) == before
