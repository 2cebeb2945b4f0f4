"""Peers on the same backend: kithara against Tunix (google-tunix, JAX/flax nnx) on JAX's CPU
backend, SFT (full and LoRA) and DPO, side by side in one run.

Both sides train the same model from the same weights: kithara builds a Llama-3-family model
(bench/common.py ``SIZES``, untied embeddings) from its seed and writes it in the Hugging Face
format; kithara reads it back with ``KerasHubModel.from_preset`` and Tunix with its own
safetensors loader. The parameter counts are checked equal, and so is the loss of step 0 (the
same weights on the same first batch, to 1e-5 relative): a model that differs, or a loss over
other tokens, stops the suite. The losses of every later step are compared too and reported.

Same work per step on both sides:

- the same token rows in the same order (no shuffling), every row exactly ``seq`` tokens, so
  neither side pads;
- SFT: next-token cross-entropy over the rows' ``seq - 1`` predictable tokens (Tunix's default
  loss predicts token ``i + 1`` from the ``seq`` inputs; kithara's rows carry the same targets
  and mask out the last position);
- DPO: a prompt of ``seq / 4`` tokens and two answers filling ``seq`` tokens, the answers' log
  probabilities summed, sigmoid loss with beta 0.1, a frozen reference model (a second copy of
  the weights);
- LoRA: rank 8, alpha 8, on the seven projections of every block;
- AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping), float32, no
  rematerialisation, one CPU device (Tunix's ``fsdp`` x ``tp`` mesh of 1 x 1).

Each configuration trains in a fresh process: kithara's in kithara's environment
(``bench.child``), Tunix's in its own (``bench/.venv-tunix``, ``bench.peers_tunix``), taking turns
(kithara, Tunix, kithara, Tunix, ...) over the repeats; every figure is the median. Step time is
the median time between consecutive step ends after two warm-up steps (both trainers read each
step's loss back one step late, so a step's end is when its loss reaches the host); compile is
the first step's time minus the steady step. Peak memory is each child's peak resident memory;
``rss_after_import_mib`` is what the framework's imports alone hold.

Every ratio is kithara / Tunix: tokens/s above 1 and memory below 1 favour kithara.
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, SIZES, median_merge, rows, run_child

REPO = Path(__file__).resolve().parent.parent
TUNIX_VENV = REPO / "bench" / ".venv-tunix"
OBJECTIVES = ("sft", "sft_lora", "dpo")
LORA_RANK, LORA_ALPHA = 8, 8.0
# Tunix 0.1.7's Llama 3 attention calls ``apply_rope`` without the config's ``rope_theta``, so it
# always rotates with its default 1,000,000 (Llama 3 checkpoints say 500,000): the models are
# built with that value so both sides compute the same function.
ROPE_THETA = 1_000_000
# Step 0: the same weights on the same batch, float32 on both sides. Summation order alone moves
# the loss by ~1e-7; Tunix's RoPE with a 500,000 checkpoint moves it by 4e-6.
LOSS_RTOL = 1e-6
SKIP = 2  # warm-up steps left out of the steady figures


def sft_rows(spec: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """``batch * (steps + 2)`` full-length rows; the last position's target is masked out, as
    Tunix's loss (which predicts from the inputs alone) cannot see it."""
    data = rows(spec["batch"] * (spec["steps"] + 2), spec["seq"], SIZES[spec["size"]]["vocab_size"], full=True)
    for r in data:
        r["label_mask"][-1] = False
    return data


def dpo_rows(spec: dict[str, Any], *, tunix: bool = False) -> list[dict[str, np.ndarray]]:
    """The DPO benchmark's full-length pairs (bench/dpo.py), the answers' last target masked out.

    ``tunix``: the same pairs as Tunix's ``TrainingInput`` columns: ``prompt_ids`` (the first
    ``seq / 4`` tokens), ``chosen_ids`` / ``rejected_ids`` (the rest of each ``seq``-token
    sequence) and all-ones masks."""
    from bench.dpo import pairs

    seq = spec["seq"]
    data = pairs(spec["batch"] * (spec["steps"] + 2), seq, SIZES[spec["size"]]["vocab_size"], full=True)
    prompt = seq // 4
    out = []
    for r in data:
        if not tunix:
            masks = {f"{s}_label_mask": np.r_[r[f"{s}_label_mask"][:-1], False] for s in ("chosen", "rejected")}
            out.append({**r, **masks})
            continue
        row = {"prompt_ids": r["chosen_token_ids"][:prompt], "prompt_mask": np.ones(prompt, bool)}
        for side in ("chosen", "rejected"):
            answer = r[f"{side}_token_ids"][prompt:]
            row[f"{side}_ids"], row[f"{side}_mask"] = answer, np.ones(len(answer), bool)
        out.append(row)
    return out


def timing(marks: list[float], tokens_per_step: int) -> dict[str, float]:
    """Steady-state figures from host times: the start, then each step's end."""
    steps = [b - a for a, b in itertools.pairwise(marks)]
    steady = steps[SKIP:] or steps[-1:]
    step = statistics.median(steady)
    return {
        "step_s": step,
        "first_step_s": steps[0],
        "compile_s": max(steps[0] - step, 0.0),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady),
    }


_OPCODE = re.compile(r" ([a-z][a-z0-9_-]*)\((?=%|\))")  # `%x = f32[2]{0} fusion(%a, ...)`: the opcode


def program_stats(compiled: list[Any]) -> dict[str, float]:
    """XLA's own account of a side's compiled step (the programs it runs per step, summed): FLOPs
    and bytes accessed from its cost analysis, and from the optimised HLO the instructions of
    each entry computation (one CPU kernel each, about), how many are fusions, and the
    layout copies and transposes left outside fusions (memory traffic the arithmetic does not
    need). Noise-free, unlike the timings."""
    out = {"flops": 0.0, "bytes_accessed": 0.0, "kernels": 0, "fusions": 0, "copies": 0, "transposes": 0}
    for program in compiled:
        cost = program.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out["flops"] += float(cost.get("flops", 0.0))
        out["bytes_accessed"] += float(cost.get("bytes accessed", 0.0))
        entry = program.as_text().split("\nENTRY ", 1)[1].split("\n}\n", 1)[0].splitlines()[1:]
        ops = [m.group(1) for line in entry if (m := _OPCODE.search(line.split(" = ", 1)[-1]))]
        ops = [op for op in ops if op not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")]
        out["kernels"] += len(ops)
        out["fusions"] += sum(op == "fusion" for op in ops)
        out["copies"] += sum(op == "copy" for op in ops)
        out["transposes"] += sum(op == "transpose" for op in ops)
    return out


def write_weights(spec: dict[str, Any]) -> dict[str, Any]:
    """kithara's model of ``spec["size"]`` from its seed, in the Hugging Face format (child)."""
    import kithara

    model = kithara.KerasHubModel.from_config("llama3", **SIZES[spec["size"]], rope_max_wavelength=ROPE_THETA)
    model.save_in_hf_format(spec["weights"])
    return {"params": model.num_params, "loss_is_finite": True}


def kithara_once(spec: dict[str, Any]) -> dict[str, Any]:
    """kithara's side of one configuration (runs in the child)."""
    import jax
    import optax

    import kithara
    from bench.dpo import pair_dataset
    from kithara.sharding import shard_batch

    objective, steps, seq, batch = spec["objective"], spec["steps"], spec["seq"], spec["batch"]
    lora = kithara.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, targets=("all",)) if objective == "sft_lora" else None
    model = kithara.KerasHubModel.from_preset(spec["weights"], lora=lora)
    tx = optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    if objective == "dpo":
        loader = kithara.Dataloader(pair_dataset(dpo_rows(spec), seq), batch, shuffle=False)
        ref = kithara.KerasHubModel.from_preset(spec["weights"])
        trainer: Any = kithara.DPOTrainer(model, tx, loader, ref_model=ref, steps=steps, progress_bar=False,
                                          beta=0.1, loss_type="sigmoid")  # fmt: skip
        tokens = 2 * batch * seq
    else:
        loader = kithara.Dataloader(sft_rows(spec), batch, shuffle=False)
        trainer = kithara.Trainer(model, tx, loader, steps=steps, progress_bar=False)
        tokens = batch * seq
    history = trainer.train()
    marks = list(itertools.accumulate([0.0] + [h["step_time"] for h in history]))
    host_batch = next(loader.epoch(0))
    batch = shard_batch({k: v[None] for k, v in host_batch.items()}, model.mesh, leading_dims=1)
    program = trainer.lower_train_step(trainer.train_state, batch).compile()
    result = {
        "framework": f"kithara {kithara.__version__} / jax {jax.__version__}",
        "params": model.num_params - (model.num_trainable_params if lora else 0),  # the base model's
        "trainable_params": model.num_trainable_params,
        "losses": [float(h["loss"]) for h in history],
        "loss_is_finite": bool(np.isfinite(history[-1]["loss"])),
        **timing(marks, tokens),
        "program": program_stats([program]),
    }
    if objective == "dpo":
        result["logps_chosen"] = [float(h["logps/chosen"]) for h in history]
    return result


def tunix_python() -> str:
    python = TUNIX_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"the peers suite needs Tunix's environment at {TUNIX_VENV}; `make bench` makes it "
                         "(or `make bench-peers-env`), from bench/peers-tunix.txt")  # fmt: skip
    return str(python)


def run_tunix(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([spec], python=tunix_python(), module="bench.peers_tunix")[0]


def _check_same_start(name: str, ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """The two sides trained the same model from the same weights on the same first batch."""
    if ours["params"] != theirs["params"]:
        raise SystemExit(f"peers {name}: kithara's model has {ours['params']} parameters, Tunix's "
                         f"{theirs['params']}: not the same architecture")  # fmt: skip
    # DPO's step-0 loss is log 2 on both sides whatever the model (policy = reference): its
    # check is on what the loss is made of, the answers' summed log-probabilities.
    key = "logps_chosen" if "logps_chosen" in ours else "losses"
    a, b = ours[key][0], theirs[key][0]
    if abs(a - b) > LOSS_RTOL * abs(b):
        raise SystemExit(f"peers {name}: step-0 {key} {a!r} (kithara) against {b!r} (Tunix): the same weights "
                         f"on the same batch should agree to {LOSS_RTOL:g} relative")  # fmt: skip
    n = min(len(ours["losses"]), len(theirs["losses"]))
    checks = {
        "step0_check": key,
        "step0_rel_diff": abs(a - b) / abs(b),
        "step0_loss": [ours["losses"][0], theirs["losses"][0]],
        "max_loss_abs_diff": max(abs(x - y) for x, y in zip(ours["losses"][:n], theirs["losses"][:n], strict=True)),
    }
    return checks


def bench_peers(sizes: list[str], *, steps: int, seq: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One row per (size, objective): both sides, the checks and the kithara / Tunix ratios."""
    tunix_python()  # fail before any work when the environment is missing
    out = []
    with tempfile.TemporaryDirectory(prefix="kithara-peers-") as tmp:
        for size in sizes:
            weights = os.path.join(tmp, size)
            run_child([{"kind": "peers_weights", "size": size, "weights": weights}])
            for objective in OBJECTIVES:
                spec = {"size": size, "objective": objective, "steps": steps, "seq": seq, "batch": batch,
                        "weights": weights}  # fmt: skip
                ours, theirs = [], []
                for _ in range(repeats):
                    ours.append(run_child([{**spec, "kind": "peers_kithara"}])[0])
                    theirs.append(run_tunix(spec))
                out.append(compare(spec, median_merge(ours), median_merge(theirs)))
    return out


def compare(spec: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    name = f"{spec['size']} {spec['objective']}"
    checks = _check_same_start(name, ours, theirs)
    return {
        "size": spec["size"],
        "objective": spec["objective"],
        "params": ours["params"],
        "global_batch": spec["batch"],
        "seq_len": spec["seq"],
        "steps": spec["steps"],
        "tunix_framework": theirs["framework"],
        "kithara": ours,
        "tunix": theirs,
        **checks,
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "compile_ratio": ours["compile_s"] / max(theirs["compile_s"], 1e-9),
        "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "loss_is_finite": bool(ours["loss_is_finite"] and theirs["loss_is_finite"]),
    }


def tunix_versions() -> str:
    """The Tunix environment's pins, for the report."""
    out = subprocess.run([tunix_python(), "-m", "pip", "freeze"], capture_output=True, text=True, check=False)
    keep = ("google-tunix", "jax", "jaxlib", "flax", "qwix", "optax")
    return ", ".join(line for line in out.stdout.splitlines() if line.split("==")[0] in keep)


if __name__ == "__main__":  # pragma: no cover - a manual entry point
    sys.exit("run `python -m bench.run --only peers`")
