"""The reference policy of the preference objectives (DPO, KTO, BCO): which one, and the
summed completion log-probs under it, live or precomputed once before training."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kithara.data.dataloader import Dataloader
from kithara.models.adapters import adapter_off, frozen_copy, has_lora
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses

logger = logging.getLogger(__name__)

KINDS = ("ref_model", "precomputed", "adapters_off", "frozen_copy")


def select_reference(
    model: Model, ref_model: Model | None, precompute: bool, *, who: str
) -> tuple[str, ModelVariables | None]:
    """``(kind, frozen variables)`` of the reference, in order of precedence: ``ref_model``
    (its variables), ``"precomputed"`` log-probs (none), the model with its LoRA adapters off
    (none), else a frozen on-device copy of the model's starting weights."""
    if ref_model is model:
        raise ValueError(
            "ref_model is the model being trained; pass a separate frozen copy, or leave ref_model=None to use "
            "the model with its LoRA adapters off, a frozen copy of its weights, or precomputed log-probs."
        )
    if ref_model is not None and ref_model.mesh != model.mesh:
        raise ValueError("ref_model must be placed on the same device mesh as the model being trained.")
    if precompute:
        kind = "precomputed"
    elif ref_model is not None:
        kind = "ref_model"
    else:
        kind = "adapters_off" if has_lora(model) else "frozen_copy"
    if kind == "ref_model" and ref_model is not None:
        return kind, ref_model.variables
    if kind == "frozen_copy":
        logger.info(
            "%s reference: a frozen copy of the model's starting weights (%d parameters more in memory); give the "
            "model LoRA adapters or set precompute_ref_log_probs=True to avoid it.",
            who,
            model.num_params,
        )
        return kind, frozen_copy(model)
    logger.info("%s reference: %s.", who, kind.replace("_", " "))
    return kind, None


def reference_logps(
    model: Model,
    ref_model: Model | None,
    variables: ModelVariables,
    inputs: Mapping[str, jax.Array],
    ref_variables: ModelVariables | None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Per-row summed completion log-probs of ``inputs`` under the reference, without
    gradient: ``ref_model`` (or the policy's own architecture) at ``ref_variables`` when
    given, else the policy's ``variables`` with the LoRA adapters off; ``chunk_size``
    positions at a time when given (``TrainingConfig.loss_chunk_size``)."""
    if ref_variables is not None:
        apply_model, ref_vars = (ref_model or model), ref_variables
    else:
        apply_model, ref_vars = model, adapter_off(variables)
    token_logps, logit_means, _ = dpo_losses.token_logps(
        apply_model, jax.lax.stop_gradient(ref_vars), inputs, training=False, chunk_size=chunk_size
    )
    logps, _, _ = dpo_losses.sequence_sums(token_logps, logit_means, inputs["label_mask"])
    return jax.lax.stop_gradient(logps)


def precompute(
    loader: Dataloader,
    score: Callable[[dict[str, jax.Array]], Mapping[str, jax.Array]],
    prefixes: Sequence[str],
    chunk: int = 8,
) -> None:
    """Runs ``score`` (a jitted function of a ``[chunk, max_length]`` batch of the
    ``prefixes`` sequences, returning per-row arrays by name) over the loader's examples and
    stores each result in its example as a per-example field, so it reaches every batch."""
    if jax.process_count() > 1:
        # Each process holds a different number of examples, so per-process passes over
        # globally sharded weights would not line up; live references work everywhere.
        raise ValueError(
            "precompute_ref_log_probs runs on a single process only; with several processes use a live "
            "reference (ref_model, or LoRA adapters off)."
        )
    examples, length = loader.examples, loader.max_length
    names: list[str] = []
    for start in range(0, len(examples), chunk):
        rows = examples[start : start + chunk]
        padded = rows + [rows[0]] * (chunk - len(rows))
        batch = {}
        for prefix in prefixes:
            for name in ("token_ids", "labels", "label_mask"):
                key = f"{prefix}{name}"
                batch[key] = jnp.asarray(np.stack([np.pad(ex[key], (0, length - len(ex[key]))) for ex in padded]))
            batch[f"{prefix}padding_mask"] = jnp.asarray(
                np.stack([np.arange(length) < len(ex[f"{prefix}token_ids"]) for ex in padded])
            )
        results = jax.device_get(score(batch))
        names = list(results)
        for i, ex in enumerate(rows):
            for name, values in results.items():
                ex[name] = np.asarray(values[i], np.float32)
    loader.extras.update({name: np.zeros((), np.float32) for name in names})
