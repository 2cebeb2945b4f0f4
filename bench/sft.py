"""SFT throughput, compile time, memory and MFU per model size, full fine-tuning and LoRA.

Each configuration trains in a fresh child process (``bench.child sft``), so its peak
resident memory is its own. Figures, all from ``Trainer.train()``'s per-step history:

- step: median time between consecutive step completions from step 3 on (steady state);
- compile: the first step's time minus the steady step (tracing, XLA compilation);
- tokens/s: non-padding tokens of the steady steps over their total time;
- MFU: ``flops_per_token * tokens/s / peak``, with the model's own FLOP count
  (``KerasHubModel.flops_per_token``, see docs/performance.md for the formula) and the
  matmul peak measured in the same run (bench/peak.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import LEARNING_RATE, LORA, SIZES, mfu, rows, run_configs


def build_model(size: str, lora: bool) -> Any:
    import kithara

    lora_config = kithara.LoraConfig(**LORA) if lora else None  # type: ignore[arg-type]
    return kithara.KerasHubModel.from_config("llama3", **SIZES[size], lora=lora_config)


def summarize(history: list[dict[str, float]], skip: int = 2) -> dict[str, float]:
    """Steady-state figures of a trainer history (the first ``skip`` steps left out)."""
    steady = history[skip:] or history[-1:]
    step = statistics.median(h["step_time"] for h in steady)
    return {
        "step_s": step,
        "first_step_s": history[0]["step_time"],
        "compile_s": max(history[0]["step_time"] - step, 0.0),
        "tokens_per_step": statistics.median(h["tokens"] for h in steady),
        "tokens_per_s": sum(h["tokens"] for h in steady) / sum(h["step_time"] for h in steady),
        "final_loss": history[-1]["loss"],
    }


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One SFT configuration (runs in the child)."""
    import jax
    import numpy as np
    import optax

    import kithara

    model = build_model(spec["size"], spec["lora"])
    per_device, steps, seq = spec["batch"], spec["steps"], spec["seq"]
    data = rows(per_device * jax.device_count() * (steps + 2), seq, SIZES[spec["size"]]["vocab_size"],
                full=spec.get("full", False))  # fmt: skip
    loader = kithara.Dataloader(data, per_device, seed=0)
    tx = optax.adamw(LEARNING_RATE, weight_decay=0.0)
    trainer = kithara.Trainer(model, tx, loader, steps=steps, progress_bar=False)
    start = time.perf_counter()
    history = trainer.train()
    return {
        "params": model.num_params,
        "trainable_params": model.num_trainable_params,
        "global_batch": loader.global_batch_size,
        "flops_per_token": model.flops_per_token(loader.sequence_length),
        "wall_s": time.perf_counter() - start,
        "loss_is_finite": bool(np.isfinite(history[-1]["loss"])),
        **summarize(history),
    }


def bench_sft(
    plan: list[tuple[str, bool]], *, steps: int, seq: int, batch: int, peak_flops: float, shared: bool = False
) -> list[dict[str, Any]]:
    specs = [{"kind": "sft", "size": s, "lora": lo, "steps": steps, "seq": seq, "batch": batch} for s, lo in plan]
    results = []
    for spec, result in zip(specs, run_configs(specs, shared=shared), strict=True):
        row = {"size": spec["size"], "lora": spec["lora"], "seq_len": seq, **result}
        row["mfu"] = mfu(row["flops_per_token"], row["tokens_per_s"], peak_flops)
        results.append(row)
    return results
