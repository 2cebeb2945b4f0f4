import json

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

import kithara
from kithara.config import ASSETS
from kithara.data.prompt_completion import encode_prompt_completion, read_jsonl, tokenize_prompt_completion


def test_prompt_completion_masks_only_the_completion():
    ex = encode_prompt_completion([10, 11], [20, 21], max_seq_len=8, bos_id=1, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(ex["token_ids"], [1, 10, 11, 20, 21, 0, 0, 0])
    np.testing.assert_array_equal(ex["labels"], [10, 11, 20, 21, 2, 0, 0, 0])
    np.testing.assert_array_equal(ex["label_mask"], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ex["padding_mask"], [1, 1, 1, 1, 1, 0, 0, 0])


def test_truncation_keeps_the_start_and_drops_rows_without_completion():
    ex = encode_prompt_completion([10, 11], [20, 21, 22], max_seq_len=4, bos_id=1, eos_id=2)
    np.testing.assert_array_equal(ex["labels"], [10, 11, 20, 21])
    np.testing.assert_array_equal(ex["label_mask"], [0, 0, 1, 1])
    assert encode_prompt_completion([10, 11, 12, 13], [20], max_seq_len=4, bos_id=1, eos_id=2) is None


def test_bundled_data_and_tokenizer():
    tokenizer = Tokenizer.from_file(str(ASSETS / "demo" / "tokenizer.json"))
    rows = read_jsonl(ASSETS / "demo" / "eval.jsonl")
    examples, dropped = tokenize_prompt_completion(rows, tokenizer, max_seq_len=24)
    assert len(examples) == len(rows) == 200 and dropped == 0
    assert tokenizer.decode(tokenizer.encode("rev abc = cba").ids) == "rev abc = cba"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*completion"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_dataloader_batches_shuffles_deterministically_and_pads(examples):
    loader = kithara.Dataloader(examples[:50], 2, seed=3)
    assert loader.global_batch_size == 16 and len(loader) == 3
    first, again = list(loader.epoch(0)), list(loader.epoch(0))
    assert all(np.array_equal(a["token_ids"], b["token_ids"]) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0]["token_ids"], next(loader.epoch(1))["token_ids"])
    rows = np.concatenate([b["token_ids"] for b in first])
    assert len({r.tobytes() for r in rows}) == 48  # each example at most once per epoch
    padded = list(kithara.Dataloader(examples[:50], 2, shuffle=False, drop_remainder=False).epoch(0))
    assert len(padded) == 4 and padded[-1]["label_mask"][2:].sum() == 0
    np.testing.assert_array_equal(padded[0]["token_ids"][0], examples[0]["token_ids"])


def test_dataloader_errors(examples):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        kithara.Dataloader(examples[:7], 1)
    with pytest.raises(ValueError, match="lacks fields"):
        kithara.Dataloader([{"token_ids": np.zeros(4)}] * 8, 1)
    with pytest.raises(ValueError, match="positive int"):
        kithara.Dataloader(examples, 0)


def test_every_process_gets_the_same_number_of_batches(examples, monkeypatch):
    # 17 rows, 2 processes, global batch 16: process 0 has 9 rows (2 batches), process 1
    # has 8 (1 batch). Both must yield len(loader) == 2 batches or collectives would hang.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    counts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda i=index: i)
        loader = kithara.Dataloader(examples[:17], 2, shuffle=False, drop_remainder=False)
        batches = list(loader.epoch(0))
        assert all(b["token_ids"].shape == (8, 16) for b in batches)
        counts.append((len(batches), sum(int(b["label_mask"].any(axis=1).sum()) for b in batches)))
    assert counts == [(2, 9), (2, 8)]
