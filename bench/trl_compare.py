"""Side by side with TRL: SFT and DPO in kithara (JAX) and in TRL (PyTorch, CPU).

Same architecture (a ``transformers.LlamaConfig`` with the kithara model's dims, untied
embeddings; parameter counts are checked equal), the same token rows, sequence length,
batch, optimizer (AdamW, lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no
gradient clipping, constant schedule), float32, no gradient checkpointing (TRL's configs
default to it; kithara does not rematerialise), and DPO's frozen-copy reference with
beta 0.1 and the sigmoid loss. Every row is exactly ``seq`` tokens long, so neither
framework pads and both do the same work per step (TRL pads to the longest row of a
batch, kithara to the loader's length: with ragged rows they would compute different
amounts). torch uses as many threads as the machine has cores, like XLA's CPU client.

Each framework trains in its own child process. Every ratio is kithara / TRL: tokens/s
above 1 and peak memory below 1 favour kithara. Step time is the median time between consecutive step ends
(TRL: ``on_step_end`` callbacks), so data collation counts on both sides.

TRL and torch are bench-only dependencies (``pip install -e ".[bench]"``); kithara never
imports them. TRL's DPOTrainer tokenizes text itself; the benchmark hands it the same
token ids (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the columns its own
preparation produces) and skips that preparation.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, SIZES, median_merge, rows, run_child, run_configs, timing


def _threads() -> int:
    """The cores this process may run on (``bench.child`` narrows them for a ``cores`` spec)."""
    return len(os.sched_getaffinity(0))


def _torch_device(spec: dict[str, Any]) -> str:
    """Where TRL trains: where kithara does (``spec["device"]``, ``cpu`` or ``cuda``)."""
    import torch

    device = spec.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kithara runs on a GPU but this torch has no CUDA: install a CUDA build of "
                         "torch==2.13.0 for a side-by-side TRL run on the same device")  # fmt: skip
    return device


def hf_model(size: str, seq: int) -> Any:
    import torch
    import transformers

    arch = SIZES[size]
    config = transformers.LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_dim"],
        intermediate_size=arch["intermediate_dim"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        max_position_embeddings=max(seq, 128),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.float32)


def _tokenizer() -> Any:
    import transformers

    import kithara

    path = Path(kithara.__file__).resolve().parent / "assets" / "tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _common_args(spec: dict[str, Any], out: str) -> dict[str, Any]:
    return dict(
        output_dir=out,
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=spec.get("device", "cpu") == "cpu",
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_length=spec["seq"],
        # SFTConfig and DPOConfig default to True; kithara does not rematerialise, so off
        # for the same work per step (with it on, TRL's step recomputes the forward pass).
        gradient_checkpointing=False,
    )


def _step_timer() -> Any:
    import transformers

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.begin = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # CUDA runs ahead of Python: time the finished step
            self.ends.append(time.perf_counter())

    return StepTimer()


def _timing(timer: Any, tokens_per_step: int, skip: int = 2) -> dict[str, float]:
    return timing([timer.begin, *timer.ends], tokens_per_step, skip)


def trl_sft(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL SFTTrainer on the kithara SFT benchmark's rows, all full length (runs in the child)."""
    import datasets
    import torch
    import trl

    torch.set_num_threads(_threads())
    device = _torch_device(spec)
    size, seq, batch, steps = spec["size"], spec["seq"], spec["batch"], spec["steps"]
    data = rows(batch * (steps + 2), seq, SIZES[size]["vocab_size"], full=True)
    dataset = datasets.Dataset.from_dict({"input_ids": [r["token_ids"].tolist() for r in data]})
    model = hf_model(size, seq)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(**_common_args(spec, out), packing=False, padding_free=False)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=_tokenizer(),
                                 callbacks=[timer])  # fmt: skip
        trainer.train()
    return {
        "framework": f"trl {trl.__version__} / torch {torch.__version__}",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        **_timing(timer, batch * seq),
    }


def trl_dpo(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL DPOTrainer, frozen-copy reference, on the kithara DPO benchmark's pairs (child)."""
    import copy

    import datasets
    import torch
    import trl

    from bench.dpo import pairs

    torch.set_num_threads(_threads())
    device = _torch_device(spec)
    size, seq, batch, steps = spec["size"], spec["seq"], spec["batch"], spec["steps"]
    data = pairs(batch * (steps + 2), seq, SIZES[size]["vocab_size"], full=True)
    prompt_len = seq // 4
    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for r in data:  # the kithara inputs exactly: prompt, then the answer's tokens as input
        columns["prompt_ids"].append(r["chosen_token_ids"][:prompt_len].tolist())
        columns["chosen_ids"].append(r["chosen_token_ids"][prompt_len:].tolist())
        columns["rejected_ids"].append(r["rejected_token_ids"][prompt_len:].tolist())
    dataset = datasets.Dataset.from_dict(columns)

    class PreTokenizedDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    model = hf_model(size, seq)
    ref = copy.deepcopy(model).eval()
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(**_common_args(spec, out), beta=0.1, loss_type=["sigmoid"])
        trainer = PreTokenizedDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=dataset,
                                         processing_class=_tokenizer(), callbacks=[timer])  # fmt: skip
        trainer.train()
    return {
        "framework": f"trl {trl.__version__} / torch {torch.__version__}",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        **_timing(timer, 2 * batch * seq),
    }


def bench_trl(
    size: str,
    *,
    steps: int,
    seq: int,
    batch: int,
    repeats: int = 1,
    shared: bool = False,
    device: str = "cpu",
    cores: int | None = None,
) -> list[dict[str, Any]]:
    """kithara and TRL, SFT and DPO: one row per objective with both sides and the ratios.

    With ``repeats`` > 1 the two sides take turns (kithara, TRL, kithara, TRL, ...) per
    objective, each run a fresh child, and every figure is the median over the repeats,
    so a change in the machine's load hits both sides alike. ``device`` is where TRL
    trains (``cuda`` when kithara runs on a GPU); the memory ratio compares device memory
    when both sides report it, host peak RSS otherwise. ``cores``: both sides' processes
    run on that many cores (their CPU affinity, which sizes XLA's and torch's thread pools);
    all of the machine's when None."""
    base = {"size": size, "steps": steps, "seq": seq, "batch": batch, "device": device}
    if cores is not None:
        base["cores"] = cores
    ours_specs = [{**base, "kind": "sft", "lora": False, "full": True},
                  {**base, "kind": "dpo", "lora": False, "mode": "copy", "full": True}]  # fmt: skip
    theirs_specs = [{**base, "kind": "trl_sft"}, {**base, "kind": "trl_dpo"}]
    ours_runs: list[list[dict[str, Any]]] = [[], []]
    theirs_runs: list[list[dict[str, Any]]] = [[], []]
    for _ in range(repeats):
        if shared:  # smoke: each side's objectives in one child
            for runs, specs in ((ours_runs, ours_specs), (theirs_runs, theirs_specs)):
                for i, result in enumerate(run_configs(specs, shared=True)):
                    runs[i].append(result)
            continue
        for i in range(2):
            ours_runs[i].append(run_child([ours_specs[i]])[0])
            theirs_runs[i].append(run_child([theirs_specs[i]])[0])
    ours_rows = [median_merge(runs) for runs in ours_runs]
    theirs_rows = [median_merge(runs) for runs in theirs_runs]
    rows = [compare(objective, size, batch, seq, ours, theirs)
            for objective, ours, theirs in zip(("sft", "dpo"), ours_rows, theirs_rows, strict=True)]  # fmt: skip
    return [{**row, "cores": cores or len(os.sched_getaffinity(0))} for row in rows]


def compare(objective: str, size: str, batch: int, seq: int, ours: dict[str, Any], theirs: dict[str, Any]) -> dict:
    """One objective's row: both sides and kithara / TRL ratios. Memory compares device
    memory when both sides report it (an accelerator run), host peak RSS otherwise."""
    on_device = "device_peak_mib" in ours and "device_peak_mib" in theirs
    memory_key = "device_peak_mib" if on_device else "peak_rss_mib"
    if ours.get("params", theirs["params"]) != theirs["params"]:
        raise SystemExit(f"kithara and TRL models differ: {ours['params']} vs {theirs['params']} parameters")
    return {
        "objective": objective,
        "size": size,
        "params": theirs["params"],
        "global_batch": batch,
        "seq_len": seq,
        "trl_framework": theirs["framework"],
        "trl_device": theirs.get("device", "cpu"),
        "torch_threads": theirs["torch_threads"],
        "kithara": ours,
        "trl": theirs,
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "memory_measure": memory_key,
        "memory_ratio": ours[memory_key] / theirs[memory_key],
        "loss_is_finite": bool(ours["loss_is_finite"] and np.isfinite(ours["final_loss"])),
    }
