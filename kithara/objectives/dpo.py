"""DPOTrainer: direct preference optimisation and its loss family on the base Trainer."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.callbacks.sync_ref import SyncRefModelCallback
from kithara.data.dataloader import Dataloader
from kithara.data.formats import PreferenceDataset
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.adapters import has_lora
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses, reference
from kithara.objectives.configs import DPOConfig
from kithara.objectives.inputs import as_loader, check_ready_data, data_argument, lora_config, resolve_model
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def pair_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Chosen and rejected stacked along the batch (padded to one length) for one forward pass."""
    length = max(batch["chosen_token_ids"].shape[-1], batch["rejected_token_ids"].shape[-1])
    out = {}
    for name in ("token_ids", "padding_mask", "labels", "label_mask"):
        parts = [batch[f"{side}_{name}"] for side in ("chosen", "rejected")]
        parts = [jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, length - p.shape[-1])]) for p in parts]
        out[name] = jnp.concatenate(parts, axis=0)
    return out


class DPOTrainer(Trainer):
    """Trains a ``Model`` on preference pairs (``PreferenceDataset``) with a DPO-family loss.

    The reference policy, in order of precedence: ``ref_model`` (a separate frozen model);
    with ``precompute_ref_log_probs``, log-probs computed once before training (from
    ``ref_model`` if given, else from the model as it is) and stored with the examples; for a
    model with LoRA adapters, the same model with its adapters switched off (no second copy
    of the weights); otherwise a frozen on-device copy of the model's starting weights.
    With ``sync_ref_model`` (TR-DPO) a ``SyncRefModelCallback`` moves that reference
    toward the policy every ``ref_model_sync_steps`` steps.

    Settings come from a ``DPOConfig`` (``args=``, TRL's names: ``beta``, ``loss_type`` and
    ``loss_weights``, ``label_smoothing``, ``precompute_ref_log_probs``, ``max_length``,
    ``truncation_mode``, ``per_device_train_batch_size``, ``learning_rate``, ...) or as its
    fields given as keywords; the base ``Trainer``'s Kithara names (``steps``, ...) work too.
    ``beta``, the loss weights and the reference are compiled into the step: fixed at
    construction.

    Args:
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``.
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule. (A ``kithara.Model`` here is taken as ``ref_model``: TRL's order.)
        train_dataset: a ``kithara.Dataloader`` over a ``PreferenceDataset`` (used as is),
            a ``PreferenceDataset``, or raw preference data (``prompt`` / ``chosen`` /
            ``rejected`` rows as a path, glob, list of dicts or Hugging Face dataset) that
            is tokenized with the tokenizer.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        ref_model: a separate, frozen reference model on the same mesh.
        args: a ``DPOConfig``. ``loss_type`` may also be given as ``{name: weight}``.
        train_dataloader / eval_dataloader: a ready ``kithara.Dataloader`` (the base
            Trainer's names), instead of ``train_dataset`` / ``eval_dataset``.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer for raw data
            (``tokenizer=`` too; loaded from ``model`` when that is a path).
        peft_config: LoRA adapters for a ``model`` given as a path.
        **fields: ``DPOConfig`` fields, or the base ``Trainer``'s Kithara names.

    Example:
        >>> trainer = kithara.DPOTrainer(lora_model, train_dataset="pairs.jsonl", processing_class=tokenizer,
        ...     args=kithara.DPOConfig(max_length=512, max_steps=100, beta=0.1,
        ...                            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))  # RPO
        >>> trainer.train()
    """

    reports_perplexity = False  # the eval loss is the pairwise loss, not a token NLL
    step_constants = (
        *Trainer.step_constants,
        "beta",
        "label_smoothing",
        "loss_weights",
        "reference",
        "ref_apply_model",
    )
    config_class = DPOConfig

    def __init__(
        self,
        model: Model | str,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | Model | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        ref_model: Model | None = None,
        args: DPOConfig | None = None,
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
        if isinstance(optimizer, Model) and ref_model is None:  # TRL's positional order: (model, ref_model, ...)
            ref_model, optimizer = optimizer, None
        train_name, train_data = data_argument("train", train_dataset, train_dataloader)
        eval_name, eval_data = data_argument("eval", eval_dataset, eval_dataloader)
        if train_data is None:
            raise ValueError(
                "DPOTrainer needs train_dataloader or train_dataset: preference data (prompt / chosen / rejected)."
            )
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        if isinstance(fields.get("loss_type"), Mapping):  # {name: weight}
            if fields.get("loss_weights") is not None:
                raise ValueError("loss_type={name: weight} already gives the weights; drop loss_weights=.")
            weights = dict(fields.pop("loss_type"))
            fields["loss_type"], fields["loss_weights"] = list(weights), list(weights.values())
        config = cast(DPOConfig, self.resolve_config(args, **fields))
        for name, data in ((train_name, train_data), (eval_name, eval_data)):
            if isinstance(data, TrainingConfig):
                raise TypeError(
                    f"DPOTrainer got a config as {name}: its positional order is (model, optimizer or ref_model, "
                    "train_dataset, eval_dataset); pass the config as args=."
                )
            check_ready_data(config, data, name, encoding=("max_length", "truncation_mode"), loading=("skip_bad_rows",))
        model, self.tokenizer = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )
        self.beta, self.label_smoothing = config.beta, config.label_smoothing
        self.loss_weights = MappingProxyType(
            dpo_losses.loss_weights(config.loss_weight_map(), beta=self.beta, label_smoothing=self.label_smoothing)
        )

        def loader(data: Any, name: str, per_device: int, **options: Any) -> Dataloader:
            def make(source: Source, tokenizer: Tokenizer) -> PreferenceDataset:
                return PreferenceDataset(
                    source, tokenizer, max_length=config.max_length, truncation_mode=config.truncation_mode
                )

            built = as_loader(
                data,
                name,
                self.tokenizer,
                make,
                per_device_batch_size=per_device,
                skip_bad_rows=config.skip_bad_rows,
                **options,
            )
            if "chosen_" not in getattr(built.dataset, "sequences", ()):
                raise ValueError(
                    f"DPOTrainer needs preference data in {name} (a PreferenceDataset with chosen/rejected)."
                )
            return built

        train = loader(train_data, train_name, config.per_device_train_batch_size, seed=config.seed)
        evaluation = (
            None
            if eval_data is None
            else loader(eval_data, eval_name, config.eval_batch_size, shuffle=False, drop_remainder=False)
        )
        self.ref_model = ref_model
        self.ref_apply_model: Model = ref_model if ref_model is not None else model
        if config.sync_ref_model and has_lora(model):
            raise ValueError(
                "sync_ref_model=True with a LoRA model: its reference is the model with its adapters off (or a "
                "ref_model), and mixing the adapters' two factors is not mixing the adapted weights, so TR-DPO "
                "cannot update it (TRL refuses sync_ref_model with PEFT too). Train without LoRA adapters, or set "
                "sync_ref_model=False."
            )
        self.reference, self._reference_variables = reference.select_reference(
            model, ref_model, config.precompute_ref_log_probs, who="DPO"
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
        if config.precompute_ref_log_probs:
            for data in (self.train_dataloader, self.eval_dataloader):
                if data is not None:
                    self.precompute_reference(data)
        if config.sync_ref_model:  # TR-DPO
            self.add_callback(
                SyncRefModelCallback(
                    self, config.ref_model_mixup_alpha, config.ref_model_sync_steps, ref_model=self.ref_model
                )
            )

    def frozen_variables(self) -> ModelVariables | None:
        """The reference weights passed to the steps: ``ref_model``'s, or a frozen copy of the
        policy's starting weights; None when the reference is the model with its adapters
        off or precomputed log-probs."""
        return self._reference_variables

    # Log-probs --------------------------------------------------------------------------

    def reference_logps(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], ref_variables: ModelVariables | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Reference summed completion log-probs ``(chosen, rejected)`` of a batch: from
        ``ref_variables`` (of ``ref_model``, or a frozen copy of the policy) when given, else
        from ``variables`` with the adapters off (the model as it is, without adapters)."""
        logps = reference.reference_logps(
            self.model, self.ref_model, variables, pair_inputs(batch), ref_variables, self.args.loss_chunk_size
        )
        half = batch["chosen_token_ids"].shape[0]
        return logps[:half], logps[half:]

    def precompute_reference(self, loader: Dataloader, chunk: int = 8) -> None:
        """Stores reference log-probs in each of the loader's examples (per-example fields
        that reach every batch), so training runs no reference forward pass."""
        variables = self.model.variables
        ref_variables = self.ref_model.variables if self.ref_model is not None else None

        def score(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            return dict(zip(REF_KEYS, self.reference_logps(variables, batch, ref_variables), strict=True))

        reference.precompute(loader, jax.jit(score), ("chosen_", "rejected_"), chunk)

    # The loss ---------------------------------------------------------------------------

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        return self.dpo_loss(variables, batch, rng, ref_variables=frozen)

    def dpo_loss(
        self,
        variables: ModelVariables,
        batch: Mapping[str, jax.Array],
        rng: jax.Array,
        ref_variables: ModelVariables | None = None,
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The pairwise loss (sum over valid pairs, weight = their count) and the metrics."""
        del rng
        inputs = pair_inputs(batch)
        token_logps, logit_means, non_trainable = dpo_losses.token_logps(
            self.model, variables, inputs, training=True, chunk_size=self.args.loss_chunk_size
        )
        logps, lengths, logit_sums = dpo_losses.sequence_sums(token_logps, logit_means, inputs["label_mask"])
        if all(k in batch for k in REF_KEYS):
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_c, ref_r = self.reference_logps(variables, batch, ref_variables)
        half = batch["chosen_token_ids"].shape[0]
        p = dpo_losses.PairLogps(logps[:half], logps[half:], ref_c, ref_r, lengths[:half], lengths[half:])
        per_pair = dpo_losses.combined_loss(p, self.loss_weights, self.beta, self.label_smoothing)
        valid = (lengths[:half] > 0) & (lengths[half:] > 0)

        def total(x: jax.Array) -> jax.Array:
            return jnp.where(valid, x, 0.0).sum()

        b = self.beta
        sums = {
            "rewards/chosen": total(b * p.rw),
            "rewards/rejected": total(b * p.rl),
            "rewards/accuracies": total((p.rw > p.rl).astype(jnp.float32)),
            "rewards/margins": total(b * p.margin),
            "logps/chosen": total(p.chosen),
            "logps/rejected": total(p.rejected),
            "logits/chosen": total(logit_sums[:half] / jnp.maximum(lengths[:half], 1.0)),
            "logits/rejected": total(logit_sums[half:] / jnp.maximum(lengths[half:], 1.0)),
        }
        out = LossOutput(total=total(per_pair), weight=valid.sum().astype(jnp.float32), sums=sums)
        return out, non_trainable
