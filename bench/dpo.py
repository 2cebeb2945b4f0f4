"""DPO step time and memory with each reference mode, relative to SFT on the same data.

The same synthetic preference pairs (a shared prompt, then a chosen and a rejected answer;
loss on the answers) train with:

- ``sft``: SFT on the chosen sequences (one sequence per pair), the baseline;
- ``copy``: a frozen copy of the model as reference (one more forward, a second weight set);
- ``precomputed``: reference log-probs computed once before training (time reported
  apart) and read from the batch: no reference pass while training;
- ``adapter_off``: LoRA only: the reference is the policy with its adapters zeroed.

Full fine-tuning rows (sft, copy, precomputed) compare with full-FT SFT; LoRA rows (sft,
adapter_off, precomputed) with LoRA SFT. Each runs in its own child process. DPO's
tokens/s counts the real tokens of both sequences of a pair.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, SIZES, peak_memory_mib, run_configs
from bench.sft import build_model, summarize

FULL_MODES = ("sft", "copy", "precomputed")
LORA_MODES = ("sft", "adapter_off", "precomputed")


def pairs(n: int, length: int, vocab: int, *, full: bool = False, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Pre-tokenized pairs: ``chosen_*`` / ``rejected_*`` (prompt of length/4 tokens, answers
    of length/4 to 3*length/4, or filling ``length`` when ``full``), label masks on the
    answers only."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, length // 4)
        row = {}
        for side in ("chosen", "rejected"):
            size = length - length // 4 + 1 if full else int(rng.integers(length // 4, 3 * length // 4 + 1))
            answer = rng.integers(3, vocab, size)
            ids = np.concatenate([prompt, answer]).astype(np.int32)
            targets = np.arange(len(ids)) >= len(prompt)
            row[f"{side}_token_ids"], row[f"{side}_labels"] = ids[:-1], ids[1:]
            row[f"{side}_label_mask"] = targets[1:]
        out.append(row)
    return out


def pair_dataset(rows: list[dict[str, np.ndarray]], max_length: int) -> Any:
    """A kithara dataset yielding the pre-tokenized pairs as they are."""
    from kithara.data.formats import Dataset

    class TokenPairs(Dataset):
        fields = tuple(rows[0])
        sequences = ("chosen_", "rejected_")
        supports_packing = False

        def encode(self, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in row.items()}

    return TokenPairs(rows, None, max_length=max_length)


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode (runs in the child)."""
    import jax
    import optax

    import kithara

    size, mode, lora, steps, seq, per_device = (spec[k] for k in ("size", "mode", "lora", "steps", "seq", "batch"))
    data = pairs(per_device * jax.device_count() * (steps + 2), seq, SIZES[size]["vocab_size"],
                 full=spec.get("full", False))  # fmt: skip
    model = build_model(size, lora)
    tx = optax.adamw(LEARNING_RATE, weight_decay=0.0)
    common = dict(steps=steps, progress_bar=False)
    start = time.perf_counter()
    if mode == "sft":
        chosen = [{k.removeprefix("chosen_"): v for k, v in r.items() if k.startswith("chosen_")} for r in data]
        trainer: Any = kithara.Trainer(model, tx, kithara.Dataloader(chosen, per_device, seed=0), **common)
    else:
        loader = kithara.Dataloader(pair_dataset(data, seq), per_device, seed=0)
        ref = build_model(size, lora) if mode == "copy" else None  # same seed: the same weights
        trainer = kithara.DPOTrainer(model, tx, loader, ref_model=ref, precompute_ref_log_probs=mode == "precomputed",
                                     **common)  # fmt: skip
    setup_s = time.perf_counter() - start  # includes precomputing reference log-probs
    history = trainer.train()
    finite = bool(np.isfinite(history[-1]["loss"]))
    return {"params": model.num_params, "setup_s": setup_s, "loss_is_finite": finite, **summarize(history)}


def bench_dpo(
    size: str, *, steps: int, seq: int, batch: int, plan: list[tuple[str, bool]] | None = None, shared: bool = False
) -> list[dict[str, Any]]:
    """``plan``: (mode, LoRA) pairs; by default every mode, full fine-tuning and LoRA. A mode
    without an SFT row of its own kind compares with the other kind's SFT."""
    plan = plan or [(m, False) for m in FULL_MODES] + [(m, True) for m in LORA_MODES]
    specs = [
        {"kind": "dpo", "size": size, "mode": m, "lora": lo, "steps": steps, "seq": seq, "batch": batch}
        for m, lo in plan
    ]
    results = [{**s, **r} for s, r in zip(specs, run_configs(specs, shared=shared), strict=True)]
    baseline = {r["lora"]: r for r in results if r["mode"] == "sft"}
    for r in results:
        base = baseline.get(r["lora"]) or next(iter(baseline.values()))
        r["step_vs_sft"] = r["step_s"] / base["step_s"]
        r["memory_vs_sft"] = peak_memory_mib(r) / peak_memory_mib(base)
    return results
