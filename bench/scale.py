"""The ``scale`` suite: what kithara's own train step needs per chip at real model sizes.

Memory: kithara's train step (the base Trainer's token cross-entropy, AdamW, bf16 weights,
FSDP over 8 chips, one row per chip) is compiled ahead of time for abstract Llama-3.2-1B,
Llama-3-8B and Gemma-2-9B shapes (no weight allocated: ``keras_variables.unallocated``) on
TPU v5e 2x4 and v5p 2x2x2 topologies through libtpu (no TPU needed) and on 8 forced CPU
devices, and ``compiled.memory_analysis()`` gives the per-device temporary, argument,
output and alias bytes. Unscanned steps are compiled at two small depths and extrapolated
linearly to the full depth (memory is linear in depth; compile time is too, ~20 CPU-s per
layer on the TPU target); scanned ones are compiled at full depth. One unscanned full-depth
compile checks the extrapolation. A configuration whose option is missing fails in its
row, or is flagged when its program is identical to the one without the option.

Also: compile time against depth with and without layer scan, and real step time on this
CPU of each remat policy against none (side by side, medians of per-round ratios).

A compiled program's memory analysis depends only on the program, the target and the
compiler, so results are cached by (target, jax and libtpu versions, the lowered program's
hash) in ``bench/scale_cache.jsonl``, which is committed: a rerun (on any machine, from a fresh
clone) compiles only what changed (rows say
``cached``; their compile times are from the run that compiled them). The compile-time
section never reads the cache.

    python -m bench.run --only scale           # full plan (make bench installs libtpu)
    python -m bench.run --only scale --smoke   # tiny shapes, CPU backend only, seconds
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.scale_child import ROW_PREFIX, SHAPES

GiB = 2**30
# Where `make bench` installs libtpu (never on kithara's own path: with libtpu importable
# jax would try to start a TPU backend). The version jax 0.10.2's `tpu` extra pins.
LIBTPU_DIR = Path(os.environ.get("KITHARA_BENCH_LIBTPU", ".venv/libtpu"))
LIBTPU_VERSION = "0.0.42.1"
HBM_GIB = {"v5e:2x4": 16.0, "v5p:2x2x2": 95.0}  # per chip
V5E_USABLE_GIB = 15.75  # what XLA reports available on a v5e chip ("exceeds available HBM (15.75G)")
BUDGETS_GIB = (16.0, 95.0)
# Memory analyses by (target, compiler versions, program hash): committed, so that a compile
# done once (tens of CPU-minutes for the 8B shapes) is never redone for the same program.
CACHE = Path(__file__).resolve().parent / "scale_cache.jsonl"
CHUNK = 512  # loss_chunk_size of the chunked-loss configurations

# (name, the configuration it adds to, ScaleConfig fields, TrainingConfig fields). "kernel"
# stands for the target's attention kernel: splash on TPU, query-chunked elsewhere.
CONFIGS: tuple[tuple[str, str | None, dict[str, Any], dict[str, Any]], ...] = (
    ("today", None, {"activation_sharding": False}, {}),
    ("+act_sharding", "today", {}, {}),
    ("+remat_full", "+act_sharding", {"remat": "full"}, {}),
    ("+remat_attention_out", "+act_sharding", {"remat": "attention_out"}, {}),
    ("+chunked_loss", "+remat_full", {"remat": "full"}, {"loss_chunk_size": CHUNK}),
    ("+attention", "+chunked_loss", {"remat": "full", "attention": "kernel"}, {"loss_chunk_size": CHUNK}),
    ("+scan", "+attention", {"remat": "full", "attention": "kernel", "scan_layers": True}, {"loss_chunk_size": CHUNK}),
    (
        "+offload_optimizer",  # AdamW moments in host memory between steps
        "+scan",
        {"remat": "full", "attention": "kernel", "scan_layers": True},
        {"loss_chunk_size": CHUNK, "offload_optimizer": True},
    ),
    (
        "+remat_offload",  # and each block's saved input in host memory instead of on device
        "+offload_optimizer",
        {"remat": "offload", "attention": "kernel", "scan_layers": True},
        {"loss_chunk_size": CHUNK, "offload_optimizer": True},
    ),
    (
        "+offload_params",  # and the weights in host memory between steps
        "+offload_optimizer",
        {"remat": "full", "attention": "kernel", "scan_layers": True},
        {"loss_chunk_size": CHUNK, "offload_optimizer": True, "offload_params": True},
    ),
)
CONFIG_NAMES = tuple(c[0] for c in CONFIGS)

SEQS = (1024, 2048, 4096, 8192)
MODELS = ("llama-3.2-1b", "llama-3-8b", "gemma-2-9b")
# Memory plans: (target, models, configs, seqs). Ordered by priority: a full run that runs out
# of time keeps the earlier ones (the cache makes a rerun finish the rest).
Block = tuple[str, tuple[str, ...], tuple[str, ...], tuple[int, ...]]  # (target, models, configs, seqs)
LLAMAS = ("llama-3-8b", "llama-3.2-1b")
# Jobs run in this order (several children at once); a run that reaches its time budget keeps
# what it measured and reports the rest as not measured (the cache lets a rerun go further).
FULL_ORDER: tuple[Block | str, ...] = (
    ("v5e:2x4", LLAMAS, ("today", "+scan", "+remat_offload"), (1024, 8192)),  # the goals
    ("v5e:2x4", LLAMAS, CONFIG_NAMES, (8192,)),  # what each option gives where it matters
    "step_time",
    ("v5e:2x4", LLAMAS, ("today", "+scan", "+remat_offload"), (2048, 4096)),
    "compile_depth",  # its 16-layer rows are also unscanned full-depth checks of the extrapolation
    ("v5e:2x4", ("gemma-2-9b",), ("today", "+scan", "+remat_offload"), SEQS),
    ("v5p:2x2x2", LLAMAS, ("today", "+scan", "+remat_offload"), (1024, 8192)),
    ("cpu", ("llama-3.2-1b",), ("today", "+scan"), (1024, 8192)),
    "checks",
    ("v5e:2x4", LLAMAS, CONFIG_NAMES, (1024, 2048, 4096)),
    ("v5e:2x4", ("gemma-2-9b",), CONFIG_NAMES, SEQS),
    ("v5p:2x2x2", LLAMAS, CONFIG_NAMES, SEQS),
)
# Unscanned full-depth compiles, each against its extrapolation.
FULL_CHECKS = (("v5e:2x4", "llama-3.2-1b", "today", 1024),)

PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "order": FULL_ORDER,
        "checks": FULL_CHECKS,
        "depths": {"llama3": (1, 2), "gemma2": (2, 4)},  # Gemma 2 alternates sliding and global layers
        # Llama-3.2-1B (default ScaleConfig) at 2..32 layers, unscanned and scanned; unscanned
        # compiles cost ~12 CPU-s a layer on this target.
        "compile_depth": {"target": "v5e:2x4", "shape": "llama-3.2-1b", "seq": 1024, "depths": (2, 4, 8, 16, 32)},
        "step_time": {
            "shape": "small",
            "rows": 4,
            "seq": 256,
            "rounds": 4,
            "steps": 2,
            "policies": ("full", "dots_no_batch", "attention_out", "dots", "offload"),
        },
        "budget_s": 30 * 60,
        "workers": 2,
    },
    "smoke": {
        # Every code path once, about a minute on an idle 2-core machine.
        "order": ((("cpu", ("tiny",), ("today", "+scan"), (32,))), "checks", "step_time", "compile_depth"),
        "checks": (("cpu", "tiny", "today", 32),),
        "depths": {"llama3": (1, 2), "gemma2": (2, 4)},
        "compile_depth": {"target": "cpu", "shape": "tiny", "seq": 32, "depths": (2,)},
        "step_time": {"shape": "tiny", "rows": 2, "seq": 16, "rounds": 2, "steps": 1, "policies": ("full",)},
        "budget_s": 15 * 60,
        "workers": 2,
    },
}


def config_fields(name: str, target: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ScaleConfig and TrainingConfig fields of a configuration on a target."""
    _, _, scale, training = next(c for c in CONFIGS if c[0] == name)
    kernel = "chunked" if target == "cpu" else "splash"
    return {k: (kernel if v == "kernel" else v) for k, v in scale.items()}, dict(training)


def full_depth(shape: str) -> int:
    return int(SHAPES[shape]["num_layers"])


def plan_jobs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job of the plan in its order, without duplicates: memory compiles for each (target,
    model, config, sequence) of a block (two depths each, or full depth for scanned
    configurations), the full-depth checks, the step-time job and the compile-time jobs."""
    jobs: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(job: dict[str, Any]) -> None:
        key = json.dumps(job, sort_keys=True)
        if key not in seen:
            seen.add(key)
            jobs.append(job)

    def add_check(target: str, model: str, config: str, seq: int) -> None:
        scale, training = config_fields(config, target)
        add(
            {
                "kind": "memory",
                "target": target,
                "shape": model,
                "config": config,
                "seq": seq,
                "scale": scale,
                "training": training,
                "layers": full_depth(model),
            }
        )

    for block in plan["order"]:
        if block == "checks":
            for check in plan["checks"]:
                add_check(*check)
            continue
        if block == "step_time":
            add(step_time_job(plan))
            continue
        if block == "compile_depth":
            for job in compile_depth_jobs(plan):
                add(job)
            continue
        target, models, configs, seqs = block
        for seq in seqs:
            for model in models:
                for config in configs:
                    scale, training = config_fields(config, target)
                    base = {
                        "kind": "memory",
                        "target": target,
                        "shape": model,
                        "config": config,
                        "seq": seq,
                        "scale": scale,
                        "training": training,
                    }
                    depths = plan["depths"][SHAPES[model]["family"]]
                    if scale.get("scan_layers"):
                        add({**base, "layers": full_depth(model), "check_scanned": depths[0]})
                    else:
                        for layers in depths:
                            add({**base, "layers": layers})
    return jobs


def step_time_job(plan: dict[str, Any]) -> dict[str, Any]:
    step = plan["step_time"]
    return {"kind": "step", "target": "cpu", "config": "step", "layers": SHAPES[step["shape"]]["num_layers"], **step}


def compile_depth_jobs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Compile time against depth, unscanned and scanned (never cached)."""
    spec = plan["compile_depth"]
    jobs = []
    for layers in spec["depths"]:  # shallow first: a budget cut drops the deepest
        for scan in (False, True):
            jobs.append(
                {
                    "kind": "memory",
                    "target": spec["target"],
                    "shape": spec["shape"],
                    "seq": spec["seq"],
                    "layers": layers,
                    "config": "compile_depth",
                    "scale": {"scan_layers": scan},
                    "training": {},
                    "no_cache": True,
                }
            )
    return jobs


def child_env() -> dict[str, str]:
    """The children's environment: 8 forced CPU devices (the CPU target) and, when installed,
    libtpu on the path for the TPU topologies (the CPU platform only, so jax never tries to
    start a TPU backend: on this machine there is none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    if libtpu_missing() is None:
        env["PYTHONPATH"] = f"{LIBTPU_DIR.resolve()}{os.pathsep}{os.getcwd()}"
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # several children load it at once
        env["TPU_SKIP_MDS_QUERY"] = "1"  # no metadata server here
    return env


def libtpu_missing() -> str | None:
    """Why TPU targets cannot be compiled for (None when libtpu is installed)."""
    if (LIBTPU_DIR / "libtpu").is_dir():
        return None
    return (
        f"libtpu is not installed in {LIBTPU_DIR}: `make bench` installs it (pip install --target "
        f"{LIBTPU_DIR} libtpu=={LIBTPU_VERSION})"
    )


def run_children(groups: list[list[dict[str, Any]]], deadline: float) -> list[dict[str, Any]]:
    """Runs each group of jobs in its own child process, all at once; collects every printed
    row until the children end or ``deadline`` (then they are stopped and their remaining jobs
    reported as not measured)."""
    procs = []
    selector = selectors.DefaultSelector()
    for jobs in groups:
        if not jobs:
            continue
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale_child", json.dumps(jobs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        procs.append((proc, jobs))
        assert proc.stdout is not None
        selector.register(proc.stdout, selectors.EVENT_READ, proc)
    rows: list[dict[str, Any]] = []
    open_streams = len(procs)
    while open_streams and time.time() < deadline:
        for key, _ in selector.select(timeout=max(0.0, min(5.0, deadline - time.time()))):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                selector.unregister(key.fileobj)
                open_streams -= 1
            elif line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX) :])
                rows.append(row)
                job = row["job"]
                what = f"{job['target']} {job['shape']} {job['config']} seq {job['seq']} x{job['layers']}"
                print(f"[scale] {what}: {'ok' if row['ok'] else row['error'][:120]}", flush=True)
    done = {json.dumps(r["job"], sort_keys=True) for r in rows}
    for proc, jobs in procs:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        for job in jobs:
            if json.dumps(job, sort_keys=True) not in done:
                why = (
                    "not measured: the suite's time budget ran out"
                    if time.time() >= deadline
                    else (f"child exited {proc.returncode}: {err.strip()[-400:]}")
                )
                rows.append({"job": job, "ok": False, "error": why})
    return rows


def split(jobs: list[dict[str, Any]], workers: int) -> list[list[dict[str, Any]]]:
    """Jobs dealt round-robin to ``workers`` children (plan order kept within each)."""
    return [jobs[i::workers] for i in range(workers)]


def run_jobs(jobs: list[dict[str, Any]], workers: int, deadline: float, cache: Path | None) -> list[dict[str, Any]]:
    """Every job, in plan order, dealt to ``workers`` children (TPU jobs fail at once, in their
    rows, when libtpu is missing)."""
    missing = libtpu_missing()
    runnable = [j for j in jobs if j["target"] == "cpu" or not missing]
    rows = [{"job": j, "ok": False, "error": missing} for j in jobs if j not in runnable]
    runnable = [{**j, "cache": str(cache) if cache and not j.get("no_cache") else None} for j in runnable]
    return rows + [
        {**r, "job": {k: v for k, v in r["job"].items() if k != "cache"}}
        for r in run_children(split(runnable, workers), deadline)
    ]


def peak_bytes(m: dict[str, float]) -> float:
    """Per-chip memory the step needs: arguments (weights, AdamW moments, batch) + temporaries
    + outputs not aliased to (donated) arguments."""
    return m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]


FIELDS = ("temp_bytes", "argument_bytes", "output_bytes", "alias_bytes")


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_bytes(error: str) -> tuple[float, float] | None:
    """``(temporaries needed, HBM available)`` from a TPU compile that ran out of HBM (XLA refuses
    to compile a program that does not fit the target's chip), else None."""
    found = _OOM.search(error)
    if not found:
        return None
    need, need_unit, have, have_unit = found.groups()
    return float(need) * _UNITS[need_unit], float(have) * _UNITS[have_unit]


def extrapolate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One figure per (target, model, config, sequence): the scanned full-depth compile, or the two
    small-depth compiles extrapolated linearly to the full depth (``per_layer`` bytes), with
    the unscanned full-depth compile where one was made (``checked``)."""
    groups: dict[tuple[str, str, str, int], dict[int, dict[str, Any]]] = {}
    errors: dict[tuple[str, str, str, int], str] = {}
    ooms: dict[tuple[str, str, str, int], dict[str, float]] = {}
    for row in rows:
        job = row["job"]
        if job["config"] == "compile_depth":
            continue
        key = (job["target"], job["shape"], job["config"], job["seq"])
        if row["ok"]:
            groups.setdefault(key, {})[job["layers"]] = row
        else:
            errors.setdefault(key, row["error"])
            oom = oom_bytes(row["error"])
            if oom and (key not in ooms or job["layers"] < ooms[key]["layers"]):
                ooms[key] = {"layers": job["layers"], "temp_bytes": oom[0], "hbm_bytes": oom[1]}
    out = []
    for key in dict.fromkeys([*groups, *errors]):
        target, shape, config, seq = key
        full = full_depth(shape)
        by_depth = groups.get(key, {})
        small = sorted(by_depth)[:2]
        entry: dict[str, Any] = {"target": target, "model": shape, "config": config, "seq": seq, "layers": full}
        if len(small) == 2:
            d1, d2 = small
            slope = {f: (by_depth[d2][f] - by_depth[d1][f]) / (d2 - d1) for f in FIELDS}
            if slope["temp_bytes"] < 0:  # XLA scheduled the shallow programs differently: no per-layer cost
                entry["falls"] = {d: by_depth[d]["temp_bytes"] for d in small}
                entry["error"] = (
                    f"temporaries fall with depth ({d1} layers: {by_depth[d1]['temp_bytes'] / GiB:.2f} GiB, {d2}: "
                    f"{by_depth[d2]['temp_bytes'] / GiB:.2f}): no per-layer cost to extrapolate"
                )
                out.append(entry)
                continue
            entry.update({f: by_depth[d1][f] + slope[f] * (full - d1) for f in FIELDS})
            entry["per_layer_temp_bytes"] = slope["temp_bytes"]
            entry["method"] = f"extrapolated from {d1} and {d2} layers"
            entry["hlo_hash"] = by_depth[d1]["hlo_hash"]
            tight = [d for d in small if by_depth[d]["temp_bytes"] >= SQUEEZED * usable_bytes(target)]
            if tight:  # XLA may have rematerialised that program to fit the chip: the slope is too low
                entry["squeezed"] = {"layers": tight[-1], "temp_bytes": by_depth[tight[-1]]["temp_bytes"]}
            if full in by_depth and full > d2:
                entry["checked"] = {f: by_depth[full][f] for f in FIELDS}
        elif full in by_depth:
            entry.update({f: by_depth[full][f] for f in FIELDS})
            entry["method"] = "compiled at full depth"
            entry["hlo_hash"] = by_depth[full]["hlo_hash"]
        else:
            entry["error"] = errors.get(key, "needs two depths; one failed")
            if key in ooms:  # does not fit this target's chip even at that depth
                entry["oom"] = ooms[key]
            out.append(entry)
            continue
        entry["peak_bytes"] = peak_bytes(entry)
        if "checked" in entry:
            entry["checked"]["peak_bytes"] = peak_bytes(entry["checked"])
            entry["check_error"] = entry["peak_bytes"] / entry["checked"]["peak_bytes"] - 1
        out.append(entry)
    flag_no_effect(out, rows)
    return out


# A small-depth compile whose temporaries reach this fraction of the chip's usable HBM may have been
# rematerialised by XLA to fit (the 8B today at 4,096 on v5e: 12.49 GiB at one layer, 12.72 at two),
# so a slope taken from it understates the full depth: such figures are lower bounds.
SQUEEZED = 0.75


def usable_bytes(target: str) -> float:
    """A chip's HBM as XLA reports it available (v5e: 15.75 of 16 GiB; others: their HBM)."""
    return {**HBM_GIB, "v5e:2x4": V5E_USABLE_GIB}.get(target, float("inf")) * GiB


def flag_no_effect(entries: list[dict[str, Any]], rows: Iterable[dict[str, Any]]) -> None:
    """Marks a configuration whose smallest-depth program is identical to the one it adds to: its
    option changed nothing (not implemented yet, or ignored on this target)."""
    hashes: dict[tuple[str, str, str, int], str] = {}
    smallest: dict[tuple[str, str, str, int], int] = {}
    for row in rows:
        job = row["job"]
        key = (job["target"], job["shape"], job["config"], job["seq"])
        if row["ok"] and job["layers"] <= smallest.get(key, 10**9):
            smallest[key] = job["layers"]
            hashes[key] = row["hlo_hash"]
    parents = {c[0]: c[1] for c in CONFIGS}
    for entry in entries:
        parent = parents.get(entry["config"])
        key = (entry["target"], entry["model"], entry["config"], entry["seq"])
        if key not in hashes:
            continue
        # the one it adds to first, then any earlier configuration (two policies that are one)
        for other in [parent, *CONFIG_NAMES[: CONFIG_NAMES.index(entry["config"])]] if parent else []:
            if hashes.get((*key[:2], other, key[3])) == hashes[key]:
                entry["no_effect"] = f"same program as {other}"
                break


def largest_fitting(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, model, config): the largest measured sequence whose peak fits each budget
    (``"?"`` after it when a longer one ran out of a smaller chip's HBM, so is unknown here)."""
    peaks: dict[tuple[str, str, str], dict[int, float]] = {}
    # What a sequence needs at least, where only a bound is known: more than the chip's HBM (with
    # a 10% margin) when XLA refused it, at least the extrapolated peak when a compile was squeezed.
    bounds: dict[tuple[str, str, str], dict[int, float]] = {}
    for e in entries:
        key = (e["target"], e["model"], e["config"])
        if "peak_bytes" in e and "squeezed" not in e:
            peaks.setdefault(key, {})[e["seq"]] = e["peak_bytes"]
        elif "peak_bytes" in e:
            bounds.setdefault(key, {})[e["seq"]] = e["peak_bytes"]
        elif "oom" in e:
            bounds.setdefault(key, {})[e["seq"]] = 1.1 * e["oom"]["hbm_bytes"]
    out = []
    for key in dict.fromkeys([*peaks, *bounds]):
        known, over = peaks.get(key, {}), bounds.get(key, {})
        row: dict[str, Any] = {"target": key[0], "model": key[1], "config": key[2], "seqs": sorted({*known, *over})}
        for budget in BUDGETS_GIB:
            fitting = [s for s, p in known.items() if p <= budget * GiB]
            best = max(fitting) if fitting else None
            unknown = [s for s, bound in over.items() if budget * GiB > bound and (best is None or s > best)]
            row[f"fits_{int(budget)}GiB"] = best
            row[f"unknown_{int(budget)}GiB"] = bool(unknown)
        out.append(row)
    return out


def goals(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 19's goals on v5e 2x4: Llama-3-8B at 8,192 on a 16 GiB chip (of which XLA reports 15.75 GiB
    usable: the budget), Llama-3.2-1B at 8,192 under 5 GiB; the best configuration measured for each
    and how far it is."""
    out = []
    for model, budget in (("llama-3-8b", V5E_USABLE_GIB), ("llama-3.2-1b", 5.0)):
        found = [
            e
            for e in entries
            if e["target"] == "v5e:2x4" and e["model"] == model and e["seq"] == 8192 and "peak_bytes" in e
        ]
        if not found:
            oom = [
                e
                for e in entries
                if e["target"] == "v5e:2x4" and e["model"] == model and e["seq"] == 8192 and "oom" in e
            ]
            out.append(
                {
                    "model": model,
                    "budget_gib": budget,
                    "measured": bool(oom),
                    "reached": False,
                    "oom_configs": [e["config"] for e in oom],
                }
            )
            continue
        best = min(found, key=lambda e: e["peak_bytes"])
        out.append(
            {
                "model": model,
                "budget_gib": budget,
                "measured": True,
                "config": best["config"],
                "peak_gib": best["peak_bytes"] / GiB,
                "temp_gib": best["temp_bytes"] / GiB,
                "argument_gib": best["argument_bytes"] / GiB,
                "reached": best["peak_bytes"] <= budget * GiB,
                "over_gib": max(0.0, best["peak_bytes"] / GiB - budget),
            }
        )
    return out


def bench_scale(*, smoke: bool, out: Path) -> dict[str, Any]:
    """Runs the plan; returns the suite's results (and writes ``out/scale.md``)."""
    plan = PLANS["smoke" if smoke else "full"]
    start = time.time()
    # KITHARA_BENCH_SCALE_BUDGET_S / _WORKERS override the plan's time budget and child count.
    deadline = start + float(os.environ.get("KITHARA_BENCH_SCALE_BUDGET_S", plan["budget_s"]))
    workers = int(os.environ.get("KITHARA_BENCH_SCALE_WORKERS", plan["workers"]))
    cache = None if smoke else CACHE
    every = run_jobs(plan_jobs(plan), workers, deadline, cache)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_rows.json").write_text(json.dumps(every, indent=1))  # every row, before any summary
    results = summarize(every, smoke=smoke, seconds=time.time() - start)
    from bench.scale_report import scale_markdown

    (out / "scale.md").write_text(scale_markdown(results))
    return results


def summarize(every: list[dict[str, Any]], *, smoke: bool, seconds: float) -> dict[str, Any]:
    """The suite's results from its rows (a job measured twice: its last successful row)."""
    by_job: dict[str, dict[str, Any]] = {}
    for row in every:
        key = json.dumps({k: v for k, v in row["job"].items() if k != "cache"}, sort_keys=True)
        if row["ok"] or key not in by_job or not by_job[key]["ok"]:
            by_job[key] = row
    every = list(by_job.values())
    step_rows = [r for r in every if r["job"]["kind"] == "step"]
    depth_rows = [r for r in every if r["job"]["config"] == "compile_depth"]
    rows = [r for r in every if r["job"]["kind"] == "memory" and r["job"]["config"] != "compile_depth"]
    entries = extrapolate(rows)
    return {
        "smoke": smoke,
        "seconds": seconds,
        "versions": versions(),
        "memory": entries,
        "fits": largest_fitting(entries),
        "goals": goals(entries),
        "compile_depth": [{**r["job"], **{k: v for k, v in r.items() if k != "job"}} for r in depth_rows],
        "step_time": step_rows[0] if step_rows else None,
        "raw": rows,
    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows from a run's ``scale_rows.json`` or from a child's output (``SCALE_ROW`` lines)."""
    text = path.read_text()
    if path.suffix == ".json":
        return list(json.loads(text))
    return [json.loads(line[len(ROW_PREFIX) :]) for line in text.splitlines() if line.startswith(ROW_PREFIX)]


def main() -> None:
    """Tables from saved rows (a run cut short, plus children run by hand on more of its jobs):

    python -m bench.scale --rows bench/results/scale_rows.json more.log --out bench/results
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--minutes", type=float, default=0.0, help="wall time the rows took, for the header")
    args = parser.parse_args()
    results = summarize([r for p in args.rows for r in read_rows(p)], smoke=False, seconds=60 * args.minutes)
    from bench.scale_report import scale_markdown

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    (args.out / "scale.md").write_text(scale_markdown(results))
    print(scale_markdown(results))


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "keras", "keras-hub"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["libtpu"] = LIBTPU_VERSION if libtpu_missing() is None else "not installed"
    return found


if __name__ == "__main__":
    main()
