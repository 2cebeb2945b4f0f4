"""XLA:CPU threading from kithara's side: the same SFT step under thread and layout settings a
user can choose without touching XLA, taking turns in fresh processes.

The TRL comparison (bench/trl_compare.py) found kithara at 0.7x torch's tokens/s on 16 x 256
rows with 2 threads, where a hand-written pure-JAX model is as slow: the gap is XLA:CPU's. This
suite asks what kithara could set to close it. Each variant trains the same model on the same
rows (full fine-tuning, float32, AdamW), in its own child:

- ``2 cores``: the default, one JAX CPU device, XLA's thread pool over both cores;
- ``1 core``: the process pinned to one core (XLA sizes its pools from the CPU affinity), the
  1-thread baseline the 2-core speed-up is read against;
- ``2 devices``: two JAX CPU devices (``--xla_force_host_platform_device_count=2``), the batch
  split between them by kithara's data-parallel sharding: each device runs its half of every op
  on its own thread, where one device leaves XLA to parallelise inside the ops it can;
- ``eigen 1 thread``: ``--xla_cpu_multi_thread_eigen=false``: matmuls and convolutions through
  Eigen on the calling thread only (what XLA parallelises besides them is left as it is).

Every figure is the median over the repeats; ratios are to the ``2 cores`` default.
"""

from __future__ import annotations

from typing import Any

from bench.common import median_merge, run_child

VARIANTS: dict[str, dict[str, Any]] = {
    "2 cores": {},
    "1 core": {"cores": 1},
    "2 devices": {"devices": 2},
    "eigen 1 thread": {"xla_flags": "--xla_cpu_multi_thread_eigen=false"},
}


def bench_threads(size: str, *, steps: int, seq: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One row per variant: kithara's SFT step on ``batch`` x ``seq`` full-length rows (global batch)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, variant in VARIANTS.items():
            devices = variant.get("devices", 1)
            flags = variant.get("xla_flags", "")
            if devices > 1:
                flags += f" --xla_force_host_platform_device_count={devices}"
            spec = {"kind": "sft", "size": size, "lora": False, "full": True, "steps": steps, "seq": seq,
                    "batch": batch // devices, "cores": variant.get("cores"), "xla_flags": flags.strip()}  # fmt: skip
            runs[name].append(run_child([spec])[0])
    rows = []
    base = median_merge(runs["2 cores"])
    for name, results in runs.items():
        merged = median_merge(results)
        rows.append({
            "variant": name,
            "size": size,
            "global_batch": batch,
            "seq_len": seq,
            **{k: merged[k] for k in ("step_s", "tokens_per_s", "compile_s", "peak_rss_mib", "final_loss", "params")},
            "loss_is_finite": merged["loss_is_finite"],
            "speed_vs_default": merged["tokens_per_s"] / base["tokens_per_s"],
            "repeats": len(results),
        })  # fmt: skip
    return rows
