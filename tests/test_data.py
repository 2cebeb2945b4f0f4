"""The Dataloader: batching, packing, per-process shards, resumption, bad input."""

import json

import jax
import numpy as np
import pytest
from conftest import ASSETS, tiny_model, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import kithara
from kithara.data import PreferenceDataset, PromptCompletionDataset, RowError, Source, best_fit_decreasing
from kithara.data.formats import TokenizedDataset
from kithara.trainer.losses import next_token_cross_entropy


def sequence_rows(*sequences):
    """Pre-tokenized rows whose every label counts."""
    return [
        {"token_ids": np.array(s), "labels": np.array(s) + 100, "label_mask": np.ones(len(s), bool)} for s in sequences
    ]


def test_packing_reference_vector():
    # Best-fit decreasing with truncation at 4: [1..5] -> [1,2,3,4]; then [8,9,10], [6,7], and
    # [11] joins [8,9,10], the fullest row it fits.
    rows = sequence_rows([1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11])
    ds = TokenizedDataset(rows, max_length=4)
    loader = kithara.Dataloader(ds, 1, shuffle=False, packing=True, num_devices=3)
    (batch,) = list(loader.epoch(0))
    np.testing.assert_array_equal(batch["token_ids"], [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(batch["padding_mask"], batch["segment_ids"] > 0)
    np.testing.assert_array_equal(batch["labels"], np.where(batch["padding_mask"], batch["token_ids"] + 100, 0))
    np.testing.assert_array_equal(batch["label_mask"], batch["padding_mask"])
    assert best_fit_decreasing([4, 2, 3, 1], 4) == [[0], [2, 3], [1]]


def naive_best_fit_decreasing(lengths, capacity):
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), max_size=80))))
def test_best_fit_decreasing_invariants(case):
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every item exactly once
    sums = sorted(sum(lengths[i] for i in b) for b in bins)
    assert all(0 < s <= capacity for s in sums)
    assert len(sums) < 2 or sums[0] + sums[1] > capacity  # no two rows could have been one
    assert len(bins) >= -(-sum(lengths) // capacity)
    assert bins == naive_best_fit_decreasing(lengths, capacity)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=12), min_size=1, max_size=30))
def test_packed_rows_hold_every_token_once_with_restarting_positions(sequences):
    ds = TokenizedDataset(sequence_rows(*sequences), max_length=12)
    loader = kithara.Dataloader(ds, 1, shuffle=False, packing=True, num_devices=1, drop_remainder=False)
    found = []
    for batch in loader.epoch(0):
        columns = (batch["token_ids"], batch["segment_ids"], batch["positions"])
        for tokens, segments, positions in zip(*columns, strict=True):
            for s in range(1, segments.max() + 1):
                where = np.flatnonzero(segments == s)
                assert (np.diff(where) == 1).all() and (positions[where] == np.arange(len(where))).all()
                found.append(tuple(tokens[where]))
    assert sorted(found) == sorted(tuple(s) for s in sequences)


def test_packed_loss_equals_unpacked_loss():
    model = tiny_model("llama3")
    rng = np.random.default_rng(0)
    rows = sequence_rows(*[rng.integers(3, 64, size=int(n)) for n in rng.integers(2, 12, size=24)])
    for row in rows:
        row["labels"] = np.roll(row["token_ids"], -1)
        row["label_mask"] = rng.random(len(row["token_ids"])) < 0.7
        row["label_mask"][0] = True

    def loss(packing):
        ds = TokenizedDataset(rows, max_length=16)
        loader = kithara.Dataloader(ds, 1, shuffle=False, packing=packing, drop_remainder=False)
        total = weight = 0.0
        apply = jax.jit(lambda v, b: model.apply(v, b, training=False)[0])
        for batch in loader.epoch(0):
            out = next_token_cross_entropy(apply(model.variables, batch), batch["labels"], batch["label_mask"])
            total, weight = total + float(out.total), weight + float(out.weight)
        return total / weight, weight, len(loader)

    (packed, packed_weight, packed_batches), (unpacked, unpacked_weight, unpacked_batches) = loss(True), loss(False)
    assert packed_weight == unpacked_weight and packed_batches < unpacked_batches
    np.testing.assert_allclose(packed, unpacked, rtol=1e-6)


def test_padding_and_buckets():
    rows = sequence_rows(*[list(range(1, n + 1)) for n in (3, 5, 9, 14, 2, 4, 6, 16)])
    ds = TokenizedDataset(rows, max_length=16)
    loader = kithara.Dataloader(ds, 1, shuffle=False, num_devices=2, length_buckets=[4, 8])
    shapes = [b["token_ids"].shape for b in loader.epoch(0)]
    assert shapes == [(2, 8), (2, 16), (2, 4), (2, 16)]
    fixed = kithara.Dataloader(ds, 1, shuffle=False, num_devices=2)
    assert {b["token_ids"].shape for b in fixed.epoch(0)} == {(2, 16)}
    with pytest.raises(ValueError, match="length_buckets"):
        kithara.Dataloader(ds, 1, num_devices=2, length_buckets=[32])


def test_shuffle_is_deterministic_and_changes_by_epoch(examples):
    loader = kithara.Dataloader(examples[:50], 2, seed=3)
    assert loader.global_batch_size == 16 and len(loader) == 3
    first, again = list(loader.epoch(0)), list(loader.epoch(0))
    assert all(np.array_equal(a["token_ids"], b["token_ids"]) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0]["token_ids"], next(loader.epoch(1))["token_ids"])
    rows = np.concatenate([b["token_ids"] for b in first])
    assert len({r.tobytes() for r in rows}) == 48  # each example at most once per epoch
    padded = list(kithara.Dataloader(examples[:50], 2, shuffle=False, drop_remainder=False).epoch(0))
    assert len(padded) == 4 and padded[-1]["label_mask"][2:].sum() == 0
    valid = examples[0]["padding_mask"]
    np.testing.assert_array_equal(padded[0]["token_ids"][0], np.where(valid, examples[0]["token_ids"], 0))


class RecordingSource(Source):
    """Rows ``{"prompt", "completion"}`` that remember which indices were read."""

    def __init__(self, n):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def _row(self, index):
        self.read.append(index)
        return {"prompt": "how are you", "completion": " ".join(["fine"] * (1 + index % 5))}

    def _where(self, index):
        return f"recording[{index}]"


def test_each_process_reads_only_its_own_disjoint_shard():
    tok = word_tokenizer()
    seen, batches = [], []
    for process in (0, 1):
        source = RecordingSource(37)
        ds = PromptCompletionDataset(source, tok, max_length=16)
        loader = kithara.Dataloader(ds, 2, num_devices=8, process_index=process, process_count=2, drop_remainder=False)
        assert sorted(source.read) == sorted(loader.row_indices.tolist())
        seen.append(set(source.read))
        batches.append(len(loader))
        assert loader.local_batch_size == 8
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(37))
    assert batches == [3, 3]  # 19 and 18 rows: the same batch count, padded with masked rows


def test_iterator_resumes_exactly_across_epochs(examples):
    def loader():
        return kithara.Dataloader(examples[:80], 1, seed=5, length_buckets=[8])

    iterator = loader().iterator()
    for _ in range(7):  # 10 batches per epoch: stop inside epoch 0
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(8)]  # crosses into epoch 1
    resumed = loader().iterator(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = kithara.Dataloader(examples[:80], 1, seed=6)
    with pytest.raises(ValueError, match="different data or loader settings"):
        other.iterator(state)


def test_bad_rows_raise_or_are_skipped_and_counted(tmp_path, caplog):
    tok = word_tokenizer()
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "hi", "completion": "ok"})
    path.write_text("\n".join([good] * 10 + ['{"prompt": "hi"', good, json.dumps({"prompt": "hi", "completion": 7})]))
    ds = PromptCompletionDataset(str(path), tok, max_length=8)
    with pytest.raises(RowError, match=r"data\.jsonl:11: not valid JSON"):
        kithara.Dataloader(ds, 1, shuffle=False, num_devices=1)
    loader = kithara.Dataloader(ds, 1, shuffle=False, num_devices=1, skip_bad_rows=True)
    assert loader.stats == {"rows": 13, "examples": 11, "dropped_no_loss_tokens": 0, "skipped_bad_rows": 2}
    assert "data.jsonl:13: field 'completion': expected a string, got int" in caplog.text


def test_dropped_rows_are_counted_and_an_all_dropped_dataset_is_refused():
    tok = word_tokenizer()
    rows = [{"prompt": "how are you " * 3, "completion": "fine"}] * 3 + [{"prompt": "hi", "completion": "ok"}] * 8
    loader = kithara.Dataloader(PromptCompletionDataset(rows, tok, max_length=6), 1, num_devices=8)
    assert loader.stats["dropped_no_loss_tokens"] == 3 and loader.stats["examples"] == 8
    with pytest.raises(ValueError, match="No examples left"):
        kithara.Dataloader(PromptCompletionDataset(rows[:3], tok, max_length=6), 1, num_devices=1)


def test_dataloader_argument_errors(examples):
    with pytest.raises(ValueError, match="fewer than one batch"):
        kithara.Dataloader(examples[:7], 1)
    with pytest.raises(RowError, match="fields must be 1-D arrays of one length"):
        kithara.Dataloader([{"token_ids": np.zeros(4), "labels": np.zeros(3), "label_mask": np.ones(4)}] * 8, 1)
    with pytest.raises(ValueError, match="pre-tokenized"):
        kithara.Dataloader([{"prompt": "hi", "completion": "ok"}] * 8, 1)
    with pytest.raises(ValueError, match="positive int"):
        kithara.Dataloader(examples, 0)
    pairs = PreferenceDataset([{"prompt": "hi", "chosen": "ok", "rejected": "bye"}] * 8, word_tokenizer(), max_length=8)
    with pytest.raises(ValueError, match="cannot be packed"):
        kithara.Dataloader(pairs, 1, packing=True)
    batch = next(kithara.Dataloader(pairs, 1).epoch(0))
    assert {"chosen_token_ids", "rejected_label_mask", "chosen_padding_mask"} <= set(batch)


def test_demo_data_and_tokenizer():
    tok = kithara.Tokenizer.from_pretrained(ASSETS / "demo" / "tokenizer")
    ds = PromptCompletionDataset(str(ASSETS / "demo" / "eval.jsonl"), tok, max_length=24)
    loader = kithara.Dataloader(ds, 1, shuffle=False, drop_remainder=False)
    assert loader.stats == {"rows": 200, "examples": 200, "dropped_no_loss_tokens": 0}
    example = ds[0]
    text = tok.decode(example["labels"][example["label_mask"]], skip_special_tokens=True)
    assert text == json.loads((ASSETS / "demo" / "eval.jsonl").read_text().splitlines()[0])["completion"]
    assert example["token_ids"][0] == tok.bos_id and example["labels"][-1] == tok.eos_id


def test_trainer_trains_on_packed_batches_and_refuses_models_without_segments(monkeypatch):
    import optax

    model = tiny_model("qwen3")
    rng = np.random.default_rng(1)
    rows = sequence_rows(*[rng.integers(3, 64, size=int(n)) for n in rng.integers(2, 9, size=64)])
    for row in rows:
        row["labels"] = np.roll(row["token_ids"], -1)  # within the vocabulary
    loader = kithara.Dataloader(TokenizedDataset(rows, max_length=16), 1, packing=True)
    trainer = kithara.Trainer(model, optax.adam(1e-2), loader, steps=4, progress_bar=False)
    history = trainer.train()
    assert np.isfinite([h["loss"] for h in history]).all()
    state = trainer.data_iterator.get_state()
    assert state["epoch"] * len(loader) + state["batch"] == 4  # batches consumed by 4 steps
    monkeypatch.setattr(type(model), "supports_packing", property(lambda self: False))
    with pytest.raises(ValueError, match="leak attention"):
        kithara.Trainer(model, optax.adam(1e-2), loader, steps=1, progress_bar=False)


def test_pretokenized_lists_keep_their_longest_example_and_resume_checks_the_epoch_length():
    rows = sequence_rows([1, 2], [3, 4, 5, 6, 7, 8])
    loader = kithara.Dataloader(rows, 1, shuffle=False, num_devices=1)
    assert loader.max_length == 6
    np.testing.assert_array_equal(list(loader.epoch(0))[1]["token_ids"], [[3, 4, 5, 6, 7, 8]])
    state = loader.iterator(batches_per_epoch=2).get_state()
    with pytest.raises(ValueError, match="batches per epoch"):
        loader.iterator(state, batches_per_epoch=1)
