"""XPOTrainer: exploratory preference optimisation (TRL's ``XPOTrainer``) on Online DPO.

Each pair is one completion from the policy and one from the reference; the judge (or
the reward) ranks them, the DPO loss of ``loss_type`` learns from the pair, and the
exploration term ``alpha x log pi(reference completion)`` is minimised with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from kithara.models.model import ModelVariables
from kithara.objectives.online_configs import XPOConfig
from kithara.objectives.online_dpo import (
    Judgement,
    OnlineDPOTrainer,
    Pairs,
    online_dpo_losses,
    preference_metrics,
)
from kithara.objectives.rollouts import Prompt
from kithara.trainer.config import TrainingConfig


def xpo_losses(
    policy_Px2: jax.Array,
    ref_Px2: jax.Array,
    chosen_first_P: jax.Array,
    beta_P: jax.Array,
    alpha_P: jax.Array,
    loss_type: str,
) -> tuple[jax.Array, jax.Array]:
    """Per-pair ``(dpo, xpo)`` terms (the loss is their sum) from summed log-probs of
    ``[policy completion, reference completion]`` under the policy and the reference:
    TRL's ``dpo_losses`` on the ranked pair, and ``alpha x`` the policy's log-prob of the
    reference's completion."""
    dpo = online_dpo_losses(policy_Px2, ref_Px2, chosen_first_P, beta_P, loss_type)
    return dpo, alpha_P * policy_Px2[:, 1]


class XPOTrainer(OnlineDPOTrainer):
    """XPO (TRL's ``XPOTrainer`` arguments and metrics): ``OnlineDPOTrainer`` whose pairs
    are a policy completion against a reference completion, plus the exploration term
    weighted by ``args.alpha`` (an ``XPOConfig``).

    Takes ``OnlineDPOTrainer``'s arguments. Besides Online DPO's metrics it logs
    ``loss/dpo``, ``loss/xpo``, ``alpha``, ``val/model_contain_eos_token`` /
    ``val/ref_contain_eos_token``, with reward functions ``objective/model_scores`` /
    ``objective/ref_scores`` / ``objective/scores_margin``, and ``objective/win_rate``: the
    share of decided pairs in which the policy's completion beat the reference's.

    Example:
        >>> trainer = XPOTrainer(model, reward_funcs=exact, train_dataset=rows, processing_class=tokenizer,
        ...     args=XPOConfig(alpha=1e-4, max_new_tokens=16, max_length=64, max_steps=50))
    """

    config_class: type[TrainingConfig] = XPOConfig

    def sample_pairs(
        self, variables: ModelVariables, prompts: Sequence[Prompt], *, seed: int, epoch: int
    ) -> dict[str, Any]:
        """Row ``2g``: the policy's completion of prompt ``g``; row ``2g + 1``: the reference's."""
        policy = self.sample(variables, prompts, 1, seed=seed)
        ref_model, ref_variables = self.reference_sampler(variables)
        ref = self.sample_from(ref_model, ref_variables, prompts, seed=seed + (1 << 30))
        return {k: [x for ab in zip(policy[k], ref[k], strict=True) for x in ab] for k in policy}

    def pair_targets(
        self, verdict: Judgement, sample: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Online DPO's targets plus ``alpha``."""
        out, metrics = super().pair_targets(verdict, sample, epoch)
        alpha = cast(XPOConfig, self.args).alpha_at(epoch)
        out["alpha"] = np.full_like(out["beta"], alpha)
        return out, {**metrics, "alpha": alpha}

    def pair_metrics(self, verdict: Judgement, sample: Mapping[str, Any]) -> dict[str, float]:
        """Online DPO's, plus the policy's win rate over the reference and the per-side
        stop-token shares and scores (TRL's names)."""
        metrics = super().pair_metrics(verdict, sample)
        decided = ~np.isnan(verdict.first)
        stopped = np.asarray(sample["stopped"], np.float64)
        metrics["objective/win_rate"] = float(verdict.first[decided].mean()) if decided.any() else float("nan")
        metrics["val/model_contain_eos_token"] = float(stopped[0::2].mean())
        metrics["val/ref_contain_eos_token"] = float(stopped[1::2].mean())
        if verdict.rewards is not None:
            model, ref = verdict.rewards[0::2], verdict.rewards[1::2]
            metrics["objective/model_scores"] = float(np.nanmean(model))
            metrics["objective/ref_scores"] = float(np.nanmean(ref))
            metrics["objective/scores_margin"] = float(np.nanmean(model - ref))
        return metrics

    def pair_loss(self, pairs: Pairs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """DPO on the ranked pair plus ``alpha x`` the policy's log-prob of the reference's completion."""
        mask = pairs["completion_mask"]
        policy_Px2 = jnp.where(mask, pairs["logps"], 0.0).sum(-1)
        ref_Px2 = jnp.where(mask, pairs["ref_logps"], 0.0).sum(-1)
        beta_P, chosen_first_P = pairs["beta"][:, 0], pairs["chosen_first"][:, 0]
        dpo_P, xpo_P = xpo_losses(
            policy_Px2, ref_Px2, chosen_first_P, beta_P, pairs["alpha"][:, 0], self.args_online.loss_type
        )
        sums = preference_metrics(policy_Px2, ref_Px2, chosen_first_P, beta_P)
        sums["loss/dpo"], sums["loss/xpo"] = dpo_P, xpo_P
        sums["objective/kl"] = (policy_Px2 - ref_Px2).mean(-1)
        sums["objective/entropy"] = -policy_Px2.mean(-1)
        return dpo_P + xpo_P, sums
