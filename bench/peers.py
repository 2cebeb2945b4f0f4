"""Peers on the same backend: kithara against Tunix (google-tunix, flax nnx) and MaxText on JAX's
CPU backend, side by side in one run: SFT (full and LoRA) and DPO against Tunix, SFT against
MaxText (its LoRA and DPO go through Tunix, which cannot share its environment).

Every side trains the same model from the same weights: kithara builds a Llama-3-family model
(bench/common.py ``SIZES``, untied embeddings, RoPE theta 1,000,000: see ``ROPE_THETA``) from its
seed and writes it in the Hugging Face format; kithara reads it back with
``KerasHubModel.from_preset``, Tunix with its safetensors loader, MaxText through its own
converter (bench/peers_maxtext.py). The parameter counts are checked equal, and so is the loss
at step 0 on the same batch, to 1e-6 relative: a model that differs, or a loss over other
tokens, stops the suite. Against Tunix, which trains on the suite's rows, every later step's
loss is compared too; MaxText trains on its own synthetic batch, which kithara scores for the
step-0 check.

Same work per step on every side:

- the same token rows in the same order (no shuffling), every row exactly ``seq`` tokens, so
  nobody pads (MaxText: its synthetic batch of the same shape);
- SFT: next-token cross-entropy over the rows' ``seq - 1`` predictable tokens (Tunix's default
  loss predicts token ``i + 1`` from the ``seq`` inputs; kithara's rows carry the same targets
  and mask out the last position; MaxText supervises all ``seq`` targets of its batch);
- DPO: a prompt of ``seq / 4`` tokens and two answers filling ``seq`` tokens, the answers' log
  probabilities summed, sigmoid loss with beta 0.1, a frozen reference model (a second copy of
  the weights);
- LoRA: rank 8, alpha 8, on the seven projections of every block;
- AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping), float32, no
  rematerialisation, unscanned layers, one CPU device.

Each configuration trains in a fresh process: kithara's in kithara's environment
(``bench.child``), each peer's in its own (``bench/.venv-tunix``, ``bench/.venv-maxtext``, made by
``make bench``), taking turns (kithara, Tunix, MaxText, kithara, ...) over the repeats; every
figure is the median. Step time is the median time between consecutive step ends after two
warm-up steps (each trainer reads a step's loss back once it is done); compile is the first
step's time minus the steady step (MaxText's compiles before its loop: its figure is its
start-up, from loading the converted weights to the first step). Peak memory is each child's
peak resident memory; ``rss_after_import_mib`` is what the framework's imports alone hold.
``program`` is XLA's cost analysis of each side's compiled step (``program_stats``).

Every ratio is kithara / peer: tokens/s above 1 and memory below 1 favour kithara.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, SIZES, median_merge, rows, run_child, timing

REPO = Path(__file__).resolve().parent.parent
TUNIX_VENV = REPO / "bench" / ".venv-tunix"
MAXTEXT_VENV = REPO / "bench" / ".venv-maxtext"
OBJECTIVES = ("sft", "sft_lora", "dpo")
LORA_RANK, LORA_ALPHA = 8, 8.0
# Tunix 0.1.7's Llama 3 attention calls ``apply_rope`` without the config's ``rope_theta``, so it
# always rotates with its default 1,000,000 (Llama 3 checkpoints say 500,000): the models are
# built with that value so both sides compute the same function.
ROPE_THETA = 1_000_000
# Step 0: the same weights on the same batch, float32 on both sides. Summation order alone moves
# the loss by ~1e-7; Tunix's RoPE with a 500,000 checkpoint moves it by 4e-6.
LOSS_RTOL = 1e-6


def sft_rows(spec: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """``batch * (steps + 2)`` full-length rows; the last position's target is masked out, as
    Tunix's loss (which predicts from the inputs alone) cannot see it."""
    data = rows(spec["batch"] * (spec["steps"] + 2), spec["seq"], SIZES[spec["size"]]["vocab_size"], full=True)
    for r in data:
        r["label_mask"][-1] = False
    return data


def token_rows(tokens: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """A peer's ``[batch, seq + 1]`` token batch as kithara rows: inputs ``[:-1]``, every one of the
    ``seq`` targets ``[1:]`` supervised (MaxText's synthetic batches)."""
    out = []
    for ids in np.asarray(tokens, dtype=np.int32):
        ones = np.ones(len(ids) - 1, bool)
        out.append({"token_ids": ids[:-1], "padding_mask": ones, "labels": ids[1:], "label_mask": ones.copy()})
    return out


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
        data = sft_rows(spec) if "tokens" not in spec else token_rows(spec["tokens"])
        loader = kithara.Dataloader(data, batch, shuffle=False)
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


PEERS = {  # name: (its environment, its entry point, the objectives it runs, the requirements file)
    "tunix": (TUNIX_VENV, "bench.peers_tunix", OBJECTIVES, "bench/peers-tunix.txt"),
    "maxtext": (MAXTEXT_VENV, "bench.peers_maxtext", ("sft",), "bench/peers-maxtext.txt"),
}
NAMES = {"kithara": "kithara", "tunix": "Tunix", "maxtext": "MaxText"}


def peer_python(peer: str) -> str | None:
    """The peer's environment's interpreter, or None when ``make bench`` has not made it."""
    python = PEERS[peer][0] / "bin" / "python"
    return str(python) if python.exists() else None


def run_peer(peer: str, spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([spec], python=peer_python(peer), module=PEERS[peer][1])[0]


def _check_same_start(name: str, ours: dict[str, Any], theirs: dict[str, Any], peer: str) -> dict[str, Any]:
    """The two sides trained the same model from the same weights: the same parameter count, and
    the same loss at step 0 on the same batch (``ours["score"]``: kithara's loss on the peer's
    own first batch, when the peer trains on batches of its own)."""
    other = NAMES[peer]
    if ours["params"] != theirs["params"]:
        raise SystemExit(f"peers {name}: kithara's model has {ours['params']} parameters, {other}'s "
                         f"{theirs['params']}: not the same architecture")  # fmt: skip
    # DPO's step-0 loss is log 2 on both sides whatever the model (policy = reference): its
    # check is on what the loss is made of, the answers' summed log-probabilities.
    key = "logps_chosen" if "logps_chosen" in ours else "losses"
    a, b = (ours["score"] if "score" in ours else ours[key][0]), theirs[key][0]
    if abs(a - b) > LOSS_RTOL * abs(b):
        raise SystemExit(f"peers {name}: step-0 {key} {a!r} (kithara) against {b!r} ({other}): the same "
                         f"weights on the same batch should agree to {LOSS_RTOL:g} relative")  # fmt: skip
    checks: dict[str, Any] = {"step0_check": key, "step0_rel_diff": abs(a - b) / abs(b), "step0_loss": [a, b]}
    if "score" not in ours:  # the same batches throughout: every step's loss is comparable
        n = min(len(ours["losses"]), len(theirs["losses"]))
        pairs = zip(ours["losses"][:n], theirs["losses"][:n], strict=True)
        checks["max_loss_abs_diff"] = max(abs(x - y) for x, y in pairs)
    return checks


def score(spec: dict[str, Any], tokens: list[list[int]]) -> float:
    """kithara's loss, from the suite's weights, on a peer's own ``[batch, seq + 1]`` batch (all
    ``seq`` targets supervised): the first step's loss of a one-step run on it."""
    return run_child([{**spec, "kind": "peers_kithara", "tokens": tokens, "steps": 1}])[0]["losses"][0]


def bench_peers(sizes: list[str], *, steps: int, seq: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """One row per (size, objective, peer): both sides, the checks and the kithara / peer ratios.
    Per repeat the sides take turns: kithara, Tunix, then MaxText (SFT only). A peer whose
    environment is missing stops the suite: ``make bench`` makes both."""
    missing = [f"{p} ({PEERS[p][0]}, from {PEERS[p][3]})" for p in PEERS if peer_python(p) is None]
    if missing:
        raise SystemExit(f"the peers suite needs the peers' environments: {', '.join(missing)} missing; "
                         "`make bench` (or `make bench-peers-env`) makes them")  # fmt: skip
    out = []
    with tempfile.TemporaryDirectory(prefix="kithara-peers-") as tmp:
        for size in sizes:
            weights = os.path.join(tmp, size)
            run_child([{"kind": "peers_weights", "size": size, "weights": weights}])
            for objective in OBJECTIVES:
                spec = {"size": size, "objective": objective, "steps": steps, "seq": seq, "batch": batch,
                        "weights": weights}  # fmt: skip
                peers = [p for p in PEERS if objective in PEERS[p][2]]
                runs: dict[str, list[dict[str, Any]]] = {p: [] for p in ["kithara", *peers]}
                for _ in range(repeats):
                    runs["kithara"].append(run_child([{**spec, "kind": "peers_kithara"}])[0])
                    for peer in peers:
                        runs[peer].append(run_peer(peer, spec))
                ours = median_merge(runs["kithara"])
                for peer in peers:
                    theirs = median_merge(runs[peer])
                    mine = ours
                    if "batch_tokens" in theirs:  # the peer trained on a batch of its own
                        mine = {**ours, "score": score(spec, theirs.pop("batch_tokens"))}
                    out.append(compare(spec, mine, theirs, peer))
    return out


def compare(spec: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any], peer: str) -> dict[str, Any]:
    name = f"{spec['size']} {spec['objective']} against {NAMES[peer]}"
    checks = _check_same_start(name, ours, theirs, peer)
    return {
        "size": spec["size"],
        "objective": spec["objective"],
        "peer": peer,
        "params": ours["params"],
        "global_batch": spec["batch"],
        "seq_len": spec["seq"],
        "steps": spec["steps"],
        "peer_framework": theirs["framework"],
        "kithara": ours,
        "other": theirs,
        **checks,
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "compile_ratio": ours["compile_s"] / max(theirs["compile_s"], 1e-9),
        "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "loss_is_finite": bool(ours["loss_is_finite"] and theirs["loss_is_finite"]),
    }


if __name__ == "__main__":  # pragma: no cover - a manual entry point
    sys.exit("run `python -m bench.run --only peers`")
