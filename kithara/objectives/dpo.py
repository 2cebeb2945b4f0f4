"""DPOTrainer: direct preference optimisation and its loss family on the base Trainer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

from kithara.data.dataloader import Dataloader
from kithara.data.formats import PreferenceDataset
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.adapters import adapter_off
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses
from kithara.objectives.inputs import as_loader, resolve_model
from kithara.trainer import optimizers
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def has_lora(model: Model) -> bool:
    variables = model.variables
    return any(p.endswith("lora_kernel_b") for p in (*variables.trainable, *variables.non_trainable))


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

    Args (besides the ``Trainer`` ones):
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``.
        optimizer: an optax transformation or keras optimizer; default
            ``kithara.optimizers.adamw(learning_rate)``.
        train_dataloader: a ``kithara.Dataloader`` over a ``PreferenceDataset`` (used as is),
            a ``PreferenceDataset``, or raw preference data (``prompt`` / ``chosen`` /
            ``rejected`` rows as a path, glob, list of dicts or Hugging Face dataset) that
            is tokenized with ``tokenizer``.
        eval_dataloader: like ``train_dataloader``, for evaluation (never shuffled).
        ref_model: a separate, frozen reference model on the same mesh.
        beta: the KL strength of the implicit reward ``beta * log(pi / pi_ref)``.
        loss_type: a name in ``dpo_losses.LOSSES`` or ``{name: weight}`` to combine, e.g.
            RPO is ``{"sigmoid": 1.0, "sft": alpha}``.
        label_smoothing: ``e`` of the sigmoid and robust losses (robust needs e < 0.5).
        precompute_ref_log_probs: compute the reference log-probs once before training and
            store them with the loaders' examples (``ref_chosen_logps`` / ``ref_rejected_logps``).
        tokenizer: a ``kithara.Tokenizer`` for raw data (loaded from ``model`` when that is a path).
        max_seq_len: tokens per sequence for raw data (default 1024).
        truncation: for raw data; ``"keep_end"`` (default) cuts the shared prompt's start.
        per_device_batch_size: pairs per device per micro-batch for raw data (default 1).
        learning_rate: for the default optimizer (default 1e-6).

    Example:
        >>> trainer = kithara.DPOTrainer(lora_model, train_dataloader="pairs.jsonl", tokenizer=tokenizer,
        ...                              max_seq_len=512, steps=100, beta=0.1,
        ...                              loss_type={"sigmoid": 1.0, "sft": 0.5})  # RPO
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

    def __init__(
        self,
        model: Model | str,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | None = None,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        *args: Any,
        ref_model: Model | None = None,
        beta: float = 0.1,
        loss_type: str | Mapping[str, float] = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_log_probs: bool = False,
        tokenizer: Tokenizer | None = None,
        max_seq_len: int = 1024,
        truncation: str = "keep_end",
        per_device_batch_size: int = 1,
        learning_rate: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        if ref_model is model:
            raise ValueError(
                "ref_model is the model being trained; pass a separate frozen copy, or leave ref_model=None to use "
                "the model with its LoRA adapters off, a frozen copy of its weights, or precomputed log-probs."
            )
        if train_dataloader is None:
            raise ValueError("DPOTrainer needs train_dataloader: preference data (prompt / chosen / rejected).")
        model, self.tokenizer = resolve_model(model, tokenizer)
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.loss_weights = dpo_losses.loss_weights(loss_type, beta=self.beta, label_smoothing=self.label_smoothing)
        seed = kwargs.get("seed", 0)

        def loader(data: Any, name: str, **options: Any) -> Dataloader:
            def make(source: Source, tokenizer: Tokenizer) -> PreferenceDataset:
                return PreferenceDataset(source, tokenizer, max_seq_len=max_seq_len, truncation=truncation)

            built = as_loader(data, name, self.tokenizer, make, per_device_batch_size=per_device_batch_size, **options)
            if "chosen_" not in getattr(built.dataset, "sequences", ()):
                raise ValueError(
                    f"DPOTrainer needs preference data in {name} (a PreferenceDataset with chosen/rejected)."
                )
            return built

        train = loader(train_dataloader, "train_dataloader", seed=seed)
        evaluation = (
            None
            if eval_dataloader is None
            else loader(eval_dataloader, "eval_dataloader", shuffle=False, drop_remainder=False)
        )
        if ref_model is not None and ref_model.mesh != model.mesh:
            raise ValueError("ref_model must be placed on the same device mesh as the model being trained.")
        self.ref_model = ref_model
        self.ref_apply_model: Model = ref_model if ref_model is not None else model
        if ref_model is not None or precompute_ref_log_probs:
            self.reference = "precomputed" if precompute_ref_log_probs else "ref_model"
        else:
            self.reference = "adapters_off" if has_lora(model) else "frozen_copy"
        self._reference_variables: ModelVariables | None = None
        if self.reference == "ref_model" and ref_model is not None:
            self._reference_variables = ref_model.variables
        elif self.reference == "frozen_copy":
            logger.info(
                "DPO reference: a frozen copy of the model's starting weights (%d parameters more in memory); "
                "give the model LoRA adapters or set precompute_ref_log_probs=True to avoid it.",
                model.num_params,
            )
            copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=model.variable_shardings)
            self._reference_variables = copy(model.variables)
        else:
            logger.info("DPO reference: %s.", self.reference.replace("_", " "))
        super().__init__(
            model,
            optimizer if optimizer is not None else optimizers.adamw(learning_rate),
            train,
            evaluation,
            *args,
            **kwargs,
        )
        if precompute_ref_log_probs:
            for data in (self.train_dataloader, self.eval_dataloader):
                if data is not None:
                    self.precompute_reference(data)

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
        inputs = pair_inputs(batch)
        if ref_variables is not None:
            model, ref_vars = self.ref_apply_model, ref_variables
        else:
            model, ref_vars = self.model, adapter_off(variables)
        logits, _ = model.apply(jax.lax.stop_gradient(ref_vars), inputs, training=False)
        logps, _, _ = dpo_losses.sequence_logps(logits, inputs["labels"], inputs["label_mask"])
        logps = jax.lax.stop_gradient(logps)
        half = batch["chosen_token_ids"].shape[0]
        return logps[:half], logps[half:]

    def precompute_reference(self, loader: Dataloader, chunk: int = 8) -> None:
        """Stores reference log-probs in each of the loader's examples (per-example fields
        that reach every batch), so training runs no reference forward pass."""
        if jax.process_count() > 1:
            # Each process holds a different number of examples, so per-process passes over
            # globally sharded weights would not line up; live references work everywhere.
            raise ValueError(
                "precompute_ref_log_probs runs on a single process only; with several processes use a live "
                "reference (ref_model, or LoRA adapters off)."
            )
        variables = self.model.variables
        fn = jax.jit(self.reference_logps)
        ref_variables = self.ref_model.variables if self.ref_model is not None else None
        examples = loader.examples
        length = loader.max_seq_len
        keys = [
            f"{s}_{n}" for s in ("chosen", "rejected") for n in ("token_ids", "padding_mask", "labels", "label_mask")
        ]
        for start in range(0, len(examples), chunk):
            rows = examples[start : start + chunk]
            batch = {}
            for key in keys:
                arrays = []
                for ex in rows + [rows[0]] * (chunk - len(rows)):
                    value = ex.get(key)
                    if value is None:  # padding_mask: the token ids' own length
                        value = np.ones(len(ex[key.replace("padding_mask", "token_ids")]), bool)
                    arrays.append(np.pad(np.asarray(value), (0, length - len(value))))
                batch[key] = jnp.asarray(np.stack(arrays))
            chosen, rejected = jax.device_get(fn(variables, batch, ref_variables))
            for i, ex in enumerate(rows):
                ex["ref_chosen_logps"] = np.asarray(chosen[i], np.float32)
                ex["ref_rejected_logps"] = np.asarray(rejected[i], np.float32)
        loader.extras.update({k: np.zeros((), np.float32) for k in REF_KEYS})

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
        logits, non_trainable = self.model.apply(variables, inputs, training=True)
        logps, lengths, logit_sums = dpo_losses.sequence_logps(logits, inputs["labels"], inputs["label_mask"])
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
