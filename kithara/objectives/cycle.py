"""CycleTrainer: two mappings A->B and B->A learned from non-parallel text (cycle training).

One cycle step: model B translates a batch of real B text (no gradient); model A is trained
to map that synthetic A text back to the real B text (the only supervised tokens). Then the
mirror image: model A (already updated) translates real A text and model B learns to map it
back. Each side has its own optimizer state and its own jitted update, which leaves the
other side's variables untouched. In two-model mode either side may be a causal LM
(``KerasHubModel``: rows ``source{separator} target``) or a seq2seq model
(``KerasHubSeq2SeqModel``: the synthetic text is the encoder's source, see ``cycle_seq2seq``);
the adapter mode is causal only (see docs/cycle.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import jax
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.tokenizer import Tokenizer, as_tokenizer
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import ModelVariables
from kithara.models.seq2seq_model import KerasHubSeq2SeqModel
from kithara.objectives.configs import CycleConfig
from kithara.objectives.cycle_models import SIDES, CyclePair, SideModel, TwoAdapters, TwoModels, on_side, per_side
from kithara.objectives.cycle_seq2seq import Seq2SeqRow, seq2seq_arrays, seq2seq_rows, source_ids
from kithara.trainer import step as step_lib
from kithara.trainer import validation
from kithara.trainer.losses import LossOutput, causal_lm_loss
from kithara.trainer.state import TrainState
from kithara.trainer.trainer import DataPlan, Trainer

logger = logging.getLogger(__name__)
Row = tuple[list[int], list[bool]]  # token ids and which of them are supervised
Metrics = Callable[[str, list[str], list[str], list[str]], Mapping[str, float]]
OTHER = {"A": "B", "B": "A"}


class CycleTrainer(Trainer):
    """Cycle training of two models (causal or seq2seq), or of two LoRA adapters on one
    frozen causal base.

    Model ``"A"`` maps language A to B, model ``"B"`` maps B to A. A causal side's rows look
    like ``[BOS] source{separator} target EOS`` with loss on `` target EOS``; a seq2seq side
    encodes the source (BART: ``<s> source </s>``) and its decoder reads the start prefix and
    the target (BART: ``</s> <s> target </s>``) with loss on ``target EOS``. Override
    ``format_prompt`` (causal sides only) and ``prepare_cycle_inputs`` to change that.

    Args:
        models: ``{"A": model, "B": model}`` (two models, any families, causal
            ``KerasHubModel`` or seq2seq ``KerasHubSeq2SeqModel``: BART, T5Gemma; one mesh), or one
            ``KerasHubModel`` with LoRA (adapters ``"A"`` and ``"B"`` over one frozen base).
        tokenizers: one ``kithara.Tokenizer`` or ``{"A": ..., "B": ...}``.
        train_dataset_A / train_dataset_B: non-parallel texts of each language: lists of
            strings, or rows with a ``"text"`` field (a ``datasets.Dataset``, a list of dicts).
        eval_dataset_A / eval_dataset_B: texts of each language, or ``(source, reference)``
            pairs (source in that language). Texts give ``cycle_loss_<side>`` (the training
            objective on held-out text); pairs give the supervised ``loss_<side>`` and
            ``compute_metrics`` on greedy translations.
        optimizer: an optax transformation (one state per side) or ``{"A": ..., "B": ...}``;
            default: ``args``'s AdamW and schedule for each side.
        compute_metrics: ``f(side, sources, generations, references) -> {name: value}``.
        args: a ``CycleConfig``: ``batch_size_per_side`` (texts per side per step),
            ``max_length`` (tokens per training row; longer rows are cut at the end, and rows
            left with no supervised token are counted in ``rows_without_targets`` and logged;
            a step or evaluation with none left is refused),
            ``max_new_tokens`` (per synthetic translation), ``separator`` (between source and
            target), ``generation_kwargs`` (sampling of synthetic text), and the base
            ``TrainingConfig`` (``max_steps`` / ``num_train_epochs``: cycle steps, an epoch
            being the smaller dataset once; ``learning_rate``; ``output_dir``; ...).
        callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``CycleConfig`` fields, or the base ``Trainer``'s Kithara names (``steps``,
            ``epochs``, ``eval_steps_interval``, ``tensorboard_dir``, ...).

    Example:
        >>> trainer = kithara.CycleTrainer(models=lora_model, tokenizers=tokenizer,
        ...     train_dataset_A=texts_a, train_dataset_B=texts_b, optimizer=kithara.optimizers.adamw(1e-3),
        ...     steps=200, batch_size_per_side=16, max_length=48, max_new_tokens=16)
        >>> trainer.train(); trainer.evaluate()
    """

    step_constants = (*Trainer.step_constants, "pair", "side_tx")
    config_class = CycleConfig

    def __init__(
        self,
        models: KerasHubModel | Mapping[str, SideModel],
        tokenizers: Tokenizer | Mapping[str, Tokenizer],
        train_dataset_A: Sequence[str],
        train_dataset_B: Sequence[str],
        eval_dataset_A: Sequence[str] | Sequence[tuple[str, str]] | None = None,
        eval_dataset_B: Sequence[str] | Sequence[tuple[str, str]] | None = None,
        *,
        optimizer: optax.GradientTransformation | Mapping[str, optax.GradientTransformation] | None = None,
        compute_metrics: Metrics | None = None,
        args: CycleConfig | None = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        config = cast(CycleConfig, self.resolve_config(args, **fields))
        if isinstance(models, KerasHubSeq2SeqModel):
            raise ValueError("The adapter (one-model) mode is causal only; pass {'A': model_a, 'B': model_b}.")
        pair: CyclePair = TwoAdapters(models) if isinstance(models, KerasHubModel) else TwoModels(models)
        self.pair = pair
        given: Mapping[str, Any] = tokenizers if isinstance(tokenizers, Mapping) else dict.fromkeys(SIDES, tokenizers)
        self.tokenizers: dict[str, Tokenizer] = {}
        for side, tok in given.items():
            wrapped = as_tokenizer(tok)
            if wrapped is None:
                raise ValueError(f"tokenizers[{side!r}] is None; pass a kithara.Tokenizer or a transformers tokenizer.")
            self.tokenizers[side] = wrapped
        if set(self.tokenizers) != set(SIDES):
            raise ValueError(
                f"tokenizers must be one Tokenizer or {{'A': ..., 'B': ...}}, got {sorted(self.tokenizers)}."
            )
        self.train_texts = {"A": cycle_texts(train_dataset_A, "train_dataset_A"),
                            "B": cycle_texts(train_dataset_B, "train_dataset_B")}  # fmt: skip
        self.eval_data = {"A": cycle_texts(eval_dataset_A, "eval_dataset_A", pairs=True),
                          "B": cycle_texts(eval_dataset_B, "eval_dataset_B", pairs=True)}  # fmt: skip
        self.rows_without_targets = dict.fromkeys(SIDES, 0)  # training rows cut to no supervised token
        batch_size, max_length, max_new_tokens = config.batch_size_per_side, config.max_length, config.max_new_tokens
        per_epoch = min(len(t) for t in self.train_texts.values()) // batch_size
        if per_epoch == 0:
            raise ValueError(f"Each train dataset needs at least batch_size_per_side={batch_size} texts.")
        self.batch_size_per_side, self.max_length, self.max_new_tokens = batch_size, max_length, max_new_tokens
        for side in SIDES:
            model = pair.side_model(side)
            validation.check_vocabulary(model, self.tokenizers[side])
            if not isinstance(model, KerasHubSeq2SeqModel) or model.max_sequence_length is None:
                continue
            limit = model.max_sequence_length
            if max(max_length, len(model.decoder_start_ids(self.tokenizers[side])) + max_new_tokens) > limit:
                raise ValueError(
                    f"Model {side!r} takes sequences of at most {limit} tokens; lower "
                    f"max_length ({max_length}) or max_new_tokens ({max_new_tokens})."
                )
        self.separator = config.separator
        self.generation_kwargs = dict(config.generation_kwargs or {})
        self.compute_metrics = compute_metrics
        if optimizer is not None:
            side_tx = dict(optimizer) if isinstance(optimizer, Mapping) else dict.fromkeys(SIDES, optimizer)
            self.side_tx = MappingProxyType(side_tx)
            if set(self.side_tx) != set(SIDES) or not all(
                isinstance(t, optax.GradientTransformation) for t in self.side_tx.values()
            ):
                raise ValueError("optimizer must be an optax GradientTransformation or {'A': ..., 'B': ...} of them.")
        self.batches_per_epoch = per_epoch
        super().__init__(
            pair,
            per_side(self.side_tx) if optimizer is not None else None,
            profiler=profiler,
            checkpointer=checkpointer,
            callbacks=callbacks,
            args=config,
        )
        mesh = pair.mesh
        self.rows_per_step = -(-batch_size // sharding_lib.batch_shards(mesh)) * sharding_lib.batch_shards(mesh)

    # Hooks ------------------------------------------------------------------------------

    def format_prompt(self, text: str, side: str) -> str:
        """What model ``side`` reads before it writes the translation of ``text``."""
        return f"{text}{self.separator}"

    def prepare_cycle_inputs(
        self, sources: Sequence[str], targets: Sequence[str], side: str
    ) -> list[Row] | list[Seq2SeqRow]:
        """Training rows for model ``side``, supervised on ``target EOS`` only. In a cycle step
        the sources are the other model's synthetic text and the targets the original text.

        A causal side gets ``[BOS] prompt(source) target EOS`` (a space before the target) in
        its tokenizer; a seq2seq side gets a ``Seq2SeqRow`` (source to the encoder, target
        after the decoder prefix)."""
        tok = self.tokenizers[side]
        model = self.pair.side_model(side)
        if isinstance(model, KerasHubSeq2SeqModel):
            return seq2seq_rows(model, tok, sources, targets, self.max_length)
        rows = []
        for source, target in zip(sources, targets, strict=True):
            prompt = tok.encode_text(self.format_prompt(source, side))
            joined = tok.encode_text(f"{self.format_prompt(source, side)} {target}")
            answer = joined[len(prompt) :] if joined[: len(prompt)] == prompt else tok.encode(target)
            rows.append(([*prompt, *answer, tok.eos_id], [False] * len(prompt) + [True] * (len(answer) + 1)))
        return rows

    # The objective contract -------------------------------------------------------------

    def default_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """``args``'s optimizer and schedule, one state per side."""
        self.side_tx = MappingProxyType(dict.fromkeys(SIDES, self.args.build_optimizer(total_steps)))
        return per_side(self.side_tx)

    def data_plan(self) -> DataPlan:
        """An epoch: the smaller train dataset once, ``batch_size`` texts per side per step."""
        return DataPlan(
            self.batches_per_epoch, self.batch_size_per_side, self.max_length, has_eval=any(self.eval_data.values())
        )

    def compute_loss(  # type: ignore[override]
        self, variables: ModelVariables, batch: Mapping[str, step_lib.Batch], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The loss of the side ``batch`` is keyed by (``{"A": arrays}``), on the pair's variables."""
        side = _side_of_batch(batch)
        out, _ = self.side_loss(self.pair.side_variables(variables, side), batch[side], rng, side=side)
        return out, variables.non_trainable

    def train_step(  # type: ignore[override]
        self, state: TrainState, batch: Mapping[str, step_lib.Batch], frozen: Any
    ) -> tuple[TrainState, dict]:
        """One update of the side ``batch`` is keyed by (``{"A": [1, rows, length] arrays}``):
        one program per side from the base class's single jit site."""
        side = _side_of_batch(batch)
        return self.side_update(state, batch[side], side=side)

    def host_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """B translates B's texts, A learns to map them back; then the mirror image."""
        metrics: dict[str, jax.Array] = {}
        step = int(jax.device_get(state.step))
        for side in SIDES:
            other = OTHER[side]
            synthetic = self.translate(state.model, other, batch[other], seed=2 * step + (side == "B"))
            rows = self.prepare_cycle_inputs(synthetic, batch[other], side)
            self._check_targets_left(rows, side, f"cycle step {step}", count=True)
            arrays = self._rows_to_arrays(rows)
            state, side_metrics = self.jitted_train_step(state, {side: {k: v[None] for k, v in arrays.items()}})
            metrics.update({f"{k}_{side}": v for k, v in side_metrics.items()})
        metrics["loss"] = (metrics["loss_A"] + metrics["loss_B"]) / 2
        metrics["tokens"] = metrics.pop("tokens_A") + metrics.pop("tokens_B")
        return state, metrics

    def batches(self, start_step: int, data_state: dict[str, Any] | None) -> Iterator[tuple[int, dict[str, list[str]]]]:
        """Texts of each side for every step from ``start_step``: a fresh seeded order per
        epoch and side, so the position is a function of the step (``data_state`` is not
        needed) and resumes exactly."""
        del data_state
        size = self.batch_size_per_side
        for step in range(start_step, 2**62):
            epoch, index = divmod(step, self.steps_per_epoch)
            batch = {}
            for k, side in enumerate(SIDES):
                order = np.random.default_rng([self.seed, epoch, k]).permutation(len(self.train_texts[side]))
                batch[side] = [self.train_texts[side][i] for i in order[index * size : (index + 1) * size]]
            yield epoch, batch

    def eval_metrics(self, variables: ModelVariables) -> dict[str, float]:
        """Per direction: ``loss_<side>`` (teacher-forced, on eval pairs), ``cycle_loss_<side>``
        (the cycle objective on the other side's eval texts) and ``compute_metrics`` on
        greedy translations of the eval pairs' sources (suffixed ``_<side>``)."""
        if not any(self.eval_data.values()):
            raise ValueError("evaluate() needs eval_dataset_A or eval_dataset_B.")
        metrics: dict[str, float] = {}
        limit = self.max_eval_samples  # per direction: the first N pairs and the first N texts
        for side in SIDES:
            pairs = [x for x in self.eval_data[side] if not isinstance(x, str)][:limit]
            texts = [x for x in self.eval_data[OTHER[side]] if isinstance(x, str)][:limit]
            if pairs:
                sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
                metrics[f"loss_{side}"] = self._eval_loss(variables, side, sources, references)
                if self.compute_metrics is not None:
                    generated = self._translate_all(variables, side, sources)
                    for name, value in self.compute_metrics(side, sources, generated, references).items():
                        metrics[f"{name}_{side}"] = float(value)
            if texts:
                synthetic = self._translate_all(variables, OTHER[side], texts)
                metrics[f"cycle_loss_{side}"] = self._eval_loss(variables, side, synthetic, texts)
        return metrics

    # Pure pieces ------------------------------------------------------------------------

    def side_loss(
        self, variables: ModelVariables, batch: step_lib.Batch, rng: jax.Array, *, side: str
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """Next-token cross-entropy of model ``side`` (its own variables) on ``batch``."""
        del rng
        model = self.pair.side_model(side)
        return causal_lm_loss(model, variables, batch, chunk_size=self.args.loss_chunk_size)

    def side_update(self, state: TrainState, batch: step_lib.Batch, *, side: str) -> tuple[TrainState, dict]:
        """One optimizer update of ``side`` only: the other side's variables and optimizer
        state pass through as they are. The step counter advances after side B."""
        own = TrainState(self.pair.side_variables(state.model, side), state.opt_state[side], state.step, state.rng)
        loss_fn = functools.partial(self.side_loss, side=side)
        new, metrics = step_lib.train_step(own, batch, loss_fn=loss_fn, tx=on_side(self.side_tx[side], side))
        return TrainState(
            self.pair.merge_side(state.model, side, new.model),
            {**state.opt_state, side: new.opt_state},
            new.step if side == SIDES[-1] else state.step,
            new.rng,
        ), metrics

    # The step ---------------------------------------------------------------------------

    def translate(self, variables: ModelVariables, side: str, texts: Sequence[str], seed: int = 0) -> list[str]:
        """Model ``side``'s translations of ``texts`` with the given pair variables."""
        tok = self.tokenizers[side]
        model = self.pair.side_model(side)
        options: dict[str, Any] = {"stop_token_ids": [tok.eos_id], **self.generation_kwargs}
        if isinstance(model, KerasHubSeq2SeqModel):
            prompts = [source_ids(model, tok, t, self.max_length) for t in texts]
            options["decoder_start_ids"] = model.decoder_start_ids(tok)
        else:
            prompts = [tok.encode_text(self.format_prompt(t, side)) for t in texts]
        out = model.generate(
            prompts,
            self.max_new_tokens,
            variables=self.pair.side_variables(variables, side),
            seed=jax.random.fold_in(jax.random.key(self.seed), seed),
            **options,
        )
        return [tok.decode(o, skip_special_tokens=True).strip() for o in out]

    def _rows_to_arrays(self, rows: Sequence[Row] | Sequence[Seq2SeqRow]) -> dict[str, jax.Array]:
        """``[rows_per_step, max_length]`` inputs, labels and masks (rows cut at the end;
        padding rows fully masked), sharded over the batch axes."""
        n, length = self.rows_per_step, self.max_length
        if rows and len(rows[0]) == 3:  # (source ids, decoder ids, supervised): a seq2seq side
            return sharding_lib.global_arrays(seq2seq_arrays([Seq2SeqRow(*r) for r in rows], n, length), self.pair.mesh)
        out = {
            "token_ids": np.zeros((n, length), np.int32),
            "padding_mask": np.zeros((n, length), bool),
            "labels": np.zeros((n, length), np.int32),
            "label_mask": np.zeros((n, length), bool),
        }
        for i, (ids, supervised) in enumerate(rows):
            ids, supervised = ids[: length + 1], supervised[: length + 1]
            k = len(ids) - 1
            out["token_ids"][i, :k] = ids[:-1]
            out["padding_mask"][i, :k] = True
            out["labels"][i, :k] = ids[1:]
            out["label_mask"][i, :k] = supervised[1:]
        return sharding_lib.global_arrays(out, self.pair.mesh)

    def _check_targets_left(
        self, rows: Sequence[Row] | Sequence[Seq2SeqRow], side: str, where: str, *, count: bool = False
    ) -> int:
        """Logs the rows that the cut to ``max_length`` leaves without a supervised token (they
        add nothing to the loss; with ``count``, adds them to ``rows_without_targets``);
        refuses when no row keeps one."""
        empty = sum(not any(row[-1][1 : self.max_length + 1]) for row in rows)
        if count:
            self.rows_without_targets[side] += empty
        if not empty:
            return 0
        fix = (
            f"the source part (up to max_new_tokens={self.max_new_tokens} generated tokens and the separator) "
            f"leaves no room for the target within max_length={self.max_length}; raise max_length or lower "
            "max_new_tokens (or shorten the texts)"
        )
        if empty == len(rows):
            raise ValueError(f"{where}: none of model {side!r}'s {len(rows)} rows keeps a supervised token: {fix}.")
        logger.warning("%s: %d of model %r's %d rows keep no supervised token and are left out of the loss: %s.",
                       where, empty, side, len(rows), fix)  # fmt: skip
        return empty

    def _translate_all(self, variables: ModelVariables, side: str, texts: Sequence[str]) -> list[str]:
        size = self.rows_per_step  # one batch bucket for every call
        return [t for i in range(0, len(texts), size) for t in self.translate(variables, side, texts[i : i + size])]

    def _eval_loss(self, variables: ModelVariables, side: str, sources: list[str], targets: list[str]) -> float:
        rows = self.prepare_cycle_inputs(sources, targets, side)
        self._check_targets_left(rows, side, f"evaluate(), model {side!r}")
        total = weight = 0.0
        for i in range(0, len(rows), self.rows_per_step):
            arrays = self._rows_to_arrays(rows[i : i + self.rows_per_step])
            out = jax.device_get(self.jitted_eval_step(variables, {side: arrays}))
            total, weight = total + float(out.total), weight + float(out.weight)
        return total / max(weight, 1.0)


def cycle_texts(data: Any, name: str, *, pairs: bool = False) -> list[Any]:
    """The texts of a dataset argument (or, with ``pairs``, texts and ``(source, reference)``
    pairs): a list of strings, or rows with a ``"text"`` field (a ``datasets.Dataset``, dicts)."""
    if data is None:
        return []
    if isinstance(data, str | bytes):
        raise ValueError(f"{name} is one string; pass a list of texts.")
    column_names = getattr(data, "column_names", None)
    if column_names is not None and type(data).__module__.split(".")[0] == "datasets":
        if isinstance(column_names, Mapping):
            raise ValueError(
                f"{name} is a DatasetDict; pass one split, such as {name}=data[{next(iter(column_names))!r}]."
            )
        if "text" not in column_names:
            raise ValueError(
                f"{name} is a datasets.Dataset with columns {list(column_names)} and no 'text' column, which "
                f"CycleTrainer reads: rename yours (dataset.rename_column({next(iter(column_names))!r}, 'text')) or "
                "pass a list of strings."
            )
        data = data["text"]
    texts: list[Any] = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):
            if "text" not in item:
                raise ValueError(
                    f"{name}[{i}] is a row with fields {sorted(item)} and no 'text' field, which CycleTrainer "
                    "reads; rename the field or pass a list of strings."
                )
            item = item["text"]
        if isinstance(item, str):
            texts.append(item)
        elif pairs and isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            texts.append(tuple(item))
        else:
            wanted = "a string or a (source, reference) pair of strings" if pairs else "a string"
            raise ValueError(f"{name}[{i}] is {type(item).__name__}; expected {wanted}.")
    return texts


def _side_of_batch(batch: Mapping[str, Any]) -> str:
    """The side a step batch belongs to: its one key, ``"A"`` or ``"B"``."""
    if len(batch) != 1 or next(iter(batch)) not in SIDES:
        raise ValueError(f"A cycle step batch is {{'A': arrays}} or {{'B': arrays}}, got keys {sorted(batch)}.")
    return next(iter(batch))
