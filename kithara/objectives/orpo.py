"""ORPOTrainer: odds-ratio preference optimisation, SFT and preference in one reference-free loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from kithara.models.model import ModelVariables
from kithara.objectives import ref_free_losses
from kithara.objectives.pairwise import PairwiseTrainer
from kithara.objectives.preference_configs import ORPOConfig
from kithara.trainer.losses import LossOutput


class ORPOTrainer(PairwiseTrainer):
    """Trains a ``Model`` on preference pairs with ORPO (Hong et al. 2024, TRL's
    ``trl.experimental.orpo.ORPOTrainer``): the NLL of the chosen rows plus ``beta`` times the
    odds-ratio loss ``-log sigmoid(log odds(chosen) - log odds(rejected))``, on per-token mean
    completion log-probs. No reference model: one forward pass per pair, no second copy of the
    weights, and it can start from a base model (no SFT stage first).

    As in TRL, the NLL is the mean cross-entropy per token of the chosen rows over the batch,
    prompt tokens included (every token after the first); the odds ratio covers the
    completions only. The loss of a batch is ``nll - mean(beta * log sigmoid(log_odds))``.

    Args:
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``.
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule. An ``ORPOConfig`` here is taken as ``args`` (TRL's order).
        train_dataset: a ``kithara.Dataloader`` over a ``PreferenceDataset`` (used as is), a
            ``PreferenceDataset``, or raw ``prompt`` / ``chosen`` / ``rejected`` rows (a path,
            glob, list of dicts or Hugging Face dataset), tokenized with the tokenizer.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        args: an ``ORPOConfig`` (``beta``, ``max_length``, ``learning_rate``, ...).
        train_dataloader / eval_dataloader: a ready ``kithara.Dataloader`` instead.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer for raw data
            (``tokenizer=`` too; loaded from ``model`` when that is a path).
        peft_config: LoRA adapters for a ``model`` given as a path.
        **fields: ``ORPOConfig`` fields, or the base ``Trainer``'s Kithara names (``steps``, ...).

    Metrics (per pair, TRL's names): ``rewards/chosen`` and ``rewards/rejected`` (``beta``
    times the mean log-probs), ``rewards/accuracies``, ``rewards/margins``, ``logps/*`` (the
    mean log-probs), ``logits/*``, ``nll_loss``, ``log_odds_ratio`` (the mean of
    ``log sigmoid(log_odds)``) and ``log_odds_chosen`` (the mean of ``log_odds``).

    Example:
        >>> trainer = kithara.ORPOTrainer(model, train_dataset="pairs.jsonl", processing_class=tokenizer,
        ...     args=kithara.ORPOConfig(beta=0.1, learning_rate=8e-6, max_length=1024, max_steps=1000))
        >>> trainer.train()
    """

    step_constants = (*PairwiseTrainer.step_constants, "beta")
    config_class = ORPOConfig

    def read_config(self, config: Any) -> None:
        self.beta = config.beta

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng, frozen
        forward, non_trainable = self.pair_forward(variables, batch)
        chosen, rejected = forward.mean_logps()
        odds_loss, log_odds = ref_free_losses.odds_ratio_loss(chosen, rejected, self.beta)
        nll = forward.chosen_nll(with_prompt=True)
        # The NLL is a mean over the batch's tokens; times the pair count it joins the per-pair sums.
        total = forward.total(odds_loss) + forward.count * nll
        sums = {
            **forward.metrics(self.beta * chosen, self.beta * rejected, chosen, rejected),
            "nll_loss": forward.count * nll,
            "log_odds_ratio": forward.total(ref_free_losses.ls(log_odds)),
            "log_odds_chosen": forward.total(log_odds),
        }
        return LossOutput(total=total, weight=forward.count, sums=sums), non_trainable
