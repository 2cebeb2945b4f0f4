"""KerasHubSeq2SeqModel (BART): cached generation exact against full re-forwards, batching,
stop tokens, compile-once buckets, BART's decoder start, and input validation."""

import jax
import numpy as np
import pytest
from conftest import W, tiny_seq2seq, word_tokenizer

import kithara

SOURCES = [[1, 5, 6, 7, 2], [1, 9, 2], [1, 10, 11, 12, 13, 14, 2]]
START = [2, 1]  # BART's decoder start: </s> <s>


def spread(model, seed=0):
    """Replaces BART's 0.02-scale initial weights (whose greedy output is one token for every
    source) with unit-scale ones, so outputs depend on the source and the exactness tests bite."""
    rng = np.random.default_rng(seed)
    v = model.variables

    def draw(path, x):
        if "layer_norm" in path:
            return np.asarray(x)
        std = 1.0 if "embedding" in path else (1 / np.sqrt(x.shape[0]) if x.ndim > 1 else 0.1)
        return rng.normal(0, std, x.shape).astype(np.float32)

    shardings = model.variable_shardings.trainable
    model.variables = kithara.ModelVariables(
        {p: jax.device_put(draw(p, x), shardings[p]) for p, x in v.trainable.items()}, v.non_trainable
    )
    return model


@pytest.fixture(scope="module")
def bart():
    return spread(tiny_seq2seq(seed=5))


def batch(source, decoder, length=16):
    """One row of the four seq2seq inputs, right-padded to ``length``."""

    def pad(ids):
        return np.array([ids + [0] * (length - len(ids))], np.int32), np.array(
            [[1] * len(ids) + [0] * (length - len(ids))]
        )

    (enc, enc_mask), (dec, dec_mask) = pad(source), pad(decoder)
    return {
        "encoder_token_ids": enc,
        "encoder_padding_mask": enc_mask,
        "decoder_token_ids": dec,
        "decoder_padding_mask": dec_mask,
    }


def full_forward_greedy(model, source, new_tokens):
    """Greedy decoding by re-running encoder and decoder over the whole sequence each step."""
    forward = jax.jit(lambda v, b: model.apply(v, b, training=False)[0])
    seq = list(START)
    for _ in range(new_tokens):
        logits = np.asarray(forward(model.variables, batch(source, seq)))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(START) :]


def test_greedy_with_cache_equals_full_forward_argmax(bart):
    out = bart.generate(SOURCES, 6, decoder_start_ids=START)
    assert out == [full_forward_greedy(bart, s, 6) for s in SOURCES]
    assert len({tuple(o) for o in out}) > 1  # the output depends on the source


def test_t5gemma_greedy_with_cache_equals_full_forward_and_batch_equals_one_by_one():
    # Untied head: with tied embeddings a random T5Gemma's argmax echoes its input token.
    model = spread(tiny_seq2seq("t5gemma", seed=7, tie_word_embeddings=False), seed=2)
    out = model.generate(SOURCES, 6, decoder_start_ids=START)
    assert out == [full_forward_greedy(model, s, 6) for s in SOURCES]
    assert out == [model.generate([s], 6, decoder_start_ids=START)[0] for s in SOURCES]
    assert len({tuple(o) for o in out}) > 1
    tok = word_tokenizer()
    assert model.encode_source(tok, "hi") == [W["hi"], W["</s>"]]
    assert model.decoder_start_ids(tok) == [W["<s>"]]


def test_batch_equals_one_by_one_and_compiles_once_per_bucket():
    model = spread(tiny_seq2seq(seed=6), seed=1)
    together = model.generate(SOURCES, 6, decoder_start_ids=START)
    assert together == [model.generate([s], 6, decoder_start_ids=START)[0] for s in SOURCES]
    assert [len(o) for o in together] == [6, 6, 6]
    assert [len(o) for o in model.generate(SOURCES, 5, decoder_start_ids=START)] == [5, 5, 5]
    # Batch 1 and 3, sources of 3-7 tokens, 5-6 new tokens: all in one bucket.
    assert model.generate_compilations == 1


def test_stop_tokens_cut_before_the_stop(bart):
    (full,) = bart.generate(SOURCES[:1], 8, decoder_start_ids=START)
    stop = full[3]
    (cut,) = bart.generate(SOURCES[:1], 8, decoder_start_ids=START, stop_token_ids=[stop, 63])
    assert cut == full[: full.index(stop)]


def test_sampling_is_seeded(bart):
    first = bart.generate(SOURCES, 6, decoder_start_ids=START, temperature=2.0, top_k=20, seed=1)
    assert first == bart.generate(SOURCES, 6, decoder_start_ids=START, temperature=2.0, top_k=20, seed=1)
    assert first != bart.generate(SOURCES, 6, decoder_start_ids=START, temperature=2.0, top_k=20, seed=2)


def test_string_prompts_follow_bart_conventions(bart):
    tok = word_tokenizer()
    assert bart.encode_source(tok, "hi hello") == [W["<s>"], W["hi"], W["hello"], W["</s>"]]
    assert bart.decoder_start_ids(tok) == [W["</s>"], W["<s>"]]
    ids = bart.generate([bart.encode_source(tok, "hi hello")], 5, decoder_start_ids=START, stop_token_ids=[2])
    text = bart.generate("hi hello", 5, tokenizer=tok)
    assert text == tok.decode(ids[0], skip_special_tokens=True)


def test_invalid_inputs_raise(bart):
    with pytest.raises(ValueError, match="max_sequence_length"):
        bart.generate([[1] * 65], 4, decoder_start_ids=START)
    with pytest.raises(ValueError, match="tokenizer"):
        bart.generate([[1, 2]], 4)
    with pytest.raises(ValueError, match="packed"):
        bart.apply(bart.variables, {**batch([1], [2]), "segment_ids": np.ones((1, 16), np.int32)}, training=False)
    with pytest.raises(ValueError, match="seq2seq family"):
        kithara.KerasHubSeq2SeqModel.from_config(
            "t5", vocab_size=8, num_layers=1, hidden_dim=8, num_heads=1, intermediate_dim=8
        )


def test_fsdp_sharded_equals_replicated(bart):
    replicated = spread(tiny_seq2seq(seed=5, sharding="dp"))
    assert bart.generate(SOURCES, 6, decoder_start_ids=START) == replicated.generate(
        SOURCES, 6, decoder_start_ids=START
    )
    probe = batch(SOURCES[2], [*START, 3, 4])
    np.testing.assert_allclose(
        np.asarray(bart.apply(bart.variables, probe, training=False)[0]),
        np.asarray(replicated.apply(replicated.variables, probe, training=False)[0]),
        rtol=1e-5,
        atol=1e-5,
    )
