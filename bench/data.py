"""Data benchmarks: encoding and batching speed, and how much padding packing saves.

Measured side by side in one run on the same rows:
- encode rows/s: building a Dataloader (read, validate, tokenize every row of the shard);
- batch tokens/s and batches/s: producing batches (pad or pack, stack), with prefetch off
  so it is the pure host cost; bench/report.py sets them against the fastest training
  step of the same run;
- fill: the share of row positions holding real tokens, padded versus packed.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "token",
    "loss",
    "step",
    "batch",
    "shard",
    "mesh",
    "device",
    "host",
    "chat",
    "reply",
    "question",
    "answer",
]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-4 turns with replies of very different lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))})
        rows.append({"messages": messages})
    return rows


def bench_data(*, smoke: bool) -> list[dict]:
    import numpy as np

    import kithara
    from kithara.data import ConversationalDataset, PromptCompletionDataset

    assets = Path(kithara.__file__).resolve().parent / "assets"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        chats = Path(tmp) / "chats.jsonl"
        chats.write_text("\n".join(json.dumps(r) for r in chat_rows(300 if smoke else 3000)) + "\n")
        bpe = kithara.Tokenizer.from_pretrained(assets / "tokenizer")
        chars = kithara.Tokenizer.from_pretrained(assets / "demo" / "tokenizer")
        cases = [
            ("demo prompt-completion", PromptCompletionDataset(str(assets / "demo" / "train.jsonl"), chars,
                                                               max_length=24)),
            ("chat, assistant-only", ConversationalDataset(str(chats), bpe, max_length=512, assistant_only_loss=True)),
        ]  # fmt: skip
        for name, dataset in cases:
            row: dict = {"data": name, "rows": len(dataset), "max_length": dataset.max_length}
            for packing in (False, True):
                t0 = time.perf_counter()
                loader = kithara.Dataloader(
                    dataset, 8, packing=packing, prefetch=0, num_devices=1, drop_remainder=False
                )
                encode_s = time.perf_counter() - t0
                times, real, positions = [], 0, 0
                batches = loader.epoch(0)
                while True:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    if batch is None:
                        break
                    times.append(time.perf_counter() - t0)
                    real += int(batch["padding_mask"].sum())
                    positions += batch["padding_mask"].size
                key = "packed" if packing else "padded"
                row[f"{key}_batches"] = len(times)
                row[f"{key}_fill"] = real / positions
                row[f"{key}_batch_tokens_per_s"] = real / len(times) / statistics.median(times)
                row[f"{key}_batches_per_s"] = 1.0 / statistics.median(times)
                if not packing:
                    row["encode_rows_per_s"] = len(dataset) / encode_s
                    # tokenizing every row, then batching: what one epoch of input costs in all
                    row["end_to_end_tokens_per_s"] = real / (encode_s + sum(times))
            row["packing_speedup"] = row["padded_batches"] / row["packed_batches"]
            row["fill_ok"] = bool(np.isfinite(row["packed_fill"]) and row["packed_fill"] >= row["padded_fill"])
            results.append(row)
    return results


def table(rows: list[dict]) -> str:
    header = (
        "| data | rows | max len | encode rows/s | batches padded -> packed | fill padded -> packed "
        "| batch tokens/s padded / packed |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['rows']:,} | {r['max_length']} | {r['encode_rows_per_s']:,.0f} | "
            f"{r['padded_batches']} -> {r['packed_batches']} ({r['packing_speedup']:.2f}x fewer) | "
            f"{r['padded_fill']:.1%} -> {r['packed_fill']:.1%} | "
            f"{r['padded_batch_tokens_per_s']:,.0f} / {r['packed_batch_tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)
