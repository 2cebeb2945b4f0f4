"""Cycle training: two models versus one base with two LoRA adapters (memory and step time).

Each arrangement trains a ``kithara.CycleTrainer`` in its own child process on the same
synthetic texts: a cycle step is two greedy translations (one per side, KV-cached) and two
one-side updates. Reported per mode: the bytes of the trainer state on the devices (weights,
of which trainable, optimizer state), steady-state step time, compile time (first step
minus a steady one), real tokens/s of the two updates, and the child's peak RSS; the
adapter mode is also given relative to two models.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import LEARNING_RATE, LORA, SIZES, peak_memory_mib, run_configs
from bench.sft import summarize

MODES = ("two_models", "two_adapters")


def word_tokenizer(vocab_size: int) -> Any:
    """Words ``w0 .. w{n}`` filling the model's vocabulary, one id each (plus BOS/EOS/pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    import kithara

    specials = ["<pad>", "<s>", "</s>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return kithara.Tokenizer(hf)


def texts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, vocab - 4, words)) for _ in range(n)]


def state_bytes(tree: Any) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One arrangement (runs in the child)."""
    import optax

    import kithara

    size, mode, steps, seq, batch = (spec[k] for k in ("size", "mode", "steps", "seq", "batch"))
    arch = SIZES[size]
    if mode == "two_models":
        models: Any = {s: kithara.KerasHubModel.from_config("llama3", seed=i, **arch) for i, s in enumerate("AB")}
    else:
        models = kithara.KerasHubModel.from_config("llama3", lora=kithara.LoraConfig(**LORA), **arch)
    # Sources of seq/2 words; the synthetic side may use up to seq/2 new tokens, so rows fit seq.
    half = seq // 2 - 2
    data = {s: texts(batch * (steps + 2), half, arch["vocab_size"], seed=k) for k, s in enumerate("AB")}
    trainer = kithara.CycleTrainer(
        models=models, tokenizers=word_tokenizer(arch["vocab_size"]), train_dataset_A=data["A"],
        train_dataset_B=data["B"], optimizer=optax.adamw(LEARNING_RATE, weight_decay=0.0), steps=steps,
        batch_size_per_side=batch, max_length=seq, max_new_tokens=half, progress_bar=False,
    )  # fmt: skip
    state = trainer.init_state()
    memory = {
        "weights_bytes": state_bytes(state.model),
        "trainable_bytes": state_bytes(state.model.trainable),
        "optimizer_bytes": state_bytes(state.opt_state),
    }
    trainer.train_state = state
    start = time.perf_counter()
    history = trainer.train()
    wall = time.perf_counter() - start
    finite = bool(np.isfinite(history[-1]["loss"]))
    return {**memory, "train_s": wall, "loss_is_finite": finite, **summarize(history)}


def bench_cycle(size: str, *, steps: int, seq: int, batch: int, shared: bool = False) -> list[dict[str, Any]]:
    """Both arrangements at ``size``; the adapter mode's figures relative to two models."""
    specs = [{"kind": "cycle", "size": size, "mode": m, "steps": steps, "seq": seq, "batch": batch} for m in MODES]
    results = [{**s, **r} for s, r in zip(specs, run_configs(specs, shared=shared), strict=True)]
    base = results[0]
    for r in results:
        r["weights_vs_two_models"] = r["weights_bytes"] / base["weights_bytes"]
        r["step_vs_two_models"] = r["step_s"] / base["step_s"]
        r["memory_vs_two_models"] = peak_memory_mib(r) / peak_memory_mib(base)
    return results
