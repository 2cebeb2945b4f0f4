"""CPOTrainer: contrastive preference optimisation and its reference-free relatives, SimPO and
AlphaPO."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from kithara.models.model import ModelVariables
from kithara.objectives import ref_free_losses
from kithara.objectives.pairwise import PairwiseTrainer
from kithara.objectives.preference_configs import CPOConfig
from kithara.trainer.losses import LossOutput


class CPOTrainer(PairwiseTrainer):
    """Trains a ``Model`` on preference pairs with a reference-free pairwise loss (TRL's
    ``trl.experimental.cpo.CPOTrainer``): ``mean(loss(chosen, rejected)) + cpo_alpha * nll``,
    ``loss`` one of ``ref_free_losses.CPO_LOSSES`` on the policy's completion log-probs, ``nll``
    the mean cross-entropy per completion token of the chosen rows over the batch.

    - CPO (Xu et al. 2024): ``loss_type="sigmoid"`` (or ``"hinge"``, ``"ipo"``), ``cpo_alpha=1``.
    - SimPO (Meng et al. 2024): ``loss_type="simpo"``, ``cpo_alpha=0``: per-token mean
      log-probs and a target margin ``simpo_gamma``.
    - AlphaPO (Gupta et al. 2025): ``loss_type="alphapo"`` (SimPO with ``cpo_alpha=0``) and
      ``alpha`` reshaping the rewards to ``(1 - p^-alpha) / alpha``.

    ``sigmoid`` and ``hinge`` compare summed completion log-probs, ``ipo`` and ``simpo`` per-token
    means, as TRL does. No reference model: one forward pass per pair.

    Args:
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``.
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule. A ``CPOConfig`` here is taken as ``args`` (TRL's order).
        train_dataset: a ``kithara.Dataloader`` over a ``PreferenceDataset`` (used as is), a
            ``PreferenceDataset``, or raw ``prompt`` / ``chosen`` / ``rejected`` rows, tokenized
            with the tokenizer.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        args: a ``CPOConfig`` (``loss_type``, ``beta``, ``cpo_alpha``, ``simpo_gamma``, ``alpha``,
            ``label_smoothing``, ``max_length``, ...).
        train_dataloader / eval_dataloader: a ready ``kithara.Dataloader`` instead.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer for raw data
            (``tokenizer=`` too; loaded from ``model`` when that is a path).
        peft_config: LoRA adapters for a ``model`` given as a path.
        **fields: ``CPOConfig`` fields, or the base ``Trainer``'s Kithara names (``steps``, ...).

    Metrics (per pair, TRL's names): ``rewards/chosen``, ``rewards/rejected`` (``beta`` times the
    compared log-probs, AlphaPO-shaped when ``alpha != 0``), ``rewards/accuracies``,
    ``rewards/margins``, ``logps/*``, ``logits/*`` and ``nll_loss``.

    Example:
        >>> trainer = kithara.CPOTrainer(model, train_dataset="pairs.jsonl", processing_class=tokenizer,
        ...     args=kithara.CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5))  # SimPO
        >>> trainer.train()
    """

    step_constants = (
        *PairwiseTrainer.step_constants,
        "loss_type",
        "beta",
        "label_smoothing",
        "cpo_alpha",
        "simpo_gamma",
        "alpha",
    )
    config_class = CPOConfig

    def read_config(self, config: Any) -> None:
        self.loss_type, self.beta, self.label_smoothing = config.loss_type, config.beta, config.label_smoothing
        self.cpo_alpha, self.simpo_gamma, self.alpha = config.cpo_alpha, config.simpo_gamma, config.alpha

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng, frozen
        forward, non_trainable = self.pair_forward(variables, batch)
        if self.loss_type in ref_free_losses.AVERAGED_LOSSES:
            chosen, rejected = forward.mean_logps()
        else:
            chosen, rejected = forward.chosen, forward.rejected
        losses, chosen_rewards, rejected_rewards = ref_free_losses.cpo_loss(
            chosen, rejected, self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, alpha=self.alpha,
        )  # fmt: skip
        # The NLL is a mean over the batch's tokens; times the pair count it joins the per-pair sums.
        nll = forward.chosen_nll(with_prompt=False)
        total = forward.total(losses) + self.cpo_alpha * forward.count * nll
        sums = {
            **forward.metrics(chosen_rewards, rejected_rewards, chosen, rejected),
            "nll_loss": forward.count * nll,
        }
        return LossOutput(total=total, weight=forward.count, sums=sums), non_trainable
