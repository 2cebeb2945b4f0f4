"""RLOOTrainer: REINFORCE leave-one-out, as TRL 1.16's RLOOTrainer, on GRPO's rollouts.

The same rollouts as ``GRPOTrainer``; what changes is the learning signal: the KL to the
reference (first order, summed over the completion, from the sampling policy's log-probs)
is taken out of each sequence's reward, the baseline of a completion is the mean reward of
the other ``k - 1`` completions of its prompt, and the loss clips one importance ratio per
sequence (``rl_losses.rloo_policy_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import jax
import numpy as np

from kithara.objectives import rl_losses
from kithara.objectives.grpo import GRPOTrainer
from kithara.objectives.rl_configs import RLOOConfig
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput


class RLOOTrainer(GRPOTrainer):
    """Trains a causal ``KerasHubModel`` with RLOO (TRL's ``RLOOTrainer`` arguments).

    Takes ``GRPOTrainer``'s arguments with an ``RLOOConfig`` (``num_generations`` k,
    default 2; ``beta`` 0.05, the weight of the sequence KL subtracted from the reward;
    ``normalize_advantages``; ``reward_clip_range``). The rollout's log-probs under the
    sampling policy are always scored (the KL and the sequence ratio need them).

    Example:
        >>> trainer = kithara.RLOOTrainer(model, reward_funcs=exact, train_dataset=rows,
        ...     processing_class=tokenizer, args=kithara.RLOOConfig(num_generations=4, max_steps=100))
    """

    config_class: type[TrainingConfig] = RLOOConfig

    @property
    def scores_old_logps(self) -> bool:
        return True

    def learning_targets(
        self, rewards: np.ndarray, arrays: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Leave-one-out advantages of the KL-shaped, clipped rewards."""
        args = cast(RLOOConfig, self.args)
        mask = arrays["completion_mask"]
        shaped = rewards
        metrics: dict[str, float] = {}
        if args.beta != 0:
            kl = np.where(mask, scores["old_logps"] - scores["ref_logps"], 0.0).sum(-1)
            metrics["kl"] = float(kl.sum() / max(mask.sum(), 1))
        shaped = np.asarray(
            rl_losses.rloo_sequence_rewards(
                rewards,
                scores["old_logps"],
                scores.get("ref_logps", scores["old_logps"]),
                mask,
                beta=args.beta,
                reward_clip_range=args.reward_clip_range,
            )
        )
        adv = np.asarray(
            rl_losses.rloo_advantages(shaped, self.num_generations, normalize_advantages=args.normalize_advantages)
        )
        grouped = rewards.reshape(-1, self.num_generations)
        with np.errstate(invalid="ignore"):
            zero = np.isclose(np.nanstd(grouped, axis=1), 0.0)
        metrics.update({"frac_reward_zero_std": float(zero.mean()), "advantages/std": float(adv.std())})
        return {"advantages": adv.astype(np.float32)}, metrics

    def policy_loss(
        self, logps: jax.Array, old_logps: jax.Array, batch: Mapping[str, jax.Array], mask: jax.Array
    ) -> LossOutput:
        """One clipped importance ratio per sequence, mean over sequences."""
        args = cast(RLOOConfig, self.args)
        return rl_losses.rloo_policy_loss(
            logps,
            old_logps,
            batch["advantages"],
            mask,
            epsilon_low=args.epsilon,
            epsilon_high=cast(float, args.epsilon_high),
        )
