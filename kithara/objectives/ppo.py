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

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.models.adapters import adapter_off
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.logprobs import chunked_token_logps
from kithara.models.model import Model, ModelVariables
from kithara.models.scalar_head import ScalarHeadModel
from kithara.objectives import rl_losses
from kithara.objectives.grpo import GRPOTrainer, Rollout
from kithara.objectives.rl_configs import PPOConfig, RolloutConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.state import TrainState
from kithara.trainer.trainer import Trainer

SIDES = ("policy", "value")
HEAD_PATH = "score/kernel"  # the value head's kernel (as ScalarHeadModel's), under "value/"


def _prefixed(tree: Mapping[str, Any], side: str) -> dict[str, Any]:
    return {f"{side}/{p}": v for p, v in tree.items()}


def _side_of(tree: Mapping[str, Any], side: str) -> dict[str, Any]:
    head = f"{side}/"
    return {p[len(head) :]: v for p, v in tree.items() if p.startswith(head)}


class PolicyAndValue(Model):
    """A causal policy and its value function as one ``Model`` for the Trainer's state.

    Variables are the policy's under ``"policy/"`` and the value function's under
    ``"value/"``: a separate ``ScalarHeadModel``'s variables, or, with ``value_model=None``,
    one trainable float32 ``[hidden, 1]`` kernel ``"value/score/kernel"`` applied to the
    policy's final hidden states (the backbone is shared). ``sample`` and
    ``generate_compilations`` are the policy's; ``forward`` gives log-probs, entropies and
    values from one call.

    Args:
        policy: the causal LM.
        value_model: a ``ScalarHeadModel`` on the policy's mesh, or None for a value head.
        head_init_std: std of the value head's normal initialisation; only without
            ``value_model``. Default 0: a zero head, so values start at 0 (the first
            advantages are the discounted scores, not noise) and the value loss leaves the
            shared backbone alone until the head has learnt something.
        seed: seed of that initialisation.

    Example:
        >>> both = PolicyAndValue(policy, ScalarHeadModel.from_causal_lm(policy))
        >>> logps, entropy, values, _ = both.forward(both.variables, batch, batch["labels"], training=False)
    """

    def __init__(
        self,
        policy: KerasHubModel,
        value_model: ScalarHeadModel | None = None,
        *,
        head_init_std: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(policy, KerasHubModel):
            raise TypeError(f"The policy must be a causal KerasHubModel, got {type(policy).__name__}.")
        if value_model is not None:
            if not isinstance(value_model, ScalarHeadModel):
                raise TypeError(
                    f"value_model must be a kithara.ScalarHeadModel (e.g. ScalarHeadModel.from_causal_lm(policy)) "
                    f"or None (a value head on the policy), got {type(value_model).__name__}."
                )
            if value_model.mesh != policy.mesh:
                raise ValueError("The value model must live on the policy's device mesh (same devices and axes).")
        self.policy = policy
        self.value_model = value_model
        self.head: jax.Array | None = None
        if value_model is None:
            hidden = int(policy.backbone.hidden_dim)
            std = 0.0 if head_init_std is None else float(head_init_std)
            if not math.isfinite(std) or std < 0:
                raise ValueError(f"head_init_std must be a finite number >= 0, got {head_init_std}.")
            init = (np.random.default_rng(seed).standard_normal((hidden, 1)) * std).astype(np.float32)
            self.head = jax.make_array_from_callback(init.shape, self.head_sharding, lambda index: init[index])

    @property
    def head_sharding(self) -> NamedSharding:
        return NamedSharding(self.policy.mesh, PartitionSpec())

    @property
    def backbone(self) -> Any:
        """The policy's keras-hub backbone (what precision checks read)."""
        return self.policy.backbone

    @property
    def mesh(self) -> Mesh:
        return self.policy.mesh

    def _value_variables(self) -> ModelVariables:
        if self.value_model is not None:
            return self.value_model.variables
        return ModelVariables({HEAD_PATH: self.head}, {})

    @property
    def variables(self) -> ModelVariables:
        parts = {"policy": self.policy.variables, "value": self._value_variables()}
        return ModelVariables(
            {k: v for s in SIDES for k, v in _prefixed(parts[s].trainable, s).items()},
            {k: v for s in SIDES for k, v in _prefixed(parts[s].non_trainable, s).items()},
        )

    @variables.setter
    def variables(self, values: ModelVariables) -> None:
        self.policy.variables = self.side_variables(values, "policy")
        value = self.side_variables(values, "value")
        if self.value_model is not None:
            self.value_model.variables = value
        else:
            self.head = value.trainable[HEAD_PATH]

    @property
    def variable_shardings(self) -> ModelVariables:
        value = (
            self.value_model.variable_shardings
            if self.value_model is not None
            else ModelVariables({HEAD_PATH: self.head_sharding}, {})
        )
        parts = {"policy": self.policy.variable_shardings, "value": value}
        return ModelVariables(
            {k: v for s in SIDES for k, v in _prefixed(parts[s].trainable, s).items()},
            {k: v for s in SIDES for k, v in _prefixed(parts[s].non_trainable, s).items()},
        )

    def side_variables(self, variables: ModelVariables, side: str) -> ModelVariables:
        """``side``'s (``"policy"`` or ``"value"``) variables, under their own paths, no copies."""
        return ModelVariables(_side_of(variables.trainable, side), _side_of(variables.non_trainable, side))

    def forward(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """Pure: ``(logps_BxL, entropy_BxL, values_BxL, new_non_trainable)``; ``values_BxL``
        (float32) at position ``i`` is the value of the state predicting ``labels_BxL[:, i]``
        (aligned like the log-probs, TRL's convention). The backbone runs once with a value
        head, once per model with a value model."""
        policy_vars = self.side_variables(variables, "policy")
        hidden, policy_nt = self.policy.hidden_states(policy_vars, inputs, training=training)
        logps, entropy = chunked_token_logps(
            hidden, lambda h: self.policy.lm_head(policy_vars, h), labels_BxL, chunk_size
        )
        value_vars = self.side_variables(variables, "value")
        if self.value_model is None:
            kernel = value_vars.trainable[HEAD_PATH].astype(jnp.float32)
            values = (hidden.astype(jnp.float32) @ kernel)[..., 0]
            value_nt: dict[str, jax.Array] = {}
        else:
            scores, value_nt = self.value_model.apply(value_vars, inputs, training=training)
            values = scores[..., 0].astype(jnp.float32)
        return logps, entropy, values, {**_prefixed(policy_nt, "policy"), **_prefixed(value_nt, "value")}

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The policy's logits (the value side's non-trainable variables unchanged)."""
        logits, policy_nt = self.policy.apply(self.side_variables(variables, "policy"), inputs, training=training)
        value_nt = {k: v for k, v in variables.non_trainable.items() if k.startswith("value/")}
        return logits, {**_prefixed(policy_nt, "policy"), **value_nt}

    def token_logps(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """The policy's ``token_logps`` on its share of ``variables``."""
        logps, entropy, values, nt = self.forward(
            variables, inputs, labels_BxL, training=training, chunk_size=chunk_size
        )
        del values
        return logps, entropy, nt

    def sample(
        self,
        token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        variables: ModelVariables | None = None,
        **kw: Any,
    ) -> tuple[list[list[int]], list[bool]]:
        """The policy's ``sample`` with its share of ``variables``."""
        policy_vars = None if variables is None else self.side_variables(variables, "policy")
        return self.policy.sample(token_ids, max_new_tokens, variables=policy_vars, **kw)

    @property
    def generate_compilations(self) -> int:
        return self.policy.generate_compilations

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        flops = self.policy.flops_per_token(sequence_length, training=training)
        if self.value_model is not None:
            flops += self.value_model.flops_per_token(sequence_length, training=training)
        return flops


class _TrainsPolicyAndValue(Trainer):
    """Sits between ``GRPOTrainer`` and ``Trainer`` in ``PPOTrainer``'s MRO: hands the base
    ``Trainer`` the policy joined with its value function (``PPOTrainer.join_value``) in
    place of the policy alone that ``GRPOTrainer.__init__`` passes on."""

    def __init__(self, model: Model, *args: Any, **kwargs: Any) -> None:
        join = cast("PPOTrainer", self).join_value
        super().__init__(join(cast(KerasHubModel, model), kwargs["args"]), *args, **kwargs)


class PPOTrainer(GRPOTrainer, _TrainsPolicyAndValue):
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
        if value_model is not None and not isinstance(value_model, ScalarHeadModel):
            raise TypeError(
                f"value_model must be a kithara.ScalarHeadModel or None (a value head on the policy), got "
                f"{type(value_model).__name__}."
            )
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

    def join_value(self, policy: KerasHubModel, config: RolloutConfig) -> PolicyAndValue:
        """The model the Trainer trains: ``policy`` with ``value_model``, or with a fresh
        value head (seeded with ``config.seed``)."""
        return PolicyAndValue(policy, self.value_model, seed=config.seed)

    @property
    def scores_old_logps(self) -> bool:
        return True

    @property
    def policy(self) -> KerasHubModel:
        """The policy (its variables are the ``"policy/..."`` ones of the train state)."""
        return cast(PolicyAndValue, self.model).policy

    # Scoring and learning targets -------------------------------------------------------

    def score_batch(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> dict[str, jax.Array]:
        """The sampling policy's log-probs (``old_logps``) and values (``values``), and the
        reference's log-probs (``ref_logps``) when ``kl_coef > 0``; ``[rows, L]`` float32."""
        model = cast(PolicyAndValue, self.model)
        chunk = cast(PPOConfig, self.args).logprob_chunk_size
        logps, _, values, _ = model.forward(variables, batch, batch["labels"], training=False, chunk_size=chunk)
        out = {"old_logps": logps, "values": values}
        if self.reference != "none":
            own = model.side_variables(variables, "policy")
            ref = frozen if self.reference == "frozen_copy" else adapter_off(own)
            out["ref_logps"] = model.policy.token_logps(ref, batch, batch["labels"], training=False, chunk_size=chunk)[
                0
            ]
        return jax.tree.map(jax.lax.stop_gradient, out)

    def advantages(
        self, rewards: np.ndarray, arrays: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, float]]:
        """PPO's learning targets, ``[rows, L, 2]``: whitened GAE advantages ``[..., 0]``
        and returns ``[..., 1]`` (``make_rollout`` splits them), with TRL's ``objective/*``
        metrics. Per-token rewards are ``-kl_coef * kl`` plus the score at the last
        completion token (TRL's)."""
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
        targets = np.stack([np.asarray(adv), np.asarray(returns)], axis=-1).astype(np.float32)
        mean_non_score = float(non_score.sum(1).mean())
        metrics = {
            "objective/kl": float(kl.sum(1).mean()),
            "objective/entropy": float(np.where(mask_np, -np.asarray(old), 0.0).sum(1).mean()),
            "objective/non_score_reward": mean_non_score,
            "objective/rlhf_reward": mean_non_score + float(score.mean()),
            "objective/scores": float(score.mean()),
        }
        return targets, metrics

    def make_rollout(self, state: TrainState, index: int, prompt_indices: Sequence[int]) -> Rollout:
        """GRPO's rollout, its ``advantages`` array split into per-token ``advantages`` and
        ``returns``."""
        rollout = super().make_rollout(state, index, prompt_indices)
        targets = rollout.arrays.pop("advantages")
        rollout.arrays["advantages"], rollout.arrays["returns"] = targets[..., 0], targets[..., 1]
        return rollout

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

    def policy_loss(
        self, logps: jax.Array, old_logps: jax.Array, batch: Mapping[str, jax.Array], mask: jax.Array
    ) -> LossOutput:
        """PPO's clipped surrogate on per-token advantages (the value loss is in ``compute_loss``)."""
        return rl_losses.ppo_policy_loss(
            logps, old_logps, batch["advantages"], mask, cliprange=cast(PPOConfig, self.args).cliprange
        )
