"""Online RL side by side with TRL: kithara's GRPOTrainer (JAX) and TRL's (PyTorch, CPU).

Both sides train the same Llama-3-family shape (``bench.common.SIZES``, untied embeddings;
parameter counts are checked equal) from random weights, with the bundled BPE tokenizer,
on the same text prompts (each 9 to ``max_prompt_length`` tokens with its BOS, so every
rollout falls in one of kithara's decode buckets), the same group size
(``num_generations``), completions per step, ``max_completion_length``, sampling
(temperature 1, no top-k/top-p), loss (``dapo``, beta 0, one update per rollout), AdamW
(lr 1e-4, no weight decay, no clipping), float32 and no gradient checkpointing. The
reward ignores the text: 1 for every other completion of a group, 0 for the rest, so
advantages are never all zero and both sides do a real update.

Generation runs to ``max_completion_length``: TRL gets ``min_new_tokens`` (its EOS is
masked until then); kithara has no such option and stops at the tokenizer's EOS, which
a random model samples about once in ``vocab_size`` tokens. Every figure counts the
completion tokens actually returned, and each side reports how full its completions were.

Per step, each side records (subclassing its trainer, in the child process):

- rollout: sampling, rewards, advantages, scoring (kithara ``make_rollout``, TRL
  ``_generate_and_score_completions``); kithara's clock starts once the previous update
  has finished (it dispatches asynchronously), so the update's tail is not billed to it;
- generation: the sampling call inside it (kithara ``sample``, TRL ``_generate``:
  tokenizing prompts, ``model.generate`` with its KV cache, decoding texts);
- step: between consecutive rollout starts (kithara) or ``on_step_end`` callbacks (TRL);
  the update is the step minus its rollout.

Rollout tokens/s: completion tokens over rollout time; update tokens/s: prompt plus
completion tokens over update time; generation share: generation time over step time.
The first ``skip`` steps (compilation) are left out. Each side runs in its own child
process (``python -m bench.child``); its peak memory is that process's peak RSS (device
memory on an accelerator). Every ratio is kithara / TRL.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, median_merge, run_child

SKIP = 2  # warm-up steps left out of every figure (compilation, first allocations)
# fmt: off
WORDS = (
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "and", "then", "looked", "at", "saw",
    "big", "small", "red", "blue", "one", "two", "three", "model", "train", "step", "token", "reward", "group",
    "policy", "value", "fast", "slow", "learn",
)
# fmt: on


def prompts(n: int, max_tokens: int, tokenizer: Any, seed: int = 0) -> list[str]:
    """``n`` word prompts, each as many words as fit in ``max_tokens`` tokens (BOS included)
    and at least ``max_tokens // 2 + 1`` of them: one power-of-two bucket for kithara's decoder."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        words: list[str] = []
        text = ""
        while True:
            candidate = " ".join([*words, str(rng.choice(WORDS))])
            if len(tokenizer(candidate)["input_ids"]) > max_tokens:
                break
            words, text = candidate.split(), candidate
        if len(tokenizer(text)["input_ids"]) > max_tokens // 2:
            out.append(text)
    return out


def alternating(prompts: Any, completions: Any, completion_ids: Any = None, **_: Any) -> list[float]:
    """The reward: 1.0 for every other completion, whatever it says (groups are contiguous
    and of even size, so each group has both values and non-zero advantages)."""
    return [float(i % 2) for i in range(len(completions))]


def summarize_steps(records: list[dict[str, float]], skip: int = SKIP) -> dict[str, float]:
    """Steady-state figures from per-step records (``step_s``, ``rollout_s``,
    ``generation_s``, ``prompt_tokens``, ``completion_tokens``, ``rows``), the first
    ``skip`` left out: medians per step and token rates over the steady steps' totals."""
    steady = records[skip:] or records[-1:]
    step = sum(r["step_s"] for r in steady)
    rollout = sum(r["rollout_s"] for r in steady)
    generation = sum(r["generation_s"] for r in steady)
    completion = sum(r["completion_tokens"] for r in steady)
    update_tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in steady)
    return {
        "steps_measured": len(steady),
        "step_s": statistics.median(r["step_s"] for r in steady),
        "rollout_s": statistics.median(r["rollout_s"] for r in steady),
        "generation_s": statistics.median(r["generation_s"] for r in steady),
        "update_s": statistics.median(r["step_s"] - r["rollout_s"] for r in steady),
        "first_step_s": records[0]["step_s"],
        "completion_tokens_per_step": completion / len(steady),
        "prompt_tokens_per_step": sum(r["prompt_tokens"] for r in steady) / len(steady),
        "rollout_tokens_per_s": completion / rollout,
        "generation_tokens_per_s": completion / generation,
        "update_tokens_per_s": update_tokens / (step - rollout),
        "generation_share": generation / step,
        "rollout_share": rollout / step,
    }


def compare(spec: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """The suite's row: both sides, how full their completions were, and kithara / TRL
    ratios (rates above 1 and memory below 1 favour kithara). Memory compares device
    memory when both sides report it, host peak RSS otherwise."""
    if ours["params"] != theirs["params"]:
        raise SystemExit(f"kithara and TRL models differ: {ours['params']} vs {theirs['params']} parameters")
    memory_key = "device_peak_mib" if "device_peak_mib" in ours and "device_peak_mib" in theirs else "peak_rss_mib"
    rows = spec["prompts_per_step"] * spec["num_generations"]
    full = rows * spec["max_completion_length"]
    return {
        "size": spec["size"],
        "params": theirs["params"],
        "num_generations": spec["num_generations"],
        "rows_per_step": rows,
        "max_prompt_length": spec["max_prompt_length"],
        "max_completion_length": spec["max_completion_length"],
        "steps": spec["steps"],
        "trl_framework": theirs["framework"],
        "torch_threads": theirs["torch_threads"],
        "kithara": ours,
        "trl": theirs,
        "kithara_fill": ours["completion_tokens_per_step"] / full,
        "trl_fill": theirs["completion_tokens_per_step"] / full,
        "decode_compilations": ours["decode_compilations"],
        "rollout_tokens_per_s_ratio": ours["rollout_tokens_per_s"] / theirs["rollout_tokens_per_s"],
        "generation_tokens_per_s_ratio": ours["generation_tokens_per_s"] / theirs["generation_tokens_per_s"],
        "update_tokens_per_s_ratio": ours["update_tokens_per_s"] / theirs["update_tokens_per_s"],
        "step_ratio": ours["step_s"] / theirs["step_s"],
        "memory_measure": memory_key,
        "memory_ratio": ours[memory_key] / theirs[memory_key],
        "loss_is_finite": bool(ours["loss_is_finite"] and theirs["loss_is_finite"]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the suite (bench/report.py)."""
    header = ["size", "params", "prompts x G, prompt/completion", "kithara step (s)", "TRL step (s)",
              "kithara rollout tok/s", "TRL rollout tok/s", "ratio", "kithara update tok/s", "TRL update tok/s",
              "ratio", "generation share kithara / TRL", "completion fill kithara / TRL",
              "kithara decode compilations", "kithara peak (MiB)", "TRL peak (MiB)", "memory ratio"]  # fmt: skip
    names = {"peak_rss_mib": "host RSS", "device_peak_mib": "device"}
    body = [
        [r["size"], f"{r['params']:,}",
         f"{r['rows_per_step'] // r['num_generations']}x{r['num_generations']}, "
         f"{r['max_prompt_length']}/{r['max_completion_length']}",
         f"{r['kithara']['step_s']:.3f}", f"{r['trl']['step_s']:.3f}",
         f"{r['kithara']['rollout_tokens_per_s']:,.0f}", f"{r['trl']['rollout_tokens_per_s']:,.0f}",
         f"**{r['rollout_tokens_per_s_ratio']:.2f}x**",
         f"{r['kithara']['update_tokens_per_s']:,.0f}", f"{r['trl']['update_tokens_per_s']:,.0f}",
         f"**{r['update_tokens_per_s_ratio']:.2f}x**",
         f"{r['kithara']['generation_share']:.0%} / {r['trl']['generation_share']:.0%}",
         f"{r['kithara_fill']:.1%} / {r['trl_fill']:.1%}", str(r["decode_compilations"]),
         f"{r['kithara'][r['memory_measure']]:,.0f} ({names[r['memory_measure']]})",
         f"{r['trl'][r['memory_measure']]:,.0f}", f"{r['memory_ratio']:.2f}"]
        for r in rows
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


# The two sides (each runs in its own child process) ---------------------------------------


def _dataset_prompts(spec: dict[str, Any], tokenizer: Any) -> list[str]:
    return prompts(spec["prompts_per_step"] * spec["steps"], spec["max_prompt_length"], tokenizer)


def kithara_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """kithara's GRPOTrainer for ``spec["steps"]`` steps (runs in the child)."""
    import jax
    import optax

    import kithara
    from bench.sft import build_model
    from bench.trl_compare import _tokenizer

    tokenizer = _tokenizer()
    records: list[dict[str, float]] = []

    class Timed(kithara.GRPOTrainer):
        def make_rollout(self, state: Any, index: int, prompt_indices: Any) -> Any:
            jax.block_until_ready(state)  # the previous update's tail is update time, not rollout time
            start = time.perf_counter()
            records.append({"start": start, "generation_s": 0.0, "prompt_tokens": 0, "completion_tokens": 0})
            rollout = super().make_rollout(state, index, prompt_indices)
            records[-1]["rollout_s"] = time.perf_counter() - start
            return rollout

        def sample(self, variables: Any, prompts: Any, k: int, *, seed: int) -> dict[str, Any]:
            start = time.perf_counter()
            out = super().sample(variables, prompts, k, seed=seed)
            records[-1]["generation_s"] += time.perf_counter() - start
            records[-1]["prompt_tokens"] += sum(len(p.ids) for p in out["prompts"])
            records[-1]["completion_tokens"] += sum(len(c) for c in out["completion_ids"])
            records[-1]["rows"] = len(out["completion_ids"])
            return out

    model = build_model(spec["size"], lora=False)
    rows = spec["prompts_per_step"] * spec["num_generations"]
    trainer = Timed(
        model,
        reward_funcs=alternating,
        train_dataset=[{"prompt": p} for p in _dataset_prompts(spec, tokenizer)],
        processing_class=tokenizer,
        optimizer=optax.adamw(LEARNING_RATE, weight_decay=0.0),
        args=kithara.GRPOConfig(
            num_generations=spec["num_generations"],
            per_device_train_batch_size=rows,
            max_prompt_length=spec["max_prompt_length"],
            max_completion_length=spec["max_completion_length"],
            max_steps=spec["steps"],
            temperature=1.0,
            loss_type="dapo",
            scale_rewards="group",
            beta=0.0,
            num_iterations=1,
            logging_steps=10**6,
            save_strategy="no",
            seed=0,
        ),
        progress_bar=False,
    )
    history = trainer.train()
    end = time.perf_counter()  # train() read the last step's metrics: its update has finished
    starts = [r["start"] for r in records] + [end]
    for r, a, b in zip(records, starts[:-1], starts[1:], strict=True):
        r["step_s"] = b - a
    return {
        "framework": f"kithara {kithara.__version__} / jax {jax.__version__}",
        "params": model.num_params,
        "decode_compilations": model.generate_compilations,
        "stopped_share": 1 - float(np.mean([h.get("completions/clipped_ratio", 1.0) for h in history])),
        "load_avg_1m": os.getloadavg()[0],
        "loss_is_finite": bool(np.isfinite(history[-1]["loss"])),
        **summarize_steps(records),
    }


def trl_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same prompts and settings (runs in the child)."""
    import datasets
    import torch
    import transformers
    import trl

    from bench.trl_compare import _common_args, _threads, _tokenizer, _torch_device, hf_model

    torch.set_num_threads(_threads())
    device = _torch_device(spec)
    tokenizer = _tokenizer()
    records: list[dict[str, float]] = []
    ends: list[float] = []

    class Timed(trl.GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            start = time.perf_counter()
            records.append({"generation_s": 0.0, "prompt_tokens": 0, "completion_tokens": 0})
            out = super()._generate_and_score_completions(inputs)
            records[-1]["rollout_s"] = time.perf_counter() - start
            return out

        def _generate(self, prompts: list) -> Any:
            start = time.perf_counter()
            out = super()._generate(prompts)
            records[-1]["generation_s"] += time.perf_counter() - start
            prompt_ids, completion_ids = out[0], out[1]
            records[-1]["prompt_tokens"] += sum(len(p) for p in prompt_ids)
            records[-1]["completion_tokens"] += sum(len(c) for c in completion_ids)
            records[-1]["rows"] = len(completion_ids)
            return out

    class StepEnds(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    model = hf_model(spec["size"], spec["max_prompt_length"] + spec["max_completion_length"])
    rows = spec["prompts_per_step"] * spec["num_generations"]
    common = _common_args({**spec, "batch": rows, "seq": spec["max_prompt_length"]}, "")
    common.pop("max_length")
    losses: list[float] = []

    class Losses(transformers.TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            **{**common, "output_dir": out, "logging_steps": spec["steps"]},
            num_generations=spec["num_generations"],
            max_completion_length=spec["max_completion_length"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            loss_type="dapo",
            scale_rewards="group",
            beta=0.0,
            num_iterations=1,
            # run every completion to max_completion_length: EOS is masked until then
            generation_kwargs={"min_new_tokens": spec["max_completion_length"]},
        )
        dataset = datasets.Dataset.from_dict({"prompt": _dataset_prompts(spec, tokenizer)})
        trainer = Timed(model=model, reward_funcs=alternating, args=config, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[StepEnds(), Losses()])  # fmt: skip
        trainer.train()
    for r, a, b in zip(records, ends[:-1], ends[1:], strict=True):
        r["step_s"] = b - a
    return {
        "framework": f"trl {trl.__version__} / torch {torch.__version__}",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "load_avg_1m": os.getloadavg()[0],
        "loss_is_finite": bool(losses and np.isfinite(losses[-1])),
        **summarize_steps(records),
    }


def bench_rl(
    size: str,
    *,
    steps: int,
    prompts_per_step: int,
    num_generations: int,
    max_prompt_length: int,
    max_completion_length: int,
    repeats: int = 1,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """kithara then TRL, each in a fresh child, ``repeats`` times taking turns; one row of
    medians over the repeats."""
    spec = dict(size=size, steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations,
                max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
                device=device)  # fmt: skip
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(run_child([{**spec, "kind": "grpo"}])[0])
        theirs.append(run_child([{**spec, "kind": "trl_grpo"}])[0])
    return [compare(spec, median_merge(ours), median_merge(theirs))]
