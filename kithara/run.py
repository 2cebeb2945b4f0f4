"""The main job: build model, data and trainer from a ``RunConfig``, train, and measure."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from kithara import distributed
from kithara.callbacks import Checkpointer
from kithara.config import RunConfig, to_flat_dict
from kithara.data.dataloader import Dataloader
from kithara.data.formats import DATASETS, Dataset
from kithara.data.tokenizer import Tokenizer
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.objectives.dpo import DPOTrainer
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


def join_processes(config: RunConfig) -> None:
    """Joins the job's processes (``config.distributed``) and checks that they all run the
    same configuration; on processes other than 0, only warnings and errors are logged."""
    d = config.distributed
    timeouts = distributed.DistributedTimeouts(initialization=d.initialization_timeout, heartbeat=d.heartbeat_timeout)
    if not distributed.initialize(d.coordinator_address, d.num_processes, d.process_id, timeouts=timeouts):
        return
    if jax.process_index() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one console log per job, from process 0
    settings = {k: v for k, v in to_flat_dict(config).items() if k != "distributed.process_id"}
    distributed.check_same_on_all_processes(settings, "run configuration")


def build_model(config: RunConfig, vocab_size: int | None = None) -> KerasHubModel:
    """The configured model; ``vocab_size`` (the tokenizer's) fills in ``model.vocab_size: null``."""
    m = config.model
    if not m.preset and m.vocab_size is None and vocab_size is None:
        raise ValueError("Set model.vocab_size or pass the tokenizer's vocab_size.")
    strategy = ShardingStrategy(m.sharding, tensor_parallel=m.tensor_parallel)
    lora = LoraConfig(config.lora.rank, config.lora.alpha, tuple(config.lora.targets)) if config.lora.enabled else None
    if m.preset:
        return KerasHubModel.from_preset(m.preset, precision=m.precision, sharding=strategy, lora=lora)
    return KerasHubModel.from_config(
        m.family,
        vocab_size=int(m.vocab_size or vocab_size or 0),
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


def build_dataset(config: RunConfig, path: str, tokenizer: Tokenizer) -> Dataset:
    """The configured dataset class over one data file."""
    d = config.data
    if d.format not in DATASETS:
        raise ValueError(f"data.format must be one of {sorted(DATASETS)}, got {d.format!r}.")
    if (d.format == "preference") != (config.objective == "dpo"):
        raise ValueError(
            f"objective={config.objective} cannot train on data.format={d.format}: "
            "objective=dpo takes preference data, and preference data needs objective=dpo."
        )
    options: dict[str, Any] = {}
    if d.format == "prompt_completion":
        options["completion_only_loss"] = d.completion_only_loss
    if d.format == "conversational":
        options["assistant_only_loss"] = d.assistant_only_loss
    return DATASETS[d.format](
        path,
        tokenizer,
        max_seq_len=d.max_seq_len,
        truncation=d.truncation,
        columns=d.columns,
        split=d.split,
        **options,
    )


def exact_match(
    model: KerasHubModel, tokenizer: Tokenizer, rows: Sequence[dict[str, Any]], max_length: int
) -> tuple[float, list[tuple[str, str, str]]]:
    """Share of prompts whose greedy completion equals the reference (whitespace-trimmed),
    and ``(prompt, generated, reference)`` triples."""
    prompts = [tokenizer.encode_text(r["prompt"]) for r in rows]
    outputs = model.generate(prompts, max_length=max_length, stop_token_ids=[tokenizer.eos_id])
    triples = [
        (r["prompt"], tokenizer.decode(o, skip_special_tokens=True).strip(), r["completion"].strip())
        for r, o in zip(rows, outputs, strict=True)
    ]
    return float(np.mean([gen == ref for _, gen, ref in triples])), triples


def objective(config: RunConfig) -> tuple[type[Trainer], dict[str, Any]]:
    """The trainer class for ``config.objective`` and its own options."""
    if config.objective == "sft":
        return Trainer, {}
    if config.objective == "dpo":
        o = config.dpo
        return DPOTrainer, dict(
            beta=o.beta,
            loss_type=o.loss_weights or o.loss_type,
            label_smoothing=o.label_smoothing,
            precompute_ref_log_probs=o.precompute_ref_log_probs,
        )
    raise ValueError(f"objective must be 'sft' or 'dpo', got {config.objective!r}.")


def run(config: RunConfig) -> dict[str, Any]:
    """Trains as configured; returns losses, eval metrics and exact match before/after."""
    configure_cpu_devices(config.cpu_devices)  # only affects the CPU platform
    join_processes(config)  # before anything touches devices
    d, t = config.data, config.trainer
    trainer_class, objective_options = objective(config)
    tokenizer = Tokenizer.from_pretrained(d.tokenizer)
    train_set = build_dataset(config, d.train_file, tokenizer)
    eval_set = build_dataset(config, d.eval_file, tokenizer) if d.eval_file else None

    model = build_model(config, vocab_size=tokenizer.vocab_size)
    logger.info("Model:\n%s", model.summary())
    train_loader = Dataloader(
        train_set, d.per_device_batch_size, seed=d.seed, packing=d.packing, skip_bad_rows=d.skip_bad_rows
    )
    eval_loader = (
        Dataloader(
            eval_set,
            d.per_device_batch_size,
            shuffle=False,
            drop_remainder=False,
            packing=d.packing,
            skip_bad_rows=d.skip_bad_rows,
        )
        if eval_set is not None
        else None
    )
    _, total_steps = plan_steps(
        len(train_loader), steps=t.steps, epochs=t.epochs, gradient_accumulation_steps=t.gradient_accumulation_steps
    )
    trainer = trainer_class(
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
        checkpointer=Checkpointer(t.checkpoint_dir, t.checkpoint_interval, t.max_checkpoints)
        if t.checkpoint_dir
        else None,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        progress_bar=t.progress_bar,
        seed=t.seed,
        **objective_options,
    )
    result: dict[str, Any] = {"num_params": model.num_params, "trainable_params": model.num_trainable_params}
    g = config.generation_eval
    sample_rows: list[dict[str, Any]] = []
    if g.enabled and eval_set is not None and d.format == "prompt_completion":
        rows = [eval_set.source[i] for i in range(min(g.max_samples, len(eval_set)))]
        sample_rows = [r for r in rows if isinstance(r.get("prompt"), str)]
    if sample_rows:
        result["exact_match_before"], _ = exact_match(model, tokenizer, sample_rows, d.max_seq_len)
    history = trainer.train()
    if history:  # empty when resumed from a checkpoint of the last step
        result["first_loss"], result["final_loss"] = history[0]["loss"], history[-1]["loss"]
        steady = [h["tokens_per_second"] for h in history[len(history) // 2 :]]
        result["tokens_per_second"] = float(np.median(steady))
    if eval_loader is not None:
        result["eval"] = trainer.evaluate()
    if sample_rows:
        result["exact_match_after"], triples = exact_match(model, tokenizer, sample_rows, d.max_seq_len)
        result["samples"] = triples[: g.show]
    result["tensorboard_dir"] = t.tensorboard_dir
    return result
