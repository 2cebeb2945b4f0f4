"""PPOTrainer: PPO with a learned value function, as TRL's (experimental) ``PPOTrainer``, on
GRPO's rollouts.

A rollout is sampled and rewarded as ``GRPOTrainer`` does; then it is scored once under the
sampling policy (log-probs and values) and the reference (log-probs). Per-token rewards are
``-kl_coef * kl`` with the score (the weighted total reward, less ``missing_eos_penalty`` for
completions without a stop token) added at the last completion token; GAE gives advantages
(whitened over the rollout) and returns. Each of ``num_ppo_epochs`` passes over the rollout
makes ``num_mini_batches`` updates on the clipped policy loss plus ``vf_coef`` times the
clipped value loss.

The value function is a separate ``ScalarHeadModel`` (``value_model=``) or a ``[hidden, 1]``
head on the policy's own hidden states. Either way ``PolicyAndValue`` makes policy and value
one ``Model`` (variables ``"policy/..."`` and ``"value/..."``) so both are in the one train
state: one optimizer, one checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import Model, ModelVariables
from kithara.models.scalar_head import ScalarHeadModel
from kithara.objectives import rl_losses
from kithara.objectives.grpo import GRPOTrainer
from kithara.objectives.policy_value import PolicyAndValue
from kithara.objectives.rl_configs import PPOConfig, RolloutConfig
from kithara.trainer.losses import LossOutput


class PPOTrainer(GRPOTrainer):
    """Trains a causal ``KerasHubModel`` and a value function with PPO (TRL's experimental
    ``PPOTrainer``: k1/k3 KL in the per-token reward, GAE, whitened advantages, clipped
    policy and value losses, its metric names).

    Args:
        model: the policy, a ``KerasHubModel`` or a model directory (with ``peft_config``).
        reward_funcs: as ``GRPOTrainer``'s (functions or reward models, e.g. a
            ``ScalarHeadModel``); the score of a completion is their weighted sum.
        args: a ``PPOConfig``.
        value_model: a ``ScalarHeadModel`` on the policy's mesh (trained: e.g.
            ``ScalarHeadModel.from_causal_lm(policy)`` or a reward model), or None: a
            ``[hidden, 1]`` value head on the policy's hidden states (shared backbone).
        train_dataset / eval_dataset / processing_class / reward_processing_classes /
        optimizer / peft_config / callbacks / checkpointer / profiler / **fields: as
            ``GRPOTrainer``'s. The optimizer updates policy and value variables together;
            both are in the checkpointed state (``"policy/..."``, ``"value/..."``).

    With ``kl_coef > 0`` the reference is the policy with its LoRA adapters off, or a
    frozen copy of its starting weights. A step is one optimizer update; a rollout feeds
    ``num_mini_batches x num_ppo_epochs`` of them (in order, mini-batches not reshuffled).

    Example:
        >>> trainer = kithara.PPOTrainer(policy, reward_funcs=reward_model, train_dataset=rows,
        ...     processing_class=tokenizer, value_model=kithara.ScalarHeadModel.from_causal_lm(policy),
        ...     args=kithara.PPOConfig(num_ppo_epochs=4, kl_coef=0.05, max_steps=200))
        >>> trainer.train()
    """

    config_class = PPOConfig

    def __init__(
        self,
        model: Model | str,
        reward_funcs: Any,
        args: RolloutConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        *,
        value_model: ScalarHeadModel | None = None,
        optimizer: optax.GradientTransformation | None = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        self.value_model = value_model
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            reward_processing_classes,
            optimizer=optimizer,
            tokenizer=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            checkpointer=checkpointer,
            profiler=profiler,
            **fields,
        )

    def trained_model(self, policy: KerasHubModel, config: RolloutConfig) -> Model:
        """``policy`` joined with ``value_model``, or with a fresh value head (seeded with
        ``config.seed``)."""
        return PolicyAndValue(policy, self.value_model, seed=config.seed)

    @property
    def scores_old_logps(self) -> bool:
        return True

    @property
    def policy(self) -> KerasHubModel:
        """The policy (its variables are the ``"policy/..."`` ones of the train state)."""
        return cast(PolicyAndValue, self.model).policy

    def policy_variables(self, variables: ModelVariables) -> ModelVariables:
        return cast(PolicyAndValue, self.model).side_variables(variables, "policy")

    # Scoring and learning targets -------------------------------------------------------

    def score_batch(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> dict[str, jax.Array]:
        """The sampling policy's log-probs (``old_logps``) and values (``values``), and the
        reference's log-probs (``ref_logps``) when ``kl_coef > 0``; ``[rows, L]`` float32."""
        model = cast(PolicyAndValue, self.model)
        chunk = self.args_rl.logprob_chunk_size
        logps, _, values, _ = model.forward(variables, batch, batch["labels"], training=False, chunk_size=chunk)
        out = {"old_logps": logps, "values": values}
        if self.reference != "none":
            out["ref_logps"] = self.reference_logps(self.policy_variables(variables), batch, frozen)
        return jax.tree.map(jax.lax.stop_gradient, out)

    def learning_targets(
        self, rewards: np.ndarray, arrays: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """PPO's learning targets, ``[rows, L]`` float32: whitened GAE ``advantages`` and
        ``returns``, with TRL's ``objective/*`` metrics. Per-token rewards are
        ``-kl_coef * kl`` plus the score at the last completion token (TRL's)."""
        args = cast(PPOConfig, self.args)
        mask_np = np.asarray(arrays["completion_mask"]).astype(bool)
        mask = jnp.asarray(mask_np)
        rows = mask_np.shape[0]
        ends = np.asarray(arrays["padding_mask"]).astype(bool).sum(1)  # prompt + completion tokens
        last = np.maximum(ends - 2, 0)  # label position of each row's last completion token
        score = np.nan_to_num(np.asarray(rewards, np.float64))
        if args.missing_eos_penalty is not None:
            final = arrays["token_ids"][np.arange(rows), np.maximum(ends - 1, 0)]
            score = score - args.missing_eos_penalty * ~np.isin(final, self.stop_token_ids)
        score = score.astype(np.float32)
        old = jnp.asarray(scores["old_logps"])
        if args.kl_coef > 0:
            per_token = rl_losses.per_token_kl_penalty(old, jnp.asarray(scores["ref_logps"]), args.kl_estimator)
            kl = np.where(mask_np, np.asarray(per_token), 0.0).astype(np.float32)
        else:
            kl = np.zeros(mask_np.shape, np.float32)
        non_score = (-args.kl_coef * kl).astype(np.float32)
        token_rewards = non_score.copy()
        token_rewards[np.arange(rows), last] += score
        rewards_t = jnp.asarray(token_rewards)
        enough = mask_np.sum() >= 2  # whitening needs two valid tokens
        if args.whiten_rewards and enough:
            rewards_t = rl_losses.whiten(rewards_t, mask, shift_mean=False)
        adv, returns = rl_losses.gae(rewards_t, jnp.asarray(scores["values"]), mask, gamma=args.gamma, lam=args.lam)
        adv = rl_losses.whiten(adv, mask) if enough else jnp.zeros_like(adv)
        targets = {"advantages": np.asarray(adv, np.float32), "returns": np.asarray(returns, np.float32)}
        mean_non_score = float(non_score.sum(1).mean())
        metrics = {
            "objective/kl": float(kl.sum(1).mean()),
            "objective/entropy": float(np.where(mask_np, -np.asarray(old), 0.0).sum(1).mean()),
            "objective/non_score_reward": mean_non_score,
            "objective/rlhf_reward": mean_non_score + float(score.mean()),
            "objective/scores": float(score.mean()),
        }
        return targets, metrics

    # The loss ---------------------------------------------------------------------------

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """Clipped policy loss plus ``vf_coef`` times the clipped value loss, token means
        over the completion tokens, and TRL's ``policy/*``, ``loss/*``, ``val/*`` metrics."""
        del rng, frozen
        args = cast(PPOConfig, self.args)
        model = cast(PolicyAndValue, self.model)
        logps, entropy, values, non_trainable = model.forward(
            variables, batch, batch["labels"], training=True, chunk_size=args.logprob_chunk_size
        )
        mask = batch["completion_mask"].astype(bool)
        pg = rl_losses.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, cliprange=args.cliprange)
        vf = rl_losses.ppo_value_loss(
            values,
            batch["values"],
            batch["returns"],
            mask,
            cliprange_value=args.cliprange_value,
            vf_coef=args.vf_coef,
        )
        sg = jax.lax.stop_gradient
        sums = {
            **pg.sums,
            "loss/policy_avg": sg(pg.total),
            "loss/value_avg": vf.sums["value/loss_avg"],
            "val/clipfrac_avg": vf.sums["value/clipfrac_avg"],
            "policy/entropy_avg": sg(jnp.where(mask, entropy, 0.0).sum()),
            "val/vpred": sg(jnp.where(mask, values, 0.0).sum()),
        }
        return LossOutput(total=pg.total + vf.total, weight=pg.weight, sums=sums), non_trainable
