"""KV-cached generation: exact against full re-forwards, sampling filters against numpy,
stop tokens, batching, compile-once buckets and LoRA adapter switching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import W, tiny_model, word_tokenizer

import kithara
from kithara import LoraConfig
from kithara.models import adapters
from kithara.models.sampling import filter_logits

PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
HEAD_DIM = {"llama3": None, "qwen2": None}  # families that derive head_dim; the rest get 8


def full_forward_greedy(model, prompt, new_tokens, variables=None):
    """Greedy continuation by re-running the whole sequence each step (no cache)."""
    variables = variables or model.variables
    length = len(prompt) + new_tokens
    forward = jax.jit(lambda v, ids, mask: model.apply(v, {"token_ids": ids, "padding_mask": mask}, training=False)[0])
    seq = list(prompt)
    for _ in range(new_tokens):
        ids = np.zeros((1, length), np.int32)
        ids[0, : len(seq)] = seq
        logits = forward(variables, ids, np.arange(length)[None] < len(seq))
        seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("family", ["llama3", "gemma", "gemma2", "gemma3", "mistral", "qwen2", "qwen3"])
def test_greedy_with_cache_equals_full_forward_argmax(family):
    kwargs = {} if family in HEAD_DIM else {"head_dim": 8}
    model = tiny_model(family, seed=11, **kwargs)
    out = model.generate(PROMPTS, max_new_tokens=5)
    assert out == [full_forward_greedy(model, p, 5) for p in PROMPTS]


@pytest.fixture(scope="module")
def llama():
    return tiny_model(seed=3)


def test_batch_of_different_lengths_equals_one_by_one(llama):
    together = llama.generate(PROMPTS, max_new_tokens=6)
    assert together == [llama.generate([p], max_new_tokens=6)[0] for p in PROMPTS]
    assert [len(o) for o in together] == [6, 6, 6]
    # Legacy form: max_length is the total length of every row.
    assert [len(o) for o in llama.generate(PROMPTS, max_length=9)] == [4, 7, 6]


def test_stop_tokens_cut_before_the_stop(llama):
    (full,) = llama.generate(PROMPTS[:1], max_new_tokens=8)
    stop = full[3]
    (cut,) = llama.generate(PROMPTS[:1], max_new_tokens=8, stop_token_ids=[stop, 63])
    assert cut == full[: full.index(stop)]


def test_top_k_one_is_greedy_and_seeds_repeat(llama):
    greedy = llama.generate(PROMPTS, max_new_tokens=6)
    assert llama.generate(PROMPTS, max_new_tokens=6, temperature=0.8, top_k=1, seed=4) == greedy
    a = llama.generate(PROMPTS * 4, max_new_tokens=6, temperature=2.0, seed=1)
    assert a == llama.generate(PROMPTS * 4, max_new_tokens=6, temperature=2.0, seed=1)
    assert a != llama.generate(PROMPTS * 4, max_new_tokens=6, temperature=2.0, seed=2)


def numpy_filter(logits, k, p):
    """Hugging Face's top-k then top-p warpers, written out in numpy."""
    out = logits.copy()
    if k > 0:
        kth = np.sort(out, -1)[:, ::-1][:, k - 1 : k]
        out[out < kth] = -np.inf
    if p < 1.0:
        for row in out:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order] - row[order][0])
            probs /= probs.sum()
            keep = np.cumsum(probs) - probs < p
            keep[0] = True
            row[order[~keep]] = -np.inf
    return out


@pytest.mark.parametrize("k,p", [(0, 0.5), (5, 1.0), (7, 0.8), (0, 0.95), (1, 0.3)])
def test_filter_logits_matches_numpy_reference(k, p):
    logits = np.random.default_rng(k).normal(size=(4, 40)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(k), jnp.float32(p)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(numpy_filter(logits, k, p)))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_samples_stay_in_the_filtered_support(llama):
    prompt = [1, 2, 3]
    logits, _ = llama.apply(
        llama.variables, {"token_ids": np.asarray([prompt]), "padding_mask": np.ones((1, 3), bool)}, training=False
    )
    last = np.asarray(logits)[0, -1] / 3.0
    top4 = set(np.argsort(-last)[:4].tolist())
    nucleus = set(np.flatnonzero(np.isfinite(numpy_filter(last[None], 0, 0.5)[0])).tolist())
    firsts = {o[0] for o in llama.generate([prompt] * 64, max_new_tokens=1, temperature=3.0, top_k=4, seed=0)}
    assert firsts <= top4 and len(firsts) > 1
    firsts = {o[0] for o in llama.generate([prompt] * 64, max_new_tokens=1, temperature=3.0, top_p=0.5, seed=0)}
    assert firsts <= nucleus
    unfiltered = {o[0] for o in llama.generate([prompt] * 64, max_new_tokens=1, temperature=3.0, seed=0)}
    assert not unfiltered <= top4  # the filters, not the model, made the support small


def test_one_compilation_per_bucket_and_mode():
    model = tiny_model(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(5):  # prompts of 2-8 tokens, 3-8 new tokens, 1-8 rows: all one bucket
        rows = [rng.integers(1, 60, size=rng.integers(2, 9)).tolist() for _ in range(rng.integers(1, 9))]
        model.generate(rows, max_new_tokens=int(rng.integers(3, 9)), temperature=float(rng.uniform(0.5, 1.5)),
                       top_k=int(rng.integers(1, 10)), seed=int(rng.integers(100)))  # fmt: skip
    assert model.generate_compilations == 1
    model.generate([[1] * 12], max_new_tokens=4)  # a longer prompt bucket, and greedy
    assert model.generate_compilations == 2


def test_strings_in_and_out_with_a_tokenizer():
    tokenizer = word_tokenizer()
    model = tiny_model(seed=2, vocab_size=32)
    model.tokenizer = tokenizer
    ids = model.generate([tokenizer.encode_text("hi how are")], max_new_tokens=4, stop_token_ids=[W["</s>"]])
    text = model.generate("hi how are", max_new_tokens=4)
    assert text == tokenizer.decode(ids[0], skip_special_tokens=True)
    assert model.generate(["hi how are", "ok"], max_new_tokens=4)[0] == text
    with pytest.raises(ValueError, match="exactly one of max_new_tokens"):
        model.generate("hi", max_new_tokens=2, max_length=9)


def test_adapter_switching_copies_nothing_and_leaves_no_state():
    model = tiny_model(seed=6, lora=LoraConfig(rank=2))
    base_out = model.generate(PROMPTS, max_new_tokens=6)
    before = jax.tree.map(np.asarray, model.variables)
    a = adapters.adapter_set(model.variables)
    b = {p: v + 0.5 if p.endswith("lora_kernel_b") else v for p, v in a.items()}
    with_b = adapters.with_adapter(model.variables, b)
    # The frozen base is shared, array for array.
    assert all(with_b.non_trainable[p] is v for p, v in model.variables.non_trainable.items())
    out_b = model.generate(PROMPTS, max_new_tokens=6, variables=with_b)
    assert out_b == [full_forward_greedy(model, p, 6, with_b) for p in PROMPTS]
    assert out_b != base_out
    off = model.generate(PROMPTS, max_new_tokens=6, variables=adapters.adapter_off(with_b))
    assert off == base_out  # adapter B starts with b = 0, so "off" is the untouched model
    assert model.generate(PROMPTS, max_new_tokens=6) == base_out
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.variables), before)
    assert model.generate_compilations == 1


def test_generation_is_the_same_on_another_sharding():
    replicated = tiny_model(seed=3, sharding="dp").generate(PROMPTS, max_new_tokens=6)
    tensor_parallel = tiny_model(seed=3, sharding=kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2))
    assert tensor_parallel.generate(PROMPTS, max_new_tokens=6) == replicated


def hf_filter(logits, k, p, min_p):
    """transformers' own TopK, TopP and MinP warpers, in the order its generate() applies them."""
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.from_numpy(logits.copy())
    if k:
        scores = TopKLogitsWarper(top_k=k)(None, scores)
    if p < 1.0:
        scores = TopPLogitsWarper(top_p=p)(None, scores)
    return MinPLogitsWarper(min_p=min_p)(None, scores).numpy()


@pytest.mark.parametrize(
    "k,p,min_p",
    [(0, 1.0, 0.05), (0, 1.0, 0.3), (0, 1.0, 1.0), (0, 1.0, 0.0), (7, 1.0, 0.1), (0, 0.8, 0.2), (12, 0.9, 0.02)],
)
def test_min_p_keeps_what_transformers_keeps(k, p, min_p):
    for seed in range(4):
        logits = np.random.default_rng(seed).normal(size=(8, 100)).astype(np.float32) * (1 + 2 * seed)
        got = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(k), jnp.float32(p), jnp.float32(min_p)))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(hf_filter(logits, k, p, min_p)))
        np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_min_p_restricts_samples_without_recompiling(llama):
    prompt = [1, 2, 3]
    logits, _ = llama.apply(
        llama.variables, {"token_ids": np.asarray([prompt]), "padding_mask": np.ones((1, 3), bool)}, training=False
    )
    last = np.asarray(logits)[0, -1:] / 3.0
    kept = set(np.flatnonzero(np.isfinite(hf_filter(last, 0, 1.0, 0.5)[0])).tolist())
    before = llama.generate_compilations
    firsts = {o[0] for o in llama.generate([prompt] * 64, max_new_tokens=1, temperature=3.0, min_p=0.5, seed=0)}
    assert firsts <= kept and len(firsts) > 1
    compiled = llama.generate_compilations
    assert compiled <= before + 1  # at most the filtered mode's program for this bucket
    for min_p in (0.0, 0.1, 0.9):
        llama.generate([prompt] * 64, max_new_tokens=1, temperature=3.0, min_p=min_p, top_k=20, seed=1)
    assert llama.generate_compilations == compiled
    with pytest.raises(ValueError, match="min_p"):
        llama.generate([prompt], max_new_tokens=1, temperature=1.0, min_p=1.5)


def test_sample_returns_stop_tokens_and_flags():
    model = tiny_model(seed=3)
    prompts = PROMPTS * 3
    greedy = model.generate(prompts, max_new_tokens=8)
    stop = greedy[0][3]
    compiled = model.generate_compilations
    for temperature, seed in ((0.0, 0), (1.5, 7)):
        kw = dict(temperature=temperature, stop_token_ids=[stop, 63], seed=seed)
        cut = model.generate(prompts, max_new_tokens=8, **kw)
        rows, stopped = model.sample(prompts, 8, **kw)
        assert (rows, stopped) == model.sample(prompts, 8, **kw)  # same seed, same output
        assert any(stopped) and not all(stopped)
        for row, flag, short in zip(rows, stopped, cut, strict=True):
            if flag:  # ended at a stop token, which is kept and is the only one
                assert row[:-1] == short and row[-1] in (stop, 63) and len(row) <= 8
            else:  # truncated at max_new_tokens
                assert row == short and len(row) == 8 and not {stop, 63} & set(row)
    assert rows != model.sample(prompts, 8, temperature=1.5, stop_token_ids=[stop, 63], seed=8)[0]
    # Greedy rows are the ones generate() gives; sample shares its programs.
    assert model.sample(prompts, 8, temperature=0.0)[0] == greedy
    assert model.generate_compilations == compiled + 1  # the sampled mode, not one per sample() call
    with pytest.raises(TypeError, match="token-id lists"):
        model.sample(["hi"], 4)
