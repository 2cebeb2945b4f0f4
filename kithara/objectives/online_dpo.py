"""OnlineDPOTrainer: DPO on pairs the current policy samples and a judge or reward ranks,
on GRPO's rollout machinery (TRL's ``OnlineDPOTrainer``).

A rollout here is one update's pairs: rows ``2g`` and ``2g + 1`` are the two completions
of prompt ``g`` (``GRPOTrainer``'s group-contiguous rows with groups of two), sampled,
judged, scored under the reference once, then one optimizer update through the base
class's jitted step. ``XPOTrainer`` and ``NashMDTrainer`` change who writes the second
completion of each pair and the loss.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.models.adapters import adapter_off
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses, reference, rollouts
from kithara.objectives.grpo import EVAL_SEED, GRPOTrainer
from kithara.objectives.online_configs import OnlineDPOConfig
from kithara.objectives.rl_configs import RolloutConfig
from kithara.objectives.rollouts import Prompt, Rollout
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.state import TrainState

logger = logging.getLogger(__name__)

Pairs = Mapping[str, jax.Array]  # per-row arrays reshaped to [pairs, 2, ...]


def online_dpo_losses(
    policy_Px2: jax.Array, ref_Px2: jax.Array, chosen_first_P: jax.Array, beta_P: jax.Array, loss_type: str
) -> jax.Array:
    """Per-pair loss of ``loss_type`` (``dpo_losses.LOSSES``: ``"sigmoid"`` or ``"ipo"``)
    from summed completion log-probs of both completions under the policy and the
    reference; ``chosen_first_P`` says completion 0 is the chosen one. IPO is TRL's Online
    DPO form, on sums (unit lengths): ``(margin - 1 / (2 beta))^2``."""
    p = chosen_rejected(policy_Px2, ref_Px2, chosen_first_P)
    return dpo_losses.LOSSES[loss_type](p, cast(float, beta_P), 0.0)


def chosen_rejected(policy_Px2: jax.Array, ref_Px2: jax.Array, chosen_first_P: jax.Array) -> dpo_losses.PairLogps:
    """``PairLogps`` of each pair's chosen and rejected completion (unit lengths)."""
    first = chosen_first_P.astype(bool)

    def pick(x_Px2: jax.Array, chosen: bool) -> jax.Array:
        return jnp.where(first == chosen, x_Px2[:, 0], x_Px2[:, 1])

    ones = jnp.ones_like(policy_Px2[:, 0])
    return dpo_losses.PairLogps(
        pick(policy_Px2, True), pick(policy_Px2, False), pick(ref_Px2, True), pick(ref_Px2, False), ones, ones
    )


@dataclasses.dataclass
class Judgement:
    """The verdict on a rollout's pairs: ``first`` ``[pairs]`` is 1 where the first
    completion wins, 0 where the second does, in between for a soft preference, NaN where
    undecided; ``rewards`` ``[rows]`` the total rewards (after ``missing_eos_penalty``)
    and ``per_func`` ``[rows, functions]`` when reward functions judged, else None."""

    first: np.ndarray
    rewards: np.ndarray | None = None
    per_func: np.ndarray | None = None


class OnlineDPOTrainer(GRPOTrainer):
    """Online DPO (TRL's ``OnlineDPOTrainer`` arguments and metrics): per prompt, two
    completions from the current policy; a judge or reward functions pick the chosen one;
    the DPO loss of ``args.loss_type`` on the pair against the reference.

    Args:
        model: a causal ``KerasHubModel`` or a model directory (loaded with ``peft_config``).
        ref_model: a separate frozen reference on the same mesh (same tokenizer). Default:
            the model with its LoRA adapters off, else a frozen copy of its starting weights.
        reward_funcs: reward functions or reward models, as ``GRPOTrainer`` takes them (the
            weighted sum ranks a pair; the higher wins, a tie goes to the first). Give this
            or ``judge``.
        judge: a ``kithara.judges.BasePairwiseJudge``: ``judge(prompts, [[c0, c1], ...])``
            returns, per prompt, 0 or 1 (the better completion) or -1 (undecided: the pair
            is dropped from the loss and counted in ``objective/undecided_rate``).
        args: an ``OnlineDPOConfig``.
        train_dataset / eval_dataset: rows with a ``prompt`` (text or messages) or chat
            ``messages``; ``evaluate()`` reports ``win_rate``: how often the judge (or the
            reward) prefers the policy's completion to the reference's on the eval prompts.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer.
        reward_processing_classes / optimizer / peft_config / callbacks / checkpointer /
            profiler / **fields: as for ``GRPOTrainer``.

    Example:
        >>> class Shorter(kithara.judges.BasePairwiseJudge):
        ...     def judge(self, prompts, completions, shuffle_order=True):
        ...         return [int(len(b) < len(a)) if len(a) != len(b) else -1 for a, b in completions]
        >>> trainer = OnlineDPOTrainer(model, judge=Shorter(), train_dataset=rows, processing_class=tokenizer,
        ...     args=OnlineDPOConfig(max_new_tokens=32, max_length=128, max_steps=50))
        >>> trainer.train()
    """

    config_class: type[TrainingConfig] = OnlineDPOConfig
    step_constants = (*GRPOTrainer.step_constants, "ref_model")

    def __init__(
        self,
        model: Model | str,
        ref_model: Model | None = None,
        reward_funcs: Any = None,
        judge: Any = None,
        args: OnlineDPOConfig | None = None,
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
        from kithara.judges.base import BaseBinaryJudge, BaseRankJudge  # kithara.judges imports objectives

        name = type(self).__name__
        if judge is None and reward_funcs is None:
            raise ValueError(f"{name} needs judge= (a pairwise judge) or reward_funcs= to rank each pair.")
        if judge is not None and reward_funcs is not None:
            raise ValueError(f"{name} takes judge= or reward_funcs=, not both: one of them ranks each pair.")
        if isinstance(judge, BaseBinaryJudge | BaseRankJudge) or (
            judge is not None and not callable(getattr(judge, "judge", None))
        ):
            raise TypeError(
                f"judge must be a pairwise judge with judge(prompts, completions) -> indices "
                f"(kithara.judges.BasePairwiseJudge), got {type(judge).__name__}."
            )
        if ref_model is not None and not isinstance(ref_model, KerasHubModel):
            raise TypeError(f"ref_model must be a causal kithara.KerasHubModel, got {type(ref_model).__name__}.")
        config = cast(OnlineDPOConfig, self.resolve_config(args, **fields))
        if judge is not None and config.missing_eos_penalty is not None:
            raise ValueError("missing_eos_penalty adjusts rewards; a judge gives none. Use reward_funcs, or drop it.")
        if judge is not None and config.reward_weights is not None:
            raise ValueError("reward_weights weighs reward_funcs; with a judge there are none. Drop reward_weights.")
        self.ref_model = ref_model
        self.judge = judge
        super().__init__(
            model,
            reward_funcs if judge is None else _judged,
            args=config,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            optimizer=optimizer,
            tokenizer=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            checkpointer=checkpointer,
            profiler=profiler,
        )
        if judge is not None:  # GRPOTrainer needs a reward function; with a judge there is none
            self.reward_funcs, self.reward_names, self.reward_weights = [], [], np.zeros(0)

    @property
    def reference_model(self) -> Model | None:
        """``ref_model``, when one was given."""
        return self.ref_model

    @property
    def args_online(self) -> OnlineDPOConfig:
        """``args``, typed as the online config it is."""
        return cast(OnlineDPOConfig, self.args)

    @property
    def scored(self) -> bool:
        """Whether reward functions (not a judge) rank the pairs."""
        return self.judge is None

    # Set-up (GRPOTrainer's hooks) ----------------------------------------------------------

    def select_reference(self, policy: KerasHubModel, config: RolloutConfig) -> tuple[str, ModelVariables | None]:
        """The reference as DPO picks it: ``ref_model``, else adapters off, else a frozen copy."""
        return reference.select_reference(policy, self.ref_model, False, who=type(self).__name__)

    def reference_logps(
        self, policy_variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> jax.Array:
        """Per-token log-probs under ``ref_model`` (its variables are ``frozen``), else as GRPO."""
        if self.reference == "ref_model":
            chunk = self.args_rl.logprob_chunk_size
            ref = cast(KerasHubModel, self.ref_model)
            return ref.token_logps(frozen, batch, batch["labels"], training=False, chunk_size=chunk)[0]
        return super().reference_logps(policy_variables, batch, frozen)

    def reference_sampler(self, variables: ModelVariables) -> tuple[KerasHubModel, ModelVariables]:
        """The model and variables that sample as the reference."""
        if self.reference == "ref_model":
            return cast(KerasHubModel, self.ref_model), self.frozen
        if self.reference == "frozen_copy":
            return self.policy, self.frozen
        return self.policy, adapter_off(self.policy_variables(variables))

    def score_batch(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], frozen: Any
    ) -> dict[str, jax.Array]:
        """Reference per-token log-probs of the pairs (the policy's are taken in the loss)."""
        ref = self.reference_logps(self.policy_variables(variables), batch, frozen)
        return {"ref_logps": jax.lax.stop_gradient(ref)}

    # Sampling and judging -----------------------------------------------------------------

    def sample_from(
        self, model: KerasHubModel, variables: ModelVariables, prompts: Sequence[Prompt], *, seed: int
    ) -> dict[str, Any]:
        """One completion of each prompt from ``model`` at ``variables``, as ``sample`` returns them."""
        args = self.args_rl
        ids, stopped = model.sample(
            [p.ids for p in prompts],
            args.max_completion_length,
            variables=variables,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            min_p=args.min_p,
            stop_token_ids=self.stop_token_ids,
            seed=jax.random.fold_in(jax.random.key(self.seed), seed),
        )
        return self.as_sample(prompts, ids, stopped)

    def as_sample(self, prompts: Sequence[Prompt], ids: Sequence[list[int]], stopped: Sequence[bool]) -> dict[str, Any]:
        """``sample``'s dict from prompt rows and their completions' ids."""
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]
        completions = [
            [{"role": "assistant", "content": t}] if p.conversational else t
            for p, t in zip(prompts, texts, strict=True)
        ]
        return {
            "prompts": list(prompts),
            "completion_ids": list(ids),
            "stopped": list(stopped),
            "completions": completions,
        }

    def sample_pairs(
        self, variables: ModelVariables, prompts: Sequence[Prompt], *, seed: int, epoch: int
    ) -> dict[str, Any]:
        """The pairs of a rollout, rows ``2g`` and ``2g + 1`` for prompt ``g``: here two
        completions from the policy (``XPOTrainer``: policy, then reference)."""
        del epoch
        return self.sample(variables, prompts, 2, seed=seed)

    def judge_pairs(self, sample: Mapping[str, Any]) -> Judgement:
        """Ranks each pair with the judge, or with the reward functions' weighted total
        (``missing_eos_penalty`` subtracted for completions without a stop token)."""
        n = len(sample["prompts"])
        if self.judge is None:
            per_func = self.rewards(sample)
            rewards = rollouts.total_reward(per_func, self.reward_weights)
            penalty = self.args_online.missing_eos_penalty
            if penalty is not None:
                rewards = rewards - penalty * ~np.asarray(sample["stopped"], bool)
            return Judgement(self.rank_by_rewards(rewards[0::2], rewards[1::2]), rewards, per_func)
        prompts = [p.value for p in sample["prompts"][0::2]]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in sample["completion_ids"]]
        pairs = [[texts[i], texts[i + 1]] for i in range(0, n, 2)]
        return Judgement(self.call_judge(prompts, pairs))

    @staticmethod
    def rank_by_rewards(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """1 where the first reward is at least the second (TRL: ties go to the first), else
        0; NaN where either has no reward."""
        return np.where(np.isnan(first) | np.isnan(second), np.nan, (first >= second).astype(np.float64))

    def call_judge(self, prompts: list[Any], pairs: list[list[str]], *, soft: bool = False) -> np.ndarray:
        """The judge's verdicts as ``Judgement.first`` values (1, 0, NaN for -1), each
        process judging its share of the pairs (a judge with ``runs_on_every_row`` judges
        all). ``soft``: ask for ``return_scores=True`` (the probability that the first is
        better) when the judge's ``judge`` takes it."""
        judge = cast(Any, self.judge)
        n = len(prompts)
        every = getattr(judge, "runs_on_every_row", False)
        lo, hi = (0, n) if every else rollouts.process_share(n)
        kwargs = (
            {"return_scores": True} if soft and "return_scores" in inspect.signature(judge.judge).parameters else {}
        )
        verdicts = list(judge.judge(prompts[lo:hi], pairs[lo:hi], **kwargs)) if hi > lo else []
        if len(verdicts) != hi - lo:
            raise ValueError(f"The judge returned {len(verdicts)} verdicts for {hi - lo} pairs.")
        out = np.full(n, np.nan)
        out[lo:hi] = [_verdict(v, bool(kwargs)) for v in verdicts]
        return out if every else rollouts.gather_rows(out, lo, hi)

    # The rollout ---------------------------------------------------------------------------

    def make_rollout(self, state: TrainState, index: int, prompt_indices: Sequence[int]) -> Rollout:
        """Samples the pairs of rollout ``index``, judges them, scores them under the
        reference, and turns the verdicts into per-row targets."""
        args = self.args_online
        epoch = index // self.rollouts_per_epoch
        prompts = rollouts.read_prompts(
            self.train_source, prompt_indices, self.tokenizer, cast(int, args.max_prompt_length)
        )
        sample = self.sample_pairs(state.model, prompts, seed=index, epoch=epoch)
        verdict = self.judge_pairs(sample)
        arrays = rollouts.training_rows(
            [p.ids for p in sample["prompts"]], sample["completion_ids"], [True] * len(prompts) * 2, self.row_length
        )
        scores = jax.device_get(self.jitted_score(state.model, sharding_lib.global_arrays(arrays, self.model.mesh)))
        arrays.update({k: np.asarray(v) for k, v in scores.items()})
        targets, metrics = self.pair_targets(verdict, sample, epoch)
        arrays.update(targets)
        metrics.update(self.pair_metrics(verdict, sample))
        if args.log_completions:
            shown = sample["completions"][: args.num_completions_to_print or len(sample["completions"])]
            for i, c in enumerate(shown):
                logger.info("rollout %d | prompt: %r | completion %d: %r", index, sample["prompts"][i].value, i % 2, c)
        return Rollout(index, arrays, metrics)

    def pair_targets(
        self, verdict: Judgement, sample: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Per-row float32 arrays the loss reads (a pair's values on both its rows):
        ``chosen_first``, ``pair_weight`` (0: undecided), ``beta``, and ``scores`` (the
        rewards, with reward functions); and their host metrics."""
        first = verdict.first
        beta = self.args_online.beta_at(epoch)
        out = {
            "chosen_first": np.repeat(np.nan_to_num(first) >= 0.5, 2).astype(np.float32),
            "pair_weight": np.repeat(~np.isnan(first), 2).astype(np.float32),
            "beta": np.full(2 * len(first), beta, np.float32),
        }
        if verdict.rewards is not None:
            out["scores"] = np.nan_to_num(verdict.rewards).astype(np.float32)
        return out, {"beta": beta}

    def pair_metrics(self, verdict: Judgement, sample: Mapping[str, Any]) -> dict[str, float]:
        """Host metrics of a rollout: TRL's score metrics (reward functions), the undecided
        share, the stop-token share, and completion lengths (all, chosen, rejected)."""
        first = verdict.first
        lengths = np.array([len(c) for c in sample["completion_ids"]], np.float64).reshape(-1, 2)
        decided = ~np.isnan(first)
        chosen_first = np.nan_to_num(first) >= 0.5
        chosen_len = np.where(chosen_first, lengths[:, 0], lengths[:, 1])[decided]
        rejected_len = np.where(chosen_first, lengths[:, 1], lengths[:, 0])[decided]
        metrics = {
            "objective/undecided_rate": float(1.0 - decided.mean()),
            "val/contain_eos_token": float(np.mean(sample["stopped"])),
            "completions/chosen_mean_length": float(chosen_len.mean()) if decided.any() else 0.0,
            "completions/rejected_mean_length": float(rejected_len.mean()) if decided.any() else 0.0,
        }
        metrics.update(rollouts.completion_stats([len(c) for c in sample["completion_ids"]], sample["stopped"]))
        if verdict.rewards is not None and verdict.per_func is not None:
            pair = verdict.rewards.reshape(-1, 2)
            margin = np.where(chosen_first, pair[:, 0] - pair[:, 1], pair[:, 1] - pair[:, 0])[decided]
            metrics["objective/scores"] = float(np.nanmean(verdict.rewards))
            metrics["objective/scores_margin"] = float(margin.mean()) if decided.any() else 0.0
            metrics.update(reward_metrics(self.reward_names, verdict.per_func, verdict.rewards))
        return metrics

    # The loss ------------------------------------------------------------------------------

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """``pair_loss`` over the micro-batch's pairs: the sum over decided pairs, weighted
        by their count; metrics likewise averaged over decided pairs."""
        del rng, frozen
        args = self.args_online
        logps, entropy, non_trainable = self.model.token_logps(
            variables, batch, batch["labels"], training=not args.disable_dropout, chunk_size=args.logprob_chunk_size
        )
        rows = {**batch, "logps": logps, "token_entropy": entropy}
        pairs = {k: v.reshape(v.shape[0] // 2, 2, *v.shape[1:]) for k, v in rows.items()}
        loss_P, sums_P = self.pair_loss(pairs)
        valid_P = pairs["pair_weight"][:, 0] > 0

        def total(x: jax.Array) -> jax.Array:
            return jnp.where(valid_P, x, 0.0).sum()

        out = LossOutput(
            total=total(loss_P),
            weight=valid_P.sum().astype(jnp.float32),
            sums={k: total(v) for k, v in sums_P.items()},
        )
        return out, non_trainable

    def pair_loss(self, pairs: Pairs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-pair loss ``[P]`` and per-pair metrics (TRL's names) from ``[P, 2, ...]``
        arrays: ``logps`` / ``ref_logps`` per token, ``completion_mask``, and the targets."""
        mask = pairs["completion_mask"]
        policy_Px2 = jnp.where(mask, pairs["logps"], 0.0).sum(-1)
        ref_Px2 = jnp.where(mask, pairs["ref_logps"], 0.0).sum(-1)
        beta_P = pairs["beta"][:, 0]
        chosen_first_P = pairs["chosen_first"][:, 0]
        loss_P = online_dpo_losses(policy_Px2, ref_Px2, chosen_first_P, beta_P, self.args_online.loss_type)
        sums = preference_metrics(policy_Px2, ref_Px2, chosen_first_P, beta_P)
        kl_P = (policy_Px2 - ref_Px2).mean(-1)
        sums["objective/kl"] = kl_P
        sums["objective/entropy"] = -policy_Px2.mean(-1)
        sums["objective/non_score_reward"] = -beta_P * kl_P
        if self.scored:
            sums["objective/rlhf_reward"] = pairs["scores"].mean(-1) - beta_P * kl_P
        return loss_P, sums

    # Evaluation ----------------------------------------------------------------------------

    def eval_metrics(self, variables: ModelVariables) -> dict[str, float]:
        """``win_rate``: on the eval prompts (``max_eval_samples`` at most), how often the
        judge (or the higher reward; a tie counts half) prefers one completion of the
        policy to one of the reference (its starting point); undecided pairs are left out
        and counted in ``undecided_rate``. Plus the policy's completion lengths."""
        if self.eval_source is None:
            raise ValueError("evaluate() needs eval_dataset.")
        count = min(len(self.eval_source), self.max_eval_samples or len(self.eval_source))
        prompts = rollouts.read_prompts(
            self.eval_source, range(count), self.tokenizer, cast(int, self.args_rl.max_prompt_length)
        )
        policy = self.sample_from(self.policy, self.policy_variables(variables), prompts, seed=EVAL_SEED)
        ref_model, ref_variables = self.reference_sampler(variables)
        ref = self.sample_from(ref_model, ref_variables, prompts, seed=EVAL_SEED - 1)  # not the policy's draws
        pairs = {k: [x for ab in zip(policy[k], ref[k], strict=True) for x in ab] for k in policy}
        verdict = OnlineDPOTrainer.judge_pairs(self, pairs)
        if verdict.rewards is not None:
            pair = verdict.rewards.reshape(-1, 2)
            wins = np.where(np.isnan(pair).any(1), np.nan, (pair[:, 0] > pair[:, 1]) + 0.5 * (pair[:, 0] == pair[:, 1]))
        else:
            wins = verdict.first
        decided = ~np.isnan(wins)
        out = {
            "win_rate": float(np.mean(wins[decided])) if decided.any() else float("nan"),
            "undecided_rate": float(1.0 - decided.mean()),
        }
        out.update(rollouts.completion_stats([len(c) for c in policy["completion_ids"]], policy["stopped"]))
        return out


def preference_metrics(
    policy_Px2: jax.Array, ref_Px2: jax.Array, chosen_first_P: jax.Array, beta_P: jax.Array
) -> dict[str, jax.Array]:
    """TRL's per-pair implicit-reward metrics: ``rewards/chosen`` and ``/rejected`` (beta
    times the log-ratio), ``/margins``, ``/accuracies`` (the implicit reward agrees with
    the judge), and the policy's ``logps/chosen`` and ``/rejected``."""
    p = chosen_rejected(policy_Px2, ref_Px2, chosen_first_P)
    return {
        "rewards/chosen": beta_P * p.rw,
        "rewards/rejected": beta_P * p.rl,
        "rewards/margins": beta_P * p.margin,
        "rewards/accuracies": (p.margin > 0).astype(jnp.float32),
        "logps/chosen": p.chosen,
        "logps/rejected": p.rejected,
    }


def reward_metrics(names: Sequence[str], per_func: np.ndarray, rewards: np.ndarray) -> dict[str, float]:
    """GRPO's reward metrics over pairs; a pair whose rows have no reward is NaN there, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "degrees of freedom" on an all-NaN pair
        return rollouts.reward_stats(names, per_func, rewards, 2)


def _judged(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """Stands in for a reward function while ``GRPOTrainer`` sets up a judged trainer."""
    return [0.0] * len(completions)


def _verdict(value: Any, soft: bool) -> float:
    """A judge's answer as ``Judgement.first``: index 0 -> 1.0, 1 -> 0.0, -1 -> NaN; with
    ``soft``, a probability in [0, 1] as it is."""
    if soft and isinstance(value, float | np.floating) and 0.0 <= value <= 1.0:
        return float(value)
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and value in (0, 1, -1):
        return {0: 1.0, 1: 0.0, -1: float("nan")}[int(value)]
    raise ValueError(
        f"A pairwise judge returns 0 or 1 (the better completion) or -1 (undecided) per prompt"
        f"{', or a probability in [0, 1] with return_scores=True' if soft else ''}; got {value!r}."
    )
