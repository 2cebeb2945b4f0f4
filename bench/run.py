"""Benchmarks, side by side in one run: SFT throughput/memory/MFU per size (bench/sft.py),
framework overhead (bench/overhead.py), TRL (bench/trl_compare.py), DPO reference modes
(bench/dpo.py), data loading (bench/data.py), cycle training (bench/cycle.py) and online RL
(GRPO) against TRL (bench/rl.py), memory / compile time of kithara's step at real model
sizes, compiled ahead of time for TPU targets (bench/scale.py; tables in results/scale.md), and
quantized bases for QLoRA (bench/quantization.py), and peers on the same JAX backend: Tunix's SFT
and DPO trainers in their own environment (bench/peers.py).

Every training configuration runs in a fresh child process (bench/child.py) so its peak
memory is its own. Results go to bench/results/results.json and results.md, written after
each suite so a run cut short keeps what it measured.

    python -m bench.run                      # full sizes (about 15-20 minutes on 2 cores)
    python -m bench.run --smoke              # tiny sizes, few steps (what CI runs)
    python -m bench.run --only sft,overhead  # some suites
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

SUITES = ("sft", "overhead", "trl", "threads", "dpo", "data", "cycle", "rl", "scale", "quantization", "peers")

# Per mode: the sizes and lengths of each suite. Batch is 4 rows per device throughout.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "peak": dict(size=None, repeats=7),  # 2048 on CPU, 8192 on an accelerator
        "sft": dict(plan=[(s, lo) for s in ("tiny", "small", "medium") for lo in (False, True)], steps=30, seq=128),
        "overhead": dict(sizes=["small", "medium"], steps=10, rounds=7, seq=128),
        # each size at 1 core and at 2 (both sides' thread pools follow their CPU affinity)
        "trl": dict(sizes=["small", "medium"], steps=12, seq=128, repeats=2, cores=[1, None]),
        "dpo": dict(size="small", steps=20, seq=128),
        "cycle": dict(size="small", steps=12, seq=32),
        # GRPO: 4 prompts x 4 completions per step, one update per rollout, 2 warm-up steps
        # kithara against Tunix (its own venv): SFT full / LoRA and DPO, taking turns over the repeats
        "peers": dict(sizes=["small", "medium"], steps=12, seq=128, repeats=3),
        # XLA:CPU threading settings on the TRL comparison's slowest shape (16 x 256, medium)
        "threads": dict(size="medium", steps=8, seq=256, batch=16, repeats=2),
        "rl": dict(
            size="small", steps=7, prompts_per_step=4, num_generations=4, max_prompt_length=16, max_completion_length=48
        ),
    },
    "smoke": {
        "peak": dict(size=512, repeats=3),
        "sft": dict(plan=[("tiny", False), ("tiny", True)], steps=5, seq=32),
        "overhead": dict(sizes=["tiny"], steps=5, rounds=2, seq=32),
        "trl": dict(sizes=["tiny"], steps=4, seq=32, repeats=1, cores=[None]),
        "dpo": dict(
            size="tiny",
            steps=4,
            seq=32,
            plan=[("sft", False), ("copy", False), ("precomputed", False), ("adapter_off", True)],
        ),
        "cycle": dict(size="tiny", steps=4, seq=16),
        "peers": dict(sizes=["tiny"], steps=4, seq=32, repeats=1),
        "threads": dict(size="tiny", steps=4, seq=32, batch=4, repeats=1),
        # small, not tiny: the bundled tokenizer's 512 ids need the model's vocabulary
        "rl": dict(
            size="small", steps=3, prompts_per_step=2, num_generations=2, max_prompt_length=16, max_completion_length=8
        ),
    },
}
BATCH = 4


def _commit() -> str:
    """The checked-out commit, marked ``+changes`` when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def _check_finite(name: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if not row.get("loss_is_finite", True):
            raise SystemExit(f"benchmark {name} produced a non-finite loss: {row}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps, to prove the suite runs")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated suites from {SUITES}")
    parser.add_argument("--cpu-devices", type=int, default=None, help="force this many JAX CPU devices")
    parser.add_argument("--sizes", default=None, help="only these model sizes (comma-separated), e.g. tiny,small")
    args = parser.parse_args()
    suites = [s for s in args.only.split(",") if s]
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suites {unknown}; choose from {SUITES}")
    if args.cpu_devices:  # children inherit it
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
        os.environ["XLA_FLAGS"] += str(args.cpu_devices)

    from bench.common import machine
    from bench.peak import measure_peak
    from bench.report import markdown

    plan = PLANS["smoke" if args.smoke else "full"]
    if args.sizes:
        keep = set(args.sizes.split(","))
        plan = {
            **plan,
            "sft": {**plan["sft"], "plan": [(s, lo) for s, lo in plan["sft"]["plan"] if s in keep]},
            "overhead": {**plan["overhead"], "sizes": [s for s in plan["overhead"]["sizes"] if s in keep]},
            "trl": {**plan["trl"], "sizes": [s for s in plan["trl"]["sizes"] if s in keep]},
            "peers": {**plan["peers"], "sizes": [s for s in plan["peers"]["sizes"] if s in keep]},
        }
    shared = args.smoke  # smoke: a suite's configurations share one child, to save start-up time
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "smoke": args.smoke,
        "command": "python -m bench.run " + shlex.join(sys.argv[1:]),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "batch_per_device": BATCH,
        "seconds": {},
    }
    results["peak"] = measure_peak(**plan["peak"])

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown(results))

    for suite in suites:
        start = time.perf_counter()
        print(f"[bench] {suite} ...", flush=True)
        if suite == "sft":
            from bench.sft import bench_sft

            p = plan["sft"]
            results["sft"] = bench_sft(p["plan"], steps=p["steps"], seq=p["seq"], batch=BATCH,
                                       peak_flops=results["peak"]["peak_flops"], shared=shared)  # fmt: skip
        elif suite == "overhead":
            from bench.overhead import bench_overhead

            results["overhead"] = bench_overhead(**plan["overhead"], batch=BATCH, shared=shared)
        elif suite == "trl":
            from bench.trl_compare import bench_trl

            p = plan["trl"]
            device = "cuda" if results["machine"]["platform"] == "gpu" else "cpu"  # TRL where kithara trains
            results["trl"] = [
                row
                for size in p["sizes"]
                for cores in p["cores"]
                for row in bench_trl(
                    size,
                    steps=p["steps"],
                    seq=p["seq"],
                    batch=BATCH,
                    repeats=p["repeats"],
                    shared=shared,
                    device=device,
                    cores=cores if device == "cpu" else None,
                )
            ]
        elif suite == "threads":
            from bench.cpu_threads import bench_threads

            results["threads"] = bench_threads(**plan["threads"])
        elif suite == "dpo":
            from bench.dpo import bench_dpo

            results["dpo"] = bench_dpo(**plan["dpo"], batch=BATCH, shared=shared)
        elif suite == "data":
            from bench.data import bench_data

            results["data"] = bench_data(smoke=args.smoke)
            for row in results["data"]:
                if not row["fill_ok"]:
                    raise SystemExit(f"packing filled rows worse than padding on {row['data']}")
        elif suite == "cycle":
            from bench.cycle import bench_cycle

            results["cycle"] = bench_cycle(**plan["cycle"], batch=BATCH * 2, shared=shared)
        elif suite == "rl":
            from bench.rl import bench_rl

            device = "cuda" if results["machine"]["platform"] == "gpu" else "cpu"  # TRL where kithara trains
            results["rl"] = bench_rl(**plan["rl"], device=device)
        elif suite == "peers":  # Tunix in bench/.venv-tunix (made by `make bench`)
            from bench.peers import bench_peers

            results["peers"] = bench_peers(**plan["peers"], batch=BATCH)
        elif suite == "scale":  # its plans live in bench/scale.py
            from bench.scale import bench_scale

            results["scale"] = bench_scale(smoke=args.smoke, out=out)
        elif suite == "quantization":  # QLoRA's bytes, step memory, logit error, host memory (bench/quantization.py)
            from bench.quantization import bench_quantization

            results["quantization"] = bench_quantization(smoke=args.smoke, out=out)
        if isinstance(results.get(suite), list):
            _check_finite(suite, results[suite])
        results["seconds"][suite] = time.perf_counter() - start
        save()
    print(markdown(results))


if __name__ == "__main__":
    main()
