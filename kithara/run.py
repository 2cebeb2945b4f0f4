"""The main job: build model, data and trainer from a ``RunConfig``, train, and measure."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from tokenizers import Tokenizer

from kithara.config import RunConfig
from kithara.data.dataloader import Dataloader
from kithara.data.prompt_completion import read_jsonl, token_id, tokenize_prompt_completion
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.sharding import ShardingStrategy
from kithara.trainer import optimizers
from kithara.trainer.trainer import Trainer, plan_steps

logger = logging.getLogger(__name__)


def configure_cpu_devices(count: int | None) -> None:
    """Asks JAX for ``count`` CPU devices (ignored by accelerators); must run before JAX
    initialises its backends."""
    if count is None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as error:  # backends already initialised by earlier JAX use
        logger.warning("Could not set %d CPU devices (%s); using %d.", count, error, len(jax.devices()))


def build_model(config: RunConfig) -> KerasHubModel:
    m = config.model
    strategy = ShardingStrategy(m.sharding, tensor_parallel=m.tensor_parallel)
    lora = LoraConfig(config.lora.rank, config.lora.alpha, tuple(config.lora.targets)) if config.lora.enabled else None
    if m.preset:
        return KerasHubModel.from_preset(m.preset, precision=m.precision, sharding=strategy, lora=lora)
    return KerasHubModel.from_config(
        m.family,
        vocab_size=m.vocab_size,
        num_layers=m.num_layers,
        hidden_dim=m.hidden_dim,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        intermediate_dim=m.intermediate_dim,
        head_dim=m.head_dim,
        precision=m.precision,
        sharding=strategy,
        lora=lora,
        seed=m.seed,
    )


def build_optimizer(config: RunConfig, total_steps: int) -> optax.GradientTransformation:
    o = config.optimizer
    decay_steps = max(total_steps, o.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, o.warmup_steps, decay_steps, o.final_learning_rate
    )
    return optimizers.adamw(schedule, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)


def exact_match(
    model: KerasHubModel, tokenizer: Tokenizer, rows: Sequence[dict[str, str]], config: RunConfig
) -> tuple[float, list[tuple[str, str, str]]]:
    """Share of prompts whose greedy completion equals the reference (whitespace-trimmed),
    and ``(prompt, generated, reference)`` triples."""
    d = config.data
    bos = [token_id(tokenizer, d.bos_token)] if d.bos_token else []
    eos = token_id(tokenizer, d.eos_token)
    prompts = [bos + tokenizer.encode(r["prompt"], add_special_tokens=False).ids for r in rows]
    outputs = model.generate(prompts, max_length=d.max_seq_len, stop_token_ids=[eos])
    triples = [
        (r["prompt"], tokenizer.decode(o).strip(), r["completion"].strip()) for r, o in zip(rows, outputs, strict=True)
    ]
    return float(np.mean([gen == ref for _, gen, ref in triples])), triples


def run(config: RunConfig) -> dict[str, Any]:
    """Trains as configured; returns losses, eval metrics and exact match before/after."""
    configure_cpu_devices(config.cpu_devices)  # only affects the CPU platform
    d, t = config.data, config.trainer
    tokenizer = Tokenizer.from_file(d.tokenizer)

    def encode(rows: list[dict[str, Any]]) -> tuple[list[dict[str, np.ndarray]], int]:
        return tokenize_prompt_completion(
            rows,
            tokenizer,
            max_seq_len=d.max_seq_len,
            bos_token=d.bos_token,
            eos_token=d.eos_token,
            pad_token=d.pad_token,
        )

    train_examples, dropped = encode(read_jsonl(d.train_file))
    if dropped:
        logger.warning(
            "Dropped %d training rows left without completion tokens by max_seq_len=%d.", dropped, d.max_seq_len
        )
    eval_rows = read_jsonl(d.eval_file) if d.eval_file else []
    eval_examples = encode(eval_rows)[0] if eval_rows else []

    model = build_model(config)
    logger.info("Model:\n%s", model.summary())
    train_loader = Dataloader(train_examples, d.per_device_batch_size, seed=d.seed)
    eval_loader = (
        Dataloader(eval_examples, d.per_device_batch_size, shuffle=False, drop_remainder=False)
        if eval_examples
        else None
    )
    _, total_steps = plan_steps(
        len(train_loader), steps=t.steps, epochs=t.epochs, gradient_accumulation_steps=t.gradient_accumulation_steps
    )
    trainer = Trainer(
        model,
        build_optimizer(config, total_steps),
        train_loader,
        eval_dataloader=eval_loader,
        steps=t.steps,
        epochs=t.epochs,
        log_steps_interval=t.log_steps_interval,
        eval_steps_interval=t.eval_steps_interval if eval_loader else None,
        eval_epochs_interval=t.eval_epochs_interval if eval_loader else None,
        max_eval_samples=t.max_eval_samples if eval_loader else None,
        tensorboard_dir=t.tensorboard_dir,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        progress_bar=t.progress_bar,
        seed=t.seed,
    )
    result: dict[str, Any] = {"num_params": model.num_params, "trainable_params": model.num_trainable_params}
    g = config.generation_eval
    sample_rows = eval_rows[: g.max_samples] if g.enabled else []
    if sample_rows:
        result["exact_match_before"], _ = exact_match(model, tokenizer, sample_rows, config)
    history = trainer.train()
    result["first_loss"], result["final_loss"] = history[0]["loss"], history[-1]["loss"]
    steady = [h["tokens_per_second"] for h in history[len(history) // 2 :]]
    result["tokens_per_second"] = float(np.median(steady))
    if eval_loader is not None:
        result["eval"] = trainer.evaluate()
    if sample_rows:
        result["exact_match_after"], triples = exact_match(model, tokenizer, sample_rows, config)
        result["samples"] = triples[: g.show]
    result["tensorboard_dir"] = t.tensorboard_dir
    return result
