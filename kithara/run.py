"""The main job: build the model, tokenizer, data and the objective's trainer from a
``RunConfig``, train, and measure."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import numpy as np

from kithara import distributed
from kithara.config import RunConfig, to_flat_dict
from kithara.data.source import RowError, Source
from kithara.data.sources import load_source
from kithara.data.tokenizer import Tokenizer
from kithara.logs import set_verbosity
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.scale_config import ScaleConfig
from kithara.objectives.bco import BCOTrainer
from kithara.objectives.configs import CycleConfig, IterativeSFTConfig, SFTConfig
from kithara.objectives.cpo import CPOTrainer
from kithara.objectives.cycle import CycleTrainer
from kithara.objectives.dpo import DPOTrainer
from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.kto import KTOTrainer
from kithara.objectives.orpo import ORPOTrainer
from kithara.objectives.sft import SFTTrainer
from kithara.sharding import ShardingStrategy
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

Pair = tuple[str, str]  # (prompt, reference answer)


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
        set_verbosity(logging.WARNING)  # kithara's own logger logs INFO unless told (kithara/logs.py)
    settings = {k: v for k, v in to_flat_dict(config).items() if k != "distributed.process_id"}
    distributed.check_same_on_all_processes(settings, "run configuration")


# Building blocks ------------------------------------------------------------------------


def build_model(config: RunConfig, vocab_size: int | None = None, seed_offset: int = 0) -> KerasHubModel:
    """The configured model, with ``lora`` and ``model.precision``; ``vocab_size`` (the
    tokenizer's) fills in ``model.vocab_size: null``."""
    m = config.model
    strategy = ShardingStrategy(m.sharding, tensor_parallel=m.tensor_parallel)
    precision = m.precision or "float32"  # load_config sets it (from args.bf16 when unset)
    scale = ScaleConfig(**dataclasses.asdict(m.scale))  # validated again: the YAML bypasses __post_init__
    if m.preset:
        return KerasHubModel.from_preset(
            m.preset,
            precision=precision,
            sharding=strategy,
            lora=config.lora.build(),
            scale=scale,
            quantization=m.quantization,
        )
    if m.vocab_size is None and vocab_size is None:
        raise ValueError("Set model.vocab_size or give a tokenizer (data.tokenizer).")
    if m.vocab_size is not None and vocab_size is not None and m.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size} ids (data.tokenizer): "
            "ids past the embedding table would turn training to NaN at the first step. Set model.vocab_size to "
            f"at least {vocab_size}, or null to take the tokenizer's."
        )
    return KerasHubModel.from_config(
        m.family,
        vocab_size=int(m.vocab_size or vocab_size or 0),
        num_layers=m.num_layers,
        hidden_dim=m.hidden_dim,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        intermediate_dim=m.intermediate_dim,
        head_dim=m.head_dim,
        precision=precision,
        sharding=strategy,
        lora=config.lora.build(),
        seed=m.seed + seed_offset,
        scale=scale,
        quantization=m.quantization,
    )


def load_tokenizer(config: RunConfig) -> Tokenizer:
    path = config.data.tokenizer
    if path is None:  # load_config fills it in from model.preset or refuses
        raise ValueError("data.tokenizer is not set.")
    try:
        return Tokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"data.tokenizer: {error}") from None


def read_source(config: RunConfig, key: str) -> Source | None:
    """The rows of ``data.<key>`` (with ``data.columns`` and ``data.split``), or None when unset."""
    path = getattr(config.data, key)
    if path is None:
        return None
    try:
        return load_source(path, columns=config.data.columns, split=config.data.split)
    except RowError:
        raise  # names the file and line already
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise type(error)(f"data.{key}: {error}") from None


def read_rows(source: Source, skip_bad_rows: bool, parse: Callable[[Mapping[str, Any], str], Any]) -> list[Any]:
    """``parse(row, location)`` of every row; a bad row (``RowError``) stops the run, or is
    logged and skipped with ``skip_bad_rows``."""
    out, skipped = [], 0
    for i in range(len(source)):
        try:
            out.append(parse(source[i], source.describe(i)))
        except RowError as error:
            if not skip_bad_rows:
                raise
            skipped += 1
            logger.warning("Skipping a bad row: %s", error)
    if skipped:
        logger.warning("Skipped %d of %d rows of %s.", skipped, len(source), source.name)
    if not out:
        raise ValueError(f"{source.name} has no usable rows.")
    return out


def _text_field(row: Mapping[str, Any], where: str, field: str) -> str:
    if field not in row:
        raise RowError(where, f"missing; the row has {sorted(row)}.", field)
    value = row[field]
    if not isinstance(value, str):
        raise RowError(where, f"expected a string, got {type(value).__name__}.", field)
    return value


def prompt_and_label(row: Mapping[str, Any], where: str) -> tuple[str, str | None]:
    """``(prompt, completion)`` of a prompt-completion row, ``(text, None)`` of a text row."""
    if "prompt" in row or "completion" in row:
        return _text_field(row, where, "prompt"), _text_field(row, where, "completion")
    if "text" in row:
        return _text_field(row, where, "text"), None
    raise RowError(
        where, f"expected 'prompt' and 'completion' or 'text' fields (data.columns renames fields); got {sorted(row)}."
    )


def cycle_item(row: Mapping[str, Any], where: str) -> str | Pair:
    """A text (``text`` field; a text file's line) or an eval pair (``source``, ``reference``)."""
    if "source" in row or "reference" in row:
        return _text_field(row, where, "source"), _text_field(row, where, "reference")
    if "text" in row:
        return _text_field(row, where, "text")
    raise RowError(
        where,
        "expected a 'text' field (a line of a .txt file), or 'source' and 'reference' for eval pairs; "
        f"got {sorted(row)}.",
    )


def eval_rows(source: Source | None, answer: str, limit: int) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` of the first ``limit`` rows with a string prompt and a
    string ``answer`` field (the completion, or DPO's chosen answer)."""
    if source is None:
        return []
    rows = [source[i] for i in range(min(limit, len(source)))]
    return [
        {"prompt": r["prompt"], "completion": r[answer]}
        for r in rows
        if isinstance(r.get("prompt"), str) and isinstance(r.get(answer), str)
    ]


def exact_match(
    model: KerasHubModel, tokenizer: Tokenizer, rows: Sequence[Mapping[str, Any]], max_length: int
) -> tuple[float, list[tuple[str, str, str]]]:
    """Share of prompts whose greedy completion equals the reference completion (whitespace-
    trimmed), and ``(prompt, generated, reference)`` triples."""
    prompts = [tokenizer.encode_text(r["prompt"]) for r in rows]
    outputs = model.generate(prompts, max_length=max_length, stop_token_ids=[tokenizer.eos_id])
    triples = [
        (r["prompt"], tokenizer.decode(o, skip_special_tokens=True).strip(), r["completion"].strip())
        for r, o in zip(rows, outputs, strict=True)
    ]
    return float(np.mean([gen == ref for _, gen, ref in triples])), triples


# Objectives -----------------------------------------------------------------------------


def run_sft(config: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    train, evaluation = read_source(config, "train_file"), read_source(config, "eval_file")
    model = build_model(config, tokenizer.vocab_size)
    trainer = SFTTrainer(
        model,
        train,
        evaluation,
        args=cast(SFTConfig, config.args),
        processing_class=tokenizer,
        peft_config=config.lora.build(),
    )
    rows = eval_rows(evaluation, "completion", config.generation_eval.max_samples)
    return _train(config, trainer, model, tokenizer, rows, cast(SFTConfig, config.args).max_length)


def preference_run(trainer_class: type[Trainer]) -> Callable[[RunConfig, Tokenizer], dict[str, Any]]:
    """The run of a preference objective (DPO, ORPO, CPO, KTO, BCO): ``trainer_class`` on
    ``data.train_file`` (``prompt`` / ``chosen`` / ``rejected`` rows; KTO and BCO also take
    unpaired ``prompt`` / ``completion`` / ``label`` rows); exact match on the chosen answers."""

    def run_preference(config: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
        train, evaluation = read_source(config, "train_file"), read_source(config, "eval_file")
        model = build_model(config, tokenizer.vocab_size)
        trainer = trainer_class(
            model,
            train_dataset=train,
            eval_dataset=evaluation,
            args=config.args,
            processing_class=tokenizer,
            peft_config=config.lora.build(),
        )
        rows = eval_rows(evaluation, "chosen", config.generation_eval.max_samples)  # greedy answer == chosen
        return _train(config, trainer, model, tokenizer, rows, cast(Any, config.args).max_length)

    run_preference.__name__ = f"run_{trainer_class.__name__}"
    return run_preference


def _train(
    config: RunConfig,
    trainer: Trainer,
    model: KerasHubModel,
    tokenizer: Tokenizer,
    eval_samples: list[dict[str, str]],
    max_length: int,
) -> dict[str, Any]:
    """``trainer.train()``, evaluation and exact match before and after."""
    result = _model_summary(model)
    measure = config.generation_eval.enabled and bool(eval_samples)
    if measure:
        result["exact_match_before"], _ = exact_match(model, tokenizer, eval_samples, max_length)
    result.update(_losses(trainer.train()))
    if trainer.has_eval and config.args.eval_strategy != "no":
        result["eval"] = final_eval(trainer)
    if measure:
        result["exact_match_after"], triples = exact_match(model, tokenizer, eval_samples, max_length)
        result["samples"] = triples[: config.generation_eval.show]
    result["tensorboard_dir"] = config.args.tensorboard_dir
    return result


def run_iterative_sft(config: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``trainer.step(texts=prompts, texts_labels=completions)`` on one optimizer step's worth
    of rows at a time, for ``args.max_steps`` steps or ``args.num_train_epochs`` passes."""
    args = cast(IterativeSFTConfig, config.args)
    source = read_source(config, "train_file")
    if source is None:  # load_config requires it
        raise ValueError("data.train_file is not set.")
    rows = read_rows(source, args.skip_bad_rows, prompt_and_label)
    labelled = [r[1] is not None for r in rows]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{source.name} mixes prompt-completion and text rows; use one kind.")
    per_process = args.per_device_train_batch_size * jax.local_device_count() * args.gradient_accumulation_steps
    per_step = per_process * jax.process_count()  # rows of one optimizer step, all processes
    # One process fills a short last step with masked rows; several drop the remainder so
    # that each has a full share of every step.
    steps_per_epoch = math.ceil(len(rows) / per_step) if jax.process_count() == 1 else len(rows) // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{source.name} has {len(rows)} rows, fewer than one optimizer step of {per_step} "
            "(args.per_device_train_batch_size x devices x args.gradient_accumulation_steps)."
        )
    total = args.max_steps or steps_per_epoch * (args.num_train_epochs or 1)
    evaluation = read_source(config, "eval_file")
    model = build_model(config, tokenizer.vocab_size)
    # The trainer's learning-rate schedule spans args.max_steps: the steps of the epochs asked for.
    steps_args = args if args.max_steps else args.replace(max_steps=total, num_train_epochs=None)
    trainer = IterativeSFTTrainer(model, tokenizer, args=steps_args, peft_config=config.lora.build())
    eval_samples = eval_rows(evaluation, "completion", config.generation_eval.max_samples)
    result = _model_summary(model)
    measure = config.generation_eval.enabled and bool(eval_samples)
    if measure:
        result["exact_match_before"], _ = exact_match(model, tokenizer, eval_samples, args.max_length)
    latest = trainer.checkpointer.latest_step() if trainer.checkpointer is not None and args.resume else None
    for chunk in _step_chunks(rows, steps_per_epoch, per_process, args.seed, start=latest or 0, total=total):
        texts, labels = [r[0] for r in chunk], [r[1] for r in chunk]
        trainer.step(texts=texts, texts_labels=cast(list[str], labels) if labelled[0] else None)
    trainer.finish()
    result.update(_losses(trainer.history))
    if measure:
        result["exact_match_after"], triples = exact_match(model, tokenizer, eval_samples, args.max_length)
        result["samples"] = triples[: config.generation_eval.show]
    result["tensorboard_dir"] = args.tensorboard_dir
    return result


def _step_chunks(
    rows: Sequence[Any], steps_per_epoch: int, per_process: int, seed: int, *, start: int, total: int
) -> Iterator[list[Any]]:
    """This process's rows for each step ``start .. total - 1``: a fresh seeded order per
    epoch, dealt to the processes in blocks, so a resumed run continues where it stopped."""
    per_step = per_process * jax.process_count()
    offset = jax.process_index() * per_process
    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        mine = order[index * per_step + offset : index * per_step + offset + per_process]
        yield [rows[i] for i in mine]


def run_cycle(config: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Two models (``{"A", "B"}``, model B seeded ``model.seed + 1``), or two LoRA adapters
    on one model when ``lora.enabled``, trained on the texts of ``data.train_file`` (side A)
    and ``data.train_file_b`` (side B)."""
    args = cast(CycleConfig, config.args)
    data: dict[str, list[Any]] = {}
    for key in ("train_file", "train_file_b", "eval_file", "eval_file_b"):
        source = read_source(config, key)
        items = [] if source is None else read_rows(source, args.skip_bad_rows, cycle_item)
        if key.startswith("train") and not all(isinstance(x, str) for x in items):
            raise ValueError(f"data.{key} holds texts (a 'text' field, or one per line of a .txt file), not pairs.")
        data[key] = items
    models: KerasHubModel | dict[str, KerasHubModel]
    if config.lora.enabled:
        models = build_model(config, tokenizer.vocab_size)
    else:
        models = {side: build_model(config, tokenizer.vocab_size, seed_offset=k) for k, side in enumerate("AB")}
    pairs = [x for key in ("eval_file", "eval_file_b") for x in data[key] if not isinstance(x, str)]
    measure = config.generation_eval.enabled and bool(pairs)
    trainer = CycleTrainer(
        models,
        tokenizer,
        data["train_file"],
        data["train_file_b"],
        data["eval_file"] or None,
        data["eval_file_b"] or None,
        compute_metrics=_cycle_exact_match if measure else None,
        args=args,
    )
    result: dict[str, Any] = {
        "num_params": sum(m.num_params for m in _as_list(models)),
        "trainable_params": sum(m.num_trainable_params for m in _as_list(models)),
    }
    if measure:
        result["exact_match_before"] = _mean_exact(trainer.evaluate())
    result.update(_losses(trainer.train()))
    if trainer.has_eval and config.args.eval_strategy != "no":
        result["eval"] = final_eval(trainer)
        if measure:
            result["exact_match_after"] = _mean_exact(result["eval"])
    result["tensorboard_dir"] = args.tensorboard_dir
    return result


def _cycle_exact_match(side: str, sources: list[str], generated: list[str], references: list[str]) -> dict[str, float]:
    del side, sources
    return {"exact_match": float(np.mean([g.strip() == r.strip() for g, r in zip(generated, references, strict=True)]))}


def _mean_exact(metrics: Mapping[str, float]) -> float:
    return float(np.mean([v for k, v in metrics.items() if k.startswith("exact_match_")]))


def _as_list(models: KerasHubModel | dict[str, KerasHubModel]) -> list[KerasHubModel]:
    return list(models.values()) if isinstance(models, dict) else [models]


def final_eval(trainer: Trainer) -> dict[str, float]:
    """The trained model's eval metrics: those of an evaluation scheduled at the last step,
    or a new evaluation."""
    last = trainer.eval_history[-1] if trainer.eval_history else None
    if last is not None and trainer.history and last["step"] == trainer.history[-1]["step"]:
        return {k: v for k, v in last.items() if k != "step"}
    return trainer.evaluate()


def _model_summary(model: KerasHubModel) -> dict[str, Any]:
    logger.info("Model:\n%s", model.summary())
    return {"num_params": model.num_params, "trainable_params": model.num_trainable_params}


def _losses(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """First and last loss and the median steady-state throughput; empty when no step ran
    (a run resumed from a checkpoint of its last step)."""
    if not history:
        return {}
    steady = [h["tokens_per_second"] for h in history[len(history) // 2 :]]
    return {
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "steps_run": len(history),
        "tokens_per_second": float(np.median(steady)),
    }


OBJECTIVE_RUNS: Mapping[str, Callable[[RunConfig, Tokenizer], dict[str, Any]]] = {
    "sft": run_sft,
    "dpo": preference_run(DPOTrainer),
    "orpo": preference_run(ORPOTrainer),
    "cpo": preference_run(CPOTrainer),
    "kto": preference_run(KTOTrainer),
    "bco": preference_run(BCOTrainer),
    "iterative_sft": run_iterative_sft,
    "cycle": run_cycle,
}


def run(config: RunConfig) -> dict[str, Any]:
    """Trains as configured; returns losses, eval metrics and exact match before/after."""
    configure_cpu_devices(config.cpu_devices)  # only affects the CPU platform
    join_processes(config)  # before anything touches devices
    tokenizer = load_tokenizer(config)
    result = OBJECTIVE_RUNS[config.objective](config, tokenizer)
    result["objective"] = config.objective
    return result
