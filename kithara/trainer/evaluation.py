"""Evaluation over a loader: loss sums accumulated on device, read once at the end."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.data.dataloader import Dataloader
from kithara.models.model import ModelVariables
from kithara.trainer.losses import LossOutput

EvalStep = Callable[[ModelVariables, dict[str, jax.Array]], LossOutput]


def evaluate_loader(
    eval_step: EvalStep,
    variables: ModelVariables,
    loader: Dataloader,
    mesh: Mesh,
    *,
    max_eval_samples: int | None,
    reports_perplexity: bool,
) -> dict[str, float]:
    """``loss`` (total over weight), ``perplexity`` when asked, and every other sum of the
    ``LossOutput`` over its weight, on at most ``max_eval_samples`` rows of ``loader``."""
    limit = max_eval_samples or math.inf
    totals: LossOutput | None = None
    for index, local in enumerate(loader.epoch(0)):
        if index * loader.global_batch_size >= limit:
            break
        local = mask_rows_past(local, index, loader, limit)
        out = eval_step(variables, sharding_lib.shard_batch(local, mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        raise ValueError("The eval loader produced no batches.")
    host = jax.device_get(totals)
    weight = max(float(host.weight), 1.0)
    loss = float(host.total) / weight
    metrics = {"loss": loss}
    if reports_perplexity:
        metrics["perplexity"] = math.exp(min(loss, 80.0))
    metrics.update({k: float(v) / weight for k, v in host.sums.items()})
    return metrics


def mask_rows_past(local: dict[str, np.ndarray], index: int, loader: Dataloader, limit: float) -> dict[str, np.ndarray]:
    """Zeroes the label mask of rows beyond ``limit`` (global row order by process)."""
    rows = loader.local_batch_size
    first_global = index * loader.global_batch_size
    global_rows = first_global + jax.process_index() + jax.process_count() * np.arange(rows)
    keep = global_rows < limit
    if keep.all():
        return local
    return {k: v & keep[:, None] if k.endswith("label_mask") else v for k, v in local.items()}
