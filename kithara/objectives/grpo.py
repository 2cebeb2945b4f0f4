"""GRPOTrainer: group relative policy optimisation (and its loss family) on the base Trainer.

One rollout: ``num_generations`` completions of each prompt sampled with the jitted KV-cache
decoder on the training mesh, rewarded, turned into group-relative advantages, scored once
(old and reference log-probs) and kept; then ``num_iterations`` passes of optimizer updates
over it, each through the base class's one jitted train step. ``RLOOTrainer`` changes the
advantages and the loss; ``PPOTrainer`` adds a value model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.callbacks.sync_ref import SyncRefModelCallback
from kithara.models.adapters import adapter_off, frozen_copy, has_lora
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import Model, ModelVariables
from kithara.objectives import rl_losses, rollouts
from kithara.objectives.inputs import as_source, lora_config, resolve_model
from kithara.objectives.rl_configs import GRPOConfig, RolloutConfig
from kithara.objectives.rollouts import Rollout
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.state import TrainState
from kithara.trainer.trainer import DataPlan, Trainer

logger = logging.getLogger(__name__)
EVAL_SEED = 2**31 - 1  # evaluation samples with its own key, apart from every rollout's


class GRPOTrainer(Trainer):
    """Trains a causal ``KerasHubModel`` on prompts with rewards, the GRPO way (TRL's
    ``GRPOTrainer`` arguments and metrics).

    Args:
        model: a ``KerasHubModel`` or a model directory (loaded with ``peft_config``).
        reward_funcs: one reward or a list: Python callables ``f(prompts, completions,
            completion_ids, trainer_state, **columns) -> list[float | None]`` (None: not
            applicable to that row; every other dataset column comes by name), or
            sequence-scoring models (``kithara.ScalarHeadModel``: scored on the chat
            template or the joined text, with ``reward_processing_classes`` or the policy's
            tokenizer). Weighted by ``args.reward_weights`` and summed.
        args: a ``GRPOConfig`` (TRL's names: ``num_generations``, ``max_completion_length``,
            ``loss_type``, ``beta``, ``epsilon`` / ``epsilon_high``, ``num_iterations``, ...).
        train_dataset: rows with a ``prompt`` (text or chat messages) or chat ``messages``;
            a path, glob, list of dicts or Hugging Face dataset.
        eval_dataset: rows like ``train_dataset``; ``evaluate()`` samples
            ``num_generations_eval`` completions per prompt and reports their rewards.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer (``tokenizer=``
            too; loaded from ``model`` when that is a path).
        reward_processing_classes: tokenizers of the reward models, in the order of those
            models in ``reward_funcs`` (default: the policy's).
        optimizer: an optax transformation; default: ``args``'s AdamW and schedule.
        peft_config: LoRA adapters for a ``model`` given as a path.
        callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``GRPOConfig`` fields, or the base ``Trainer``'s Kithara names.

    A step is one optimizer update: a rollout of ``generation_batch_size`` completions feeds
    ``generation_batch_size / (per_device_train_batch_size x batch shards x
    gradient_accumulation_steps)`` updates, ``num_iterations`` times over. With ``beta > 0``
    the reference is the model with its LoRA adapters off, or a frozen copy of its starting
    weights.

    Example:
        >>> def exact(prompts, completions, answer, **_):
        ...     return [float(c.strip() == a) for c, a in zip(completions, answer)]
        >>> trainer = kithara.GRPOTrainer(model, reward_funcs=exact, train_dataset=rows,
        ...     processing_class=tokenizer, args=kithara.GRPOConfig(num_generations=8, max_steps=100))
        >>> trainer.train()
    """

    reports_perplexity = False
    step_constants = (*Trainer.step_constants, "reference", "need_old_logps")
    config_class: type[TrainingConfig] = GRPOConfig

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
        optimizer: optax.GradientTransformation | None = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        config = cast(RolloutConfig, self.resolve_config(args, **fields))
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        policy, tok = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )
        if not isinstance(policy, KerasHubModel):
            raise TypeError(f"{type(self).__name__} trains a causal KerasHubModel, got {type(policy).__name__}.")
        if tok is None:
            raise ValueError(f"{type(self).__name__} needs processing_class= (a tokenizer) to read prompts.")
        self.tokenizer = tok
        self.reward_funcs = rollouts.reward_functions(
            reward_funcs,
            reward_processing_classes,
            tok,
            sharding=policy.strategy,
            precision=config.precision or policy.backbone.dtype_policy.name,
        )
        self.reward_names = [rollouts.reward_name(f) for f in self.reward_funcs]
        weights = config.reward_weights or (1.0,) * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions."
            )
        self.reward_weights = np.asarray(weights, np.float64)
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs train_dataset: rows with a 'prompt' or 'messages'.")
        self.train_source = as_source(train_dataset, "train_dataset")
        self.eval_source = None if eval_dataset is None else as_source(eval_dataset, "eval_dataset")
        self.stop_token_ids = list(config.stop_token_ids or [tok.eos_id])
        self.rows_per_rollout, self.updates_per_generation = config.rollout_sizes(
            sharding_lib.batch_shards(policy.mesh)
        )
        self.num_generations = config.num_generations
        self.prompts_per_rollout = self.rows_per_rollout // config.num_generations
        self.updates_per_rollout = self.updates_per_generation * config.num_iterations
        self.rows_per_update = self.rows_per_rollout // self.updates_per_generation
        self.rollouts_per_epoch = len(self.train_source) // self.prompts_per_rollout
        if self.rollouts_per_epoch == 0:
            raise ValueError(
                f"train_dataset has {len(self.train_source)} prompts; one rollout takes {self.prompts_per_rollout} "
                f"({self.rows_per_rollout} completions / num_generations {config.num_generations})."
            )
        self.row_length = config.max_prompt_length + config.max_completion_length
        self.need_old_logps = self.updates_per_rollout > 1 or self.scores_old_logps
        self.reference, self._reference_variables = self.select_reference(policy, config)
        self.rollout: Rollout | None = None
        super().__init__(
            self.trained_model(policy, config),
            optimizer,
            profiler=profiler,
            checkpointer=checkpointer,
            callbacks=callbacks,
            args=config,
        )
        if config.sync_ref_model:  # TR-DPO's reference sync, as TRL's GRPO / RLOO offer it
            self.add_callback(
                SyncRefModelCallback(
                    self, config.ref_model_mixup_alpha, config.ref_model_sync_steps, ref_model=self.reference_model
                )
            )

    @property
    def reference_model(self) -> Model | None:
        """The separate reference model whose variables are the frozen ones, if any (none
        here: the reference is a frozen copy or the adapters off; ``OnlineDPOTrainer``'s
        ``ref_model``)."""
        return None

    @property
    def args_rl(self) -> RolloutConfig:
        """``args``, typed as the rollout config it is."""
        return cast(RolloutConfig, self.args)

    def trained_model(self, policy: KerasHubModel, config: RolloutConfig) -> Model:
        """The model whose variables the train state holds (called once, in ``__init__``,
        with the resolved config): the policy; PPO joins its value function to it."""
        return policy

    @property
    def policy(self) -> KerasHubModel:
        """The causal LM that samples and is scored."""
        return cast(KerasHubModel, self.model)

    def policy_variables(self, variables: ModelVariables) -> ModelVariables:
        """The policy's own variables among the trained ``variables`` (all of them here)."""
        return variables

    @property
    def scores_old_logps(self) -> bool:
        """Whether rollouts are always scored under the sampling policy (not only when
        several updates reuse them): subclasses whose advantages need those log-probs."""
        return False

    # Set-up -----------------------------------------------------------------------------

    def select_reference(self, policy: KerasHubModel, config: RolloutConfig) -> tuple[str, ModelVariables | None]:
        """The KL reference (called once, in ``__init__``): ``(kind, frozen variables)``, the
        kind one of ``"none"`` (``beta == 0``), ``"adapters_off"`` (LoRA) or ``"frozen_copy"``
        (a copy of the starting weights, returned to pass to the steps). Objectives with
        another reference (``OnlineDPOTrainer``'s ``ref_model``) override it."""
        if config.beta == 0:
            return "none", None
        if has_lora(policy):
            logger.info("KL reference: the model with its LoRA adapters off.")
            return "adapters_off", None
        logger.info(
            "KL reference: a frozen copy of the starting weights (%d parameters more in memory); give the model "
            "LoRA adapters, or beta=0, to avoid it.",
            policy.num_params,
        )
        return "frozen_copy", frozen_copy(policy)

    # The objective contract -------------------------------------------------------------

    def frozen_variables(self) -> ModelVariables | None:
        """The reference weights (a frozen copy), or None (adapters off, or no KL)."""
        return self._reference_variables

    def data_plan(self) -> DataPlan:
        """An epoch: every whole rollout of prompts once, ``updates_per_rollout`` steps each."""
        return DataPlan(
            self.rollouts_per_epoch * self.updates_per_rollout,
            self.rows_per_update,
            self.row_length,
            has_eval=self.eval_source is not None,
        )

    def batches(self, start_step: int, data_state: dict[str, Any] | None) -> Iterator[tuple[int, Any]]:
        """``(epoch, (rollout index, update index, prompt rows))`` for every step from
        ``start_step``: prompts in a fresh seeded order per epoch, so the position follows
        from the step; a checkpoint taken inside a rollout carries the rollout itself."""
        if data_state and "rollout" in data_state:
            self.rollout = Rollout.decode(data_state["rollout"])
        for step in range(start_step, 2**62):
            index, update = divmod(step, self.updates_per_rollout)
            epoch, position = divmod(index, self.rollouts_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_source))
            size = self.prompts_per_rollout
            yield epoch, (index, update, order[position * size : (position + 1) * size])

    def data_state(self) -> dict[str, Any]:
        """The current rollout when updates on it remain (resuming needs it: the policy
        that sampled it is gone); else nothing, the position being a function of the step."""
        if self.rollout is None or self.rollout.updates_done >= self.updates_per_rollout:
            return {}
        return {"rollout": self.rollout.encode()}

    def host_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        """Samples and scores a rollout when a new one starts, then one update on its share."""
        index, update, prompt_indices = batch
        if self.rollout is None or self.rollout.index != index:
            started = time.perf_counter()
            self.rollout = self.make_rollout(state, index, prompt_indices)
            self.rollout.metrics["time/rollout"] = time.perf_counter() - started
        self.rollout.updates_done = update + 1
        chunk = update % self.updates_per_generation
        rows, k = self.rows_per_update, self.gradient_accumulation_steps
        part = {
            name: a[chunk * rows : (chunk + 1) * rows].reshape(k, rows // k, *a.shape[1:])
            for name, a in self.rollout.arrays.items()
        }
        state, metrics = self.jitted_train_step(
            state, sharding_lib.global_arrays(part, self.model.mesh, leading_dims=1)
        )
        return state, {**metrics, **self.rollout.metrics}

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The policy loss of ``args.loss_type`` on one micro-batch of rollout rows, plus
        the mean token entropy."""
        del rng
        logps, entropy, non_trainable = self.model.token_logps(
            variables, batch, batch["labels"], training=True, chunk_size=self.args_rl.logprob_chunk_size
        )
        mask = batch["completion_mask"]
        old = batch["old_logps"] if self.need_old_logps else jax.lax.stop_gradient(logps)
        out = self.policy_loss(logps, old, batch, mask)
        entropy_mean = jnp.where(mask, entropy, 0.0).sum() / jnp.maximum(mask.sum(), 1)
        out.sums["entropy"] = entropy_mean * out.weight
        return out, non_trainable

    def policy_loss(
        self, logps: jax.Array, old_logps: jax.Array, batch: Mapping[str, jax.Array], mask: jax.Array
    ) -> LossOutput:
        """GRPO's clipped surrogate of ``args.loss_type`` (``RLOOTrainer`` overrides it)."""
        args = cast(GRPOConfig, self.args)
        return rl_losses.policy_loss(
            logps,
            old_logps,
            batch["advantages"],
            mask,
            loss_type=args.loss_type,
            epsilon_low=args.epsilon,
            epsilon_high=cast(float, args.epsilon_high),
            importance_sampling_level=args.importance_sampling_level,
            delta=args.delta,
            beta=args.beta,
            ref_logps_BxT=batch.get("ref_logps"),
            use_bias_correction_kl=args.use_bias_correction_kl,
            max_completion_length=args.max_completion_length,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
        )

    def score_batch(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> dict[str, jax.Array]:
        """Per-token log-probs of the rollout's completions under the sampling policy
        (``old_logps``, when updates reuse the rollout) and the reference (``ref_logps``)."""
        out = {}
        if self.need_old_logps:
            out["old_logps"] = self.policy_logps(self.policy_variables(variables), batch)
        if self.reference != "none":
            out["ref_logps"] = self.reference_logps(self.policy_variables(variables), batch, frozen)
        return jax.tree.map(jax.lax.stop_gradient, out)

    def policy_logps(self, policy_variables: ModelVariables, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Per-token log-probs of ``batch``'s labels under the policy, without dropout."""
        chunk = self.args_rl.logprob_chunk_size
        return self.policy.token_logps(policy_variables, batch, batch["labels"], training=False, chunk_size=chunk)[0]

    def reference_logps(
        self, policy_variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> jax.Array:
        """Per-token log-probs under the reference: the frozen copy (``frozen``), or the
        policy's ``policy_variables`` with the LoRA adapters off."""
        reference = frozen if self.reference == "frozen_copy" else adapter_off(policy_variables)
        return self.policy_logps(reference, batch)

    def eval_metrics(self, variables: ModelVariables) -> dict[str, float]:
        """Rewards of ``num_generations_eval`` completions of each eval prompt (at most
        ``max_eval_samples`` prompts) and their lengths, TRL's names."""
        if self.eval_source is None:
            raise ValueError("evaluate() needs eval_dataset.")
        count = min(len(self.eval_source), self.max_eval_samples or len(self.eval_source))
        k = self.args_rl.num_generations_eval or 1
        prompts = rollouts.read_prompts(self.eval_source, range(count), self.tokenizer, self.args_rl.max_prompt_length)
        sample = self.sample(variables, prompts, k, seed=EVAL_SEED)
        rewards_per_func = self.rewards(sample)
        rewards = rollouts.total_reward(rewards_per_func, self.reward_weights)
        out = rollouts.reward_stats(self.reward_names, rewards_per_func, rewards, k)
        out.update(rollouts.completion_stats([len(c) for c in sample["completion_ids"]], sample["stopped"]))
        return out

    # Rollouts ---------------------------------------------------------------------------

    def sample(
        self, variables: ModelVariables, prompts: Sequence[rollouts.Prompt], k: int, *, seed: int
    ) -> dict[str, Any]:
        """``k`` completions of each prompt (group-contiguous) sampled with ``variables``:
        prompt rows, completion ids (ending with the stop token when one was sampled),
        whether each stopped, and completions as reward functions see them."""
        args = self.args_rl
        prompt_rows = [p for p in prompts for _ in range(k)]
        ids, stopped = self.policy.sample(
            [p.ids for p in prompt_rows],
            args.max_completion_length,
            variables=self.policy_variables(variables),
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            min_p=args.min_p,
            stop_token_ids=self.stop_token_ids,
            seed=jax.random.fold_in(jax.random.key(self.seed), seed),
        )
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]
        completions: list[Any] = [
            [{"role": "assistant", "content": t}] if p.conversational else t
            for p, t in zip(prompt_rows, texts, strict=True)
        ]
        return {"prompts": prompt_rows, "completion_ids": ids, "stopped": stopped, "completions": completions}

    def rewards(self, sample: Mapping[str, Any]) -> np.ndarray:
        """``[rows, functions]`` rewards of a sample (NaN: not applicable)."""
        return rollouts.score_rewards(
            self.reward_funcs, sample["prompts"], sample["completions"], sample["completion_ids"], self.state
        )

    def learning_targets(
        self, rewards: np.ndarray, arrays: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """What the loss learns from, as float32 arrays to add to the rollout's rows, from
        the rollout's total rewards (its training ``arrays`` and ``scores`` at hand), and
        their metrics: here per-row ``advantages``, group-relative, scaled by
        ``scale_rewards``."""
        del arrays, scores
        args = cast(GRPOConfig, self.args)
        scaled, _, zero = rl_losses.group_advantages(rewards, self.num_generations, args.scale_rewards)
        adv = np.nan_to_num(np.asarray(scaled, np.float32))
        return {"advantages": adv}, {
            "frac_reward_zero_std": float(np.mean(np.asarray(zero))),
            "advantages/std": float(adv.std()),
        }

    def make_rollout(self, state: TrainState, index: int, prompt_indices: Sequence[int]) -> Rollout:
        """Samples, rewards and scores the completions of rollout ``index``'s prompts."""
        args = self.args_rl
        prompts = rollouts.read_prompts(self.train_source, prompt_indices, self.tokenizer, args.max_prompt_length)
        sample = self.sample(state.model, prompts, self.num_generations, seed=index)
        rewards_per_func = self.rewards(sample)
        rewards = rollouts.total_reward(rewards_per_func, self.reward_weights)
        keep = [s or not args.mask_truncated_completions for s in sample["stopped"]]
        arrays = rollouts.training_rows(
            [p.ids for p in sample["prompts"]], sample["completion_ids"], keep, self.row_length
        )
        scores: dict[str, np.ndarray] = {}
        if self.need_old_logps or self.reference != "none":
            scores = {
                k: np.asarray(v)
                for k, v in jax.device_get(
                    self.jitted_score(state.model, sharding_lib.global_arrays(arrays, self.model.mesh))
                ).items()
            }
        targets, metrics = self.learning_targets(rewards, arrays, scores)
        arrays.update(scores)
        arrays.update(targets)
        metrics.update(rollouts.reward_stats(self.reward_names, rewards_per_func, rewards, self.num_generations))
        metrics.update(rollouts.completion_stats([len(c) for c in sample["completion_ids"]], sample["stopped"]))
        if args.log_completions:
            shown = sample["completions"][: args.num_completions_to_print or len(sample["completions"])]
            for p, c, r in zip(sample["prompts"], shown, rewards, strict=False):
                logger.info("rollout %d | prompt: %r | completion: %r | reward: %.4g", index, p.value, c, r)
        return Rollout(index, arrays, metrics)
