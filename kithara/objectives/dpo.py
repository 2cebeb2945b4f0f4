"""DPOTrainer: direct preference optimisation and its loss family on the base Trainer."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.data.dataloader import Dataloader
from kithara.models.adapters import adapter_off
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

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

    Args (besides the ``Trainer`` ones):
        ref_model: a separate, frozen reference model. Without it the reference is the
            policy with its LoRA adapters switched off (models with LoRA), or, with
            ``precompute_ref_log_probs``, the model as it is before training.
        beta: the KL strength of the implicit reward ``beta * log(pi / pi_ref)``.
        loss_type: a name in ``dpo_losses.LOSSES`` or ``{name: weight}`` to combine, e.g.
            RPO is ``{"sigmoid": 1.0, "sft": alpha}``.
        label_smoothing: ``e`` of the sigmoid and robust losses (robust needs e < 0.5).
        precompute_ref_log_probs: compute the reference log-probs once before training and
            store them with the loaders' examples (``ref_chosen_logps`` / ``ref_rejected_logps``).

    Example:
        >>> data = PreferenceDataset(rows, tokenizer, max_seq_len=512)
        >>> trainer = kithara.DPOTrainer(lora_model, kithara.optimizers.adamw(5e-6),
        ...                              kithara.Dataloader(data, 1), steps=100, beta=0.1,
        ...                              loss_type={"sigmoid": 1.0, "sft": 0.5})  # RPO
        >>> trainer.train()
    """

    def __init__(
        self,
        model: Model,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer,
        train_dataloader: Dataloader,
        eval_dataloader: Dataloader | None = None,
        *args: Any,
        ref_model: Model | None = None,
        beta: float = 0.1,
        loss_type: str | Mapping[str, float] = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_log_probs: bool = False,
        **kwargs: Any,
    ) -> None:
        if ref_model is model:
            raise ValueError(
                "ref_model is the model being trained; pass a separate frozen copy, or leave ref_model=None to use "
                "the model with its LoRA adapters off (or precompute_ref_log_probs=True)."
            )
        if ref_model is None and not precompute_ref_log_probs and not has_lora(model):
            raise ValueError(
                "DPO needs a reference: pass ref_model, give the model LoRA adapters (the reference is then the "
                "model with adapters off), or set precompute_ref_log_probs=True."
            )
        for loader in (train_dataloader, eval_dataloader):
            if loader is not None and "chosen_" not in getattr(loader.dataset, "sequences", ()):
                raise ValueError("DPOTrainer needs preference data (a PreferenceDataset with chosen/rejected).")
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.loss_weights = dpo_losses.loss_weights(loss_type, beta=self.beta, label_smoothing=self.label_smoothing)
        self.ref_model = ref_model
        super().__init__(model, optimizer, train_dataloader, eval_dataloader, *args, **kwargs)
        if ref_model is not None:
            self._pass_reference_as_argument(ref_model)
        if precompute_ref_log_probs:
            for loader in (train_dataloader, eval_dataloader):
                if loader is not None:
                    self.precompute_reference(loader)

    # Log-probs --------------------------------------------------------------------------

    def _pass_reference_as_argument(self, ref_model: Model) -> None:
        """Re-jits the steps with the frozen reference's variables as an argument (sharded
        like the reference model), so they are not baked into the programs as constants."""
        if ref_model.mesh != self.model.mesh:
            raise ValueError("ref_model must be placed on the same device mesh as the model being trained.")
        mesh, ref_shardings = self.model.mesh, ref_model.variable_shardings

        def train(state: Any, batch: Any, ref: ModelVariables) -> Any:
            loss_fn = functools.partial(self.dpo_loss, ref_variables=ref)
            return self.train_step(state, batch, loss_fn=loss_fn, tx=self.tx)

        def evaluate(variables: ModelVariables, batch: Any, ref: ModelVariables) -> LossOutput:
            return self.dpo_loss(variables, batch, jax.random.key(0), ref_variables=ref)[0]

        batch_sharding = sharding_lib.batch_sharding
        train_fn = jax.jit(
            train,
            in_shardings=(self.state_shardings, batch_sharding(mesh, leading_dims=1), ref_shardings),
            out_shardings=(self.state_shardings, sharding_lib.replicated(mesh)),
            donate_argnames=("state",),
        )
        eval_fn = jax.jit(
            evaluate,
            in_shardings=(self.state_shardings.model, batch_sharding(mesh), ref_shardings),
            out_shardings=sharding_lib.replicated(mesh),
        )
        self._train_step_fn = lambda state, batch: train_fn(state, batch, ref_model.variables)  # type: ignore[assignment]
        self._eval_step_fn = lambda variables, batch: eval_fn(variables, batch, ref_model.variables)  # type: ignore[assignment]

    def reference_logps(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], ref_variables: ModelVariables | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Reference summed completion log-probs ``(chosen, rejected)`` of a batch: from
        ``ref_model`` (with ``ref_variables``, by default its own) if there is one, else from
        ``variables`` with the adapters off."""
        inputs = pair_inputs(batch)
        if self.ref_model is not None:
            model = self.ref_model
            ref_vars = ref_variables if ref_variables is not None else self.ref_model.variables
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
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        return self.dpo_loss(variables, batch, rng)

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
