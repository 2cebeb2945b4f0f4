"""What every benchmark shares: model sizes, synthetic rows, the machine, and running one
configuration in a fresh child process so its peak memory is its own."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from typing import Any

import numpy as np

# Llama-3-family shapes (keras-hub Llama3Backbone, untied embeddings). Parameter counts:
# tiny 0.1M, small 5M, medium 52M.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128),
    "small": dict(vocab_size=4096, num_layers=4, hidden_dim=256, num_heads=8, num_kv_heads=4, intermediate_dim=704),
    "medium": dict(vocab_size=16384, num_layers=12, hidden_dim=512, num_heads=8, num_kv_heads=4, intermediate_dim=1408),
}
LORA = dict(rank=8, targets=("all",))
LEARNING_RATE = 1e-4  # AdamW, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping: in every framework

RESULT_PREFIX = "BENCH_RESULT "


def rows(n: int, length: int, vocab: int, *, full: bool = False, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Pre-tokenized rows: random ids, lengths uniform in [length/2, length] (or all
    ``length`` when ``full``), right-padded to ``length`` with ``padding_mask`` marking the
    real tokens; every real token is supervised."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = length if full else int(rng.integers(length // 2, length + 1))
        seq = rng.integers(3, vocab, length + 1).astype(np.int32)
        valid = np.arange(length) < size
        out.append({"token_ids": seq[:-1], "padding_mask": valid, "labels": seq[1:], "label_mask": valid.copy()})
    return out


def timing(marks: list[float], tokens_per_step: int, skip: int = 2) -> dict[str, float]:
    """Steady-state figures from host times (the start, then each step's end), the first
    ``skip`` steps left out: median step, first step, compile (first minus steady), tokens/s."""
    import itertools
    import statistics

    steps = [b - a for a, b in itertools.pairwise(marks)]
    steady = steps[skip:] or steps[-1:]
    step = statistics.median(steady)
    return {
        "step_s": step,
        "first_step_s": steps[0],
        "compile_s": max(steps[0] - step, 0.0),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady),
    }


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding input positions of a batch: the only tokens a benchmark counts."""
    return int(sum(np.asarray(v).sum() for k, v in batch.items() if k.endswith("padding_mask")))


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: FLOPs the model needs for the real tokens per second over
    the measured peak. Padding is computed but never counted, so padded rows lower it."""
    return flops_per_token * tokens_per_s / peak_flops


def machine() -> dict[str, Any]:
    import jax

    return {
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def rss_now_mib() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(
    specs: list[dict[str, Any]], timeout: float = 1800, *, python: str | None = None, module: str = "bench.child"
) -> list[dict[str, Any]]:
    """Runs ``bench.child`` on configurations (each names its ``kind``: ``sft``, ``dpo``,
    ``overhead``, ``grpo``, ``trl_sft``, ``trl_dpo``, ``trl_grpo``) in a fresh interpreter; returns one result per
    spec, each with ``peak_rss_mib``: the child's maximum resident memory as the kernel
    counted it (XLA allocates outside Python's allocator, so tracemalloc would miss most of
    it). Pass one spec per call for per-configuration memory; several share one process
    (and one peak), which only the smoke run does, to save start-up time. ``python`` and
    ``module``: another environment's interpreter and entry point (a peer framework's)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [python or sys.executable, "-m", module, json.dumps(specs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    line = next((x for x in reversed(out.splitlines()) if x.startswith(RESULT_PREFIX)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"bench child {specs} failed (exit {proc.returncode}):\n{err[-4000:]}")
    results = json.loads(line[len(RESULT_PREFIX) :])
    for result in results:
        result["shared_process"] = len(specs) > 1
    return results


def device_peak_mib() -> float | None:
    """Peak accelerator memory of this process in MiB: the largest ``peak_bytes_in_use``
    over JAX's local devices, or torch's ``max_memory_allocated`` on CUDA; None on CPU
    (host memory is the peak RSS), or when the runtime keeps no such count."""
    peaks: list[float] = []
    jax = sys.modules.get("jax")
    if jax is not None and jax.default_backend() != "cpu":
        for device in jax.local_devices():
            stats = device.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                peaks.append(stats["peak_bytes_in_use"])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks.append(torch.cuda.max_memory_allocated())
    return max(peaks) / 2**20 if peaks else None


def peak_memory_mib(result: dict[str, Any]) -> float:
    """The memory a configuration is judged by: device memory on an accelerator, else host RSS."""
    return result.get("device_peak_mib") or result["peak_rss_mib"]


def finish_child(results: list[dict[str, Any]], rss_after_import_mib: float) -> None:
    """Prints a child's results with its peak memory (called last in the child): host
    (``peak_rss_mib``) and, on an accelerator, device (``device_peak_mib``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    memory = {"peak_rss_mib": peak, "rss_after_import_mib": rss_after_import_mib}
    device = device_peak_mib()
    if device is not None:
        memory["device_peak_mib"] = device
    results = [{**r, **memory} for r in results]
    print(RESULT_PREFIX + json.dumps(results), flush=True)


def run_configs(specs: list[dict[str, Any]], *, shared: bool = False) -> list[dict[str, Any]]:
    """Each spec in its own child (per-configuration peak memory), or all in one (``shared``)."""
    if shared:
        return run_child(specs)
    return [run_child([spec])[0] for spec in specs]


def median_merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one configuration as one: the median of every number that varies
    (one that does not, such as a parameter count, stays as it is), a boolean
    true only if true in every run (``loss_is_finite``), text from the first run, and
    ``repeats`` set to how many were merged."""
    import statistics

    merged: dict[str, Any] = {}
    for key, first in results[0].items():
        values = [r[key] for r in results]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if isinstance(first, bool):
            merged[key] = all(values)
        else:
            merged[key] = statistics.median(values) if numeric and len(set(values)) > 1 else first
    merged["repeats"] = len(results)
    return merged
