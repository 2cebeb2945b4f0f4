"""KTOTrainer (and the unpaired-preference base BCOTrainer shares): rows of one completion
labelled desirable or not, against a frozen reference."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.callbacks.sync_ref import SyncRefModelCallback
from kithara.data.dataloader import Dataloader
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.data.unpaired import UnpairedPreferenceDataset
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses, reference, unpaired_losses
from kithara.objectives.inputs import as_loader, check_ready_data, data_argument, lora_config, resolve_model
from kithara.objectives.unpaired_configs import KTOConfig, _UnpairedConfig
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

SEQUENCE_FIELDS = ("token_ids", "padding_mask", "labels", "label_mask")
REF_KEYS = {"": "ref_logps", "kl_": "ref_KL_logps"}  # TRL's column names


def stacked_inputs(batch: Mapping[str, jax.Array], prefixes: Sequence[str]) -> dict[str, jax.Array]:
    """The ``prefixes`` sequences stacked along the batch (padded to one length) for one forward pass."""
    length = max(batch[f"{p}token_ids"].shape[-1] for p in prefixes)
    out = {}
    for name in SEQUENCE_FIELDS:
        parts = [batch[f"{p}{name}"] for p in prefixes]
        parts = [jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])]) for x in parts]
        out[name] = jnp.concatenate(parts, axis=0)
    return out


class UnpairedPreferenceTrainer(Trainer):
    """The shared part of ``KTOTrainer`` and ``BCOTrainer``: arguments, data, the reference
    and the per-row log-probs. Subclasses set their constants in ``configure`` and write
    ``compute_loss``.

    Args:
        model: a ``kithara.Model``, or a model directory / preset.
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule. (A ``kithara.Model`` here is taken as ``ref_model``: TRL's order.)
        train_dataset: a ``kithara.Dataloader`` or ``UnpairedPreferenceDataset`` (used as
            is), or raw rows (``prompt`` / ``completion`` / ``label``, or paired ``prompt`` /
            ``chosen`` / ``rejected``, which are unpaired) as a path, glob, list of dicts or
            Hugging Face dataset.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        ref_model: a separate, frozen reference model on the same mesh.
        args: the objective's config.
        train_dataloader / eval_dataloader: a ready ``kithara.Dataloader`` instead.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer for raw data
            (``tokenizer=`` too).
        peft_config: LoRA adapters for a ``model`` given as a path.
        **fields: config fields, or the base ``Trainer``'s Kithara names.
    """

    reports_perplexity = False
    step_constants = (*Trainer.step_constants, "beta", "reference", "ref_model", "uses_kl")
    config_class: type[TrainingConfig] = KTOConfig

    def __init__(
        self,
        model: Model | str,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | Model | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        ref_model: Model | None = None,
        args: TrainingConfig | None = None,
        train_dataloader: Dataloader | None = None,
        eval_dataloader: Dataloader | None = None,
        processing_class: Any = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        name = type(self).__name__
        if isinstance(optimizer, Model) and ref_model is None:  # TRL's positional order: (model, ref_model, ...)
            ref_model, optimizer = optimizer, None
        train_name, train_data = data_argument("train", train_dataset, train_dataloader)
        eval_name, eval_data = data_argument("eval", eval_dataset, eval_dataloader)
        if train_data is None:
            raise ValueError(f"{name} needs train_dataloader or train_dataset: prompt / completion / label rows.")
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(_UnpairedConfig, self.resolve_config(args, **fields))
        for data_name, data in ((train_name, train_data), (eval_name, eval_data)):
            if isinstance(data, TrainingConfig):
                raise TypeError(
                    f"{name} got a config as {data_name}: its positional order is (model, optimizer or ref_model, "
                    "train_dataset, eval_dataset); pass the config as args=."
                )
            check_ready_data(config, data, data_name, encoding=("max_length", "truncation_mode"),
                             loading=("skip_bad_rows",))  # fmt: skip
        model, self.tokenizer = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )
        self.beta = config.beta
        self.uses_kl = False
        self.configure(config)
        rows_per_batch = config.per_device_train_batch_size * jax.device_count()
        if self.uses_kl and rows_per_batch < 2:
            raise ValueError(
                f"{name}: a batch of {rows_per_batch} row cannot estimate the KL term (its KL row would pair a "
                "prompt with its own completion); use per_device_train_batch_size >= 2 (TRL's rule too)."
            )

        def loader(data: Any, data_name: str, per_device: int, **options: Any) -> Dataloader:
            def make(source: Source, tok: Tokenizer) -> UnpairedPreferenceDataset:
                return UnpairedPreferenceDataset(
                    source,
                    tok,
                    max_length=config.max_length,
                    truncation_mode=config.truncation_mode,
                    kl_batch_size=rows_per_batch if self.uses_kl else None,
                )

            built = as_loader(data, data_name, self.tokenizer, make, per_device_batch_size=per_device,
                              skip_bad_rows=config.skip_bad_rows, **options)  # fmt: skip
            dataset = built.dataset
            if not isinstance(dataset, UnpairedPreferenceDataset):
                raise ValueError(
                    f"{name} needs unpaired preference data in {data_name} (an UnpairedPreferenceDataset, or raw "
                    f"prompt / completion / label rows), got a {type(dataset).__name__}."
                )
            if self.uses_kl and "kl_" not in dataset.sequences:
                raise ValueError(
                    f"{data_name} has no KL rows, which loss_type={getattr(config, 'loss_type', None)!r} needs: build "
                    f"its UnpairedPreferenceDataset with kl_batch_size={rows_per_batch} (the global batch)."
                )
            return built

        shuffle = config.train_sampling_strategy == "random"  # type: ignore[attr-defined]
        train = loader(train_data, train_name, config.per_device_train_batch_size, seed=config.seed, shuffle=shuffle)
        evaluation = (
            None
            if eval_data is None
            else loader(eval_data, eval_name, config.eval_batch_size, shuffle=False, drop_remainder=False)
        )
        self.ref_model = ref_model
        self.reference, self._reference_variables = reference.select_reference(
            model, ref_model, config.precompute_ref_log_probs, who=name
        )
        super().__init__(
            model,
            cast(optax.GradientTransformation | keras.optimizers.Optimizer | None, optimizer),
            train,
            evaluation,
            profiler=profiler,
            checkpointer=checkpointer,
            callbacks=callbacks,
            args=config,
        )
        log_balance(train, config)
        if config.sync_ref_model:  # TR-DPO's reference sync, as TRL's KTO offers it
            self.add_callback(
                SyncRefModelCallback(
                    self, config.ref_model_mixup_alpha, config.ref_model_sync_steps, ref_model=ref_model
                )
            )
        if config.precompute_ref_log_probs:
            ref_vars = ref_model.variables if ref_model is not None else None
            score = jax.jit(functools.partial(self.reference_scores, self.model.variables, ref_variables=ref_vars))
            for data in (self.train_dataloader, self.eval_dataloader):
                if data is not None:
                    reference.precompute(data, score, self.prefixes, chunk=config.precompute_ref_batch_size or 8)

    def configure(self, config: Any) -> None:
        """Sets the objective's step constants from its config (before the base ``__init__``)."""

    @property
    def prefixes(self) -> tuple[str, ...]:
        return ("", "kl_") if self.uses_kl else ("",)

    def frozen_variables(self) -> ModelVariables | None:
        """``ref_model``'s weights or a frozen copy of the policy's; None with LoRA adapters
        off or precomputed log-probs."""
        return self._reference_variables

    def reference_scores(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], ref_variables: ModelVariables | None = None
    ) -> dict[str, jax.Array]:
        """Reference log-probs of a batch by TRL's names: ``ref_logps`` and, with KL rows,
        ``ref_KL_logps``."""
        inputs = stacked_inputs(batch, self.prefixes)
        logps = reference.reference_logps(
            self.model, self.ref_model, variables, inputs, ref_variables, self.args.loss_chunk_size
        )
        rows = batch["token_ids"].shape[0]
        return {REF_KEYS[p]: logps[i * rows : (i + 1) * rows] for i, p in enumerate(self.prefixes)}

    def row_logps(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], ref_variables: ModelVariables | None
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array], dict[str, jax.Array]]:
        """Policy and reference summed completion log-probs by prefix (``""``, ``"kl_"``),
        the policy's extras (completion lengths and mean logits of the main
        rows), and the model's new non-trainable variables."""
        inputs = stacked_inputs(batch, self.prefixes)
        token_logps, logit_means, non_trainable = dpo_losses.token_logps(
            self.model, variables, inputs, training=True, chunk_size=self.args.loss_chunk_size
        )
        logps, lengths, logit_sums = dpo_losses.sequence_sums(token_logps, logit_means, inputs["label_mask"])
        rows = batch["token_ids"].shape[0]
        policy = {p: logps[i * rows : (i + 1) * rows] for i, p in enumerate(self.prefixes)}
        if all(REF_KEYS[p] in batch for p in self.prefixes):
            ref = {p: batch[REF_KEYS[p]] for p in self.prefixes}
        else:
            ref_logps = reference.reference_logps(
                self.model, self.ref_model, variables, inputs, ref_variables, self.args.loss_chunk_size
            )
            ref = {p: ref_logps[i * rows : (i + 1) * rows] for i, p in enumerate(self.prefixes)}
        extras = {"lengths": lengths[:rows], "mean_logits": logit_sums[:rows] / jnp.maximum(lengths[:rows], 1.0)}
        return policy, ref, extras, non_trainable

    @staticmethod
    def kind_sums(
        label: jax.Array, valid: jax.Array, rewards: jax.Array, logps: jax.Array, mean_logits: jax.Array
    ) -> dict[str, jax.Array]:
        """TRL's per-kind metric sums (``rewards/chosen_sum``, ``count/chosen``, ...)."""
        sums = {}
        for kind, rows in (("chosen", valid & label), ("rejected", valid & ~label)):
            sums[f"rewards/{kind}_sum"] = jnp.where(rows, rewards, 0.0).sum()
            sums[f"logps/{kind}_sum"] = jnp.where(rows, logps, 0.0).sum()
            sums[f"logits/{kind}_sum"] = jnp.where(rows, mean_logits, 0.0).sum()
            sums[f"count/{kind}"] = rows.sum().astype(jnp.float32)
        return sums


class KTOTrainer(UnpairedPreferenceTrainer):
    """Trains a ``Model`` on unpaired feedback (KTO, or unpaired APO-zero): each row is a
    prompt, one completion and a ``label`` (desirable or not).

    The reference policy is chosen as ``DPOTrainer``'s: ``ref_model``; precomputed log-probs
    (``precompute_ref_log_probs``); the model with its LoRA adapters off; else a frozen copy
    of its starting weights. KTO's reference point is TRL's KL estimate: the mean policy-to-
    reference log-ratio of mismatched (prompt, another row's completion) rows, built by
    rotating each batch's completions by one (``UnpairedPreferenceDataset(kl_batch_size=)``),
    clamped at 0 and detached.

    Settings come from a ``KTOConfig`` (``args=``: ``beta``, ``desirable_weight``,
    ``undesirable_weight``, ``loss_type``, ``max_length``, ``precompute_ref_log_probs``, ...)
    or as its fields given as keywords. Metrics (per row of the batch, as every kithara
    metric): ``kl``, ``rewards/chosen_sum``, ``rewards/rejected_sum``, ``logps/*_sum``,
    ``logits/*_sum`` and ``count/chosen`` / ``count/rejected`` (a ``_sum`` over its count is
    TRL's per-kind mean). A batch without one kind of row trains on the other (no NaN).

    Args: see ``UnpairedPreferenceTrainer`` (the constructor is ``DPOTrainer``'s).

    Example:
        >>> trainer = kithara.KTOTrainer(lora_model, train_dataset="feedback.jsonl", processing_class=tokenizer,
        ...     args=kithara.KTOConfig(max_length=512, max_steps=100, per_device_train_batch_size=4))
        >>> trainer.train()
    """

    step_constants = (*UnpairedPreferenceTrainer.step_constants, "desirable_weight", "undesirable_weight", "loss_type")
    config_class = KTOConfig

    def configure(self, config: Any) -> None:
        self.desirable_weight = config.desirable_weight
        self.undesirable_weight = config.undesirable_weight
        self.loss_type = config.loss_type
        self.uses_kl = config.calculate_kl

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng
        policy, ref, extras, non_trainable = self.row_logps(variables, batch, frozen)
        label, valid = batch["label"].astype(bool), extras["lengths"] > 0
        if self.uses_kl:
            kl = unpaired_losses.kl_estimate(policy["kl_"], ref["kl_"], valid)
        else:
            kl = jnp.zeros((), jnp.float32)
        logratio = policy[""] - ref[""]
        per_row = unpaired_losses.kto_loss(
            logratio,
            label,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )
        weight = valid.sum().astype(jnp.float32)
        rewards = jax.lax.stop_gradient(self.beta * logratio)
        sums = {"kl": kl * weight, **self.kind_sums(label, valid, rewards, policy[""], extras["mean_logits"])}
        return LossOutput(jnp.where(valid, per_row, 0.0).sum(), weight, sums), non_trainable


def log_balance(loader: Dataloader, config: Any) -> None:
    """TRL's warning when the desirable / undesirable weights are outside the range of the
    KTO paper's Eq. (8) for this process's balance of desirable and undesirable rows."""
    if not hasattr(config, "desirable_weight"):
        return
    labels = [bool(ex["label"]) for ex in loader.examples]
    desirable = max(sum(labels), 1)
    undesirable = max(len(labels) - desirable, 1)
    if desirable == undesirable:
        return
    dw, uw = config.desirable_weight, config.undesirable_weight
    des_low, des_high = round(undesirable * uw / desirable, 2), round(undesirable * uw / desirable * 1.33, 2)
    und_low, und_high = round(desirable * dw / undesirable / 1.33, 2), round(desirable * dw / undesirable, 2)
    if not (des_low <= dw <= des_high or und_low <= uw <= und_high):
        logger.warning(
            "%d desirable and %d undesirable rows, but the weights are outside the KTO paper's range (Eq. 8): set "
            "EITHER desirable_weight in [%s, %s] OR undesirable_weight in [%s, %s] (not both).",
            desirable, undesirable, des_low, des_high, und_low, und_high,
        )  # fmt: skip
