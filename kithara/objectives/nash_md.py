"""NashMDTrainer: Nash learning from preference feedback by mirror descent (TRL's
``NashMDTrainer``) on Online DPO's rollouts.

Each pair is one completion from the policy and one from the geometric mixture of policy
and reference (``MixtureGenerator``: TRL's ``GeometricMixtureWrapper``, decoded with both
models' KV caches in one jitted loop); the judge's (or the rewards') probability that the
policy's completion is better drives a REINFORCE term, against a REINFORCE estimate of
the KL to the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kithara.models.generation import Generator, seed_cache, split_at_stop
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import ModelVariables
from kithara.models.sampling import choose_tokens
from kithara.objectives import rollouts
from kithara.objectives.online_configs import NashMDConfig
from kithara.objectives.online_dpo import Judgement, OnlineDPOTrainer, Pairs, reward_metrics
from kithara.objectives.rollouts import Prompt
from kithara.trainer.config import TrainingConfig


def mixture_logits(policy_logits_BxV: jax.Array, ref_logits_BxV: jax.Array, mixture_coef: jax.Array) -> jax.Array:
    """TRL's ``GeometricMixtureWrapper``: ``log_softmax(m x ref + (1 - m) x policy)``, the
    log of ``pi^(1-m) pi_ref^m`` normalised; sampling then applies temperature and filters."""
    mixed = mixture_coef * ref_logits_BxV.astype(jnp.float32) + (1 - mixture_coef) * policy_logits_BxV.astype(
        jnp.float32
    )
    return jax.nn.log_softmax(mixed, axis=-1)


def nash_md_losses(
    logps_PxT: jax.Array, ref_logps_PxT: jax.Array, mask_PxT: jax.Array, probability_P: jax.Array, beta_P: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair ``(loss, score, kl)`` of TRL's Nash-MD on the policy's completions:
    ``score = (p - 0.5) x sum log pi`` (REINFORCE, 0.5 the control variate),
    ``kl = sum (log pi - log pi_ref)`` without gradient, and ``loss = beta x sum
    sg(log pi - log pi_ref) x log pi - score``."""
    logps = jnp.where(mask_PxT, logps_PxT, 0.0)
    log_ratio = jax.lax.stop_gradient(jnp.where(mask_PxT, logps_PxT - ref_logps_PxT, 0.0))
    score_P = (probability_P - 0.5) * logps.sum(-1)
    kl_loss_P = (log_ratio * logps).sum(-1)
    return beta_P * kl_loss_P - score_P, score_P, log_ratio.sum(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MixtureVariables:
    """What the mixture decode reads: both models' variables and the coefficient (traced,
    so a per-epoch coefficient does not recompile)."""

    policy: ModelVariables
    reference: ModelVariables
    mixture_coef: jax.Array


class MixtureGenerator(Generator):
    """Samples from ``mixture_logits`` of a policy and a reference ``KerasHubModel`` (the
    same one with other variables, or another of the same vocabulary): ``Generator``'s
    buckets, stops and filters, with a KV cache per model.

    Args:
        model: the policy.
        ref_model: the reference (``model`` itself for a frozen copy or adapters off).
    """

    def __init__(self, model: KerasHubModel, ref_model: KerasHubModel) -> None:
        super().__init__(model)
        self.ref_model = ref_model

    def _decode(  # type: ignore[override]
        self,
        variables: MixtureVariables,
        token_ids_BxT: jax.Array,
        prompt_len_B: jax.Array,
        end_B: jax.Array,
        stop_ids_S: jax.Array,
        rng: jax.Array,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        min_p: jax.Array,
        *,
        greedy: bool,
        filtered: bool,
    ) -> jax.Array:
        """``Generator._decode`` with each step's logits from both models, mixed."""
        models = (self.model, self.ref_model)
        mappings = (
            self.model.state_mapping(variables.policy),
            self.ref_model.state_mapping(variables.reference),
        )
        batch, total = token_ids_BxT.shape
        caches = []
        for model, mapping in zip(models, mappings, strict=True):
            with keras.StatelessScope(state_mapping=mapping):
                caches.append(seed_cache(model.causal_lm, token_ids_BxT))

        def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
            index, ids_BxT, caches, done_B, rng = carry
            last_Bx1 = jax.lax.dynamic_slice(ids_BxT, (0, index - 1), (batch, 1))
            logits, new_caches = [], []
            for model, mapping, cache in zip(models, mappings, caches, strict=True):
                with keras.StatelessScope(state_mapping=mapping):
                    logits_Bx1xV, _, cache = model.causal_lm.call_with_cache(last_Bx1, cache, index - 1)
                logits.append(logits_Bx1xV[:, 0])
                new_caches.append(cache)
            rng, key = jax.random.split(rng)
            mixed_BxV = mixture_logits(logits[0], logits[1], variables.mixture_coef)
            chosen_B = choose_tokens(mixed_BxV, key, temperature, top_k, top_p, min_p, greedy=greedy, filtered=filtered)
            generating_B = (index >= prompt_len_B) & ~done_B
            ids_BxT = ids_BxT.at[:, index].set(jnp.where(generating_B, chosen_B, ids_BxT[:, index]))
            stopped_B = (chosen_B[:, None] == stop_ids_S[None]).any(-1)
            done_B = done_B | (generating_B & (stopped_B | (index + 1 >= end_B)))
            return index + 1, ids_BxT, new_caches, done_B, rng

        def cond(carry: tuple[Any, ...]) -> jax.Array:
            index, _, _, done_B, _ = carry
            return (index < total) & ~done_B.all()

        carry = (jnp.min(prompt_len_B), token_ids_BxT, caches, jnp.zeros((batch,), bool), rng)
        return jax.lax.while_loop(cond, body, carry)[1]

    def sample(
        self,
        token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        variables: MixtureVariables,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        min_p: float | None,
        stop_token_ids: Sequence[int],
        seed: jax.Array,
    ) -> tuple[list[list[int]], list[bool]]:
        """``KerasHubModel.sample`` from the mixture: ``(completions, stopped)``."""
        rows = self(
            token_ids,
            [len(r) + max_new_tokens for r in token_ids],
            variables=cast(ModelVariables, variables),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            stop_token_ids=stop_token_ids,
            rng=seed,
        )
        split = [split_at_stop(r, stop_token_ids) for r in rows]
        return [tokens for tokens, _ in split], [stopped for _, stopped in split]


class NashMDTrainer(OnlineDPOTrainer):
    """Nash-MD (TRL's ``NashMDTrainer`` arguments and metrics): ``OnlineDPOTrainer``'s
    arguments with a ``NashMDConfig`` (``mixture_coef``). The preference probability is
    ``sigmoid(r(policy) - r(mixture))`` with reward functions; with a judge, its
    ``return_scores=True`` probability when its ``judge`` takes that argument, else 1 / 0
    by its choice (-1: the pair is dropped).

    Metrics (TRL's): ``loss/kl``, ``loss/score``, ``objective/entropy``,
    ``rewards/probabilities``, ``rewards/margins`` and ``/accuracies`` (log-ratio of the
    policy's completion), ``logps/chosen`` (policy) and ``/rejected`` (reference) of the
    policy's completion, ``rewards/chosen`` / ``/rejected`` (scores of the policy's and the
    mixture's completions, with reward functions), ``val/model_contain_eos_token`` /
    ``val/ref_contain_eos_token``, ``beta``, ``mixture_coef``; and ``objective/win_rate``,
    the share of decided pairs the policy's completion won (probability > 0.5, half at 0.5).

    Example:
        >>> trainer = NashMDTrainer(model, reward_funcs=exact, train_dataset=rows, processing_class=tokenizer,
        ...     args=NashMDConfig(mixture_coef=0.5, max_new_tokens=16, max_length=64, max_steps=50))
    """

    config_class: type[TrainingConfig] = NashMDConfig
    _mixture: MixtureGenerator | None = None

    def sample_mixture(
        self, variables: ModelVariables, prompts: Sequence[Prompt], *, seed: int, mixture_coef: float
    ) -> dict[str, Any]:
        """One completion of each prompt from the geometric mixture of policy and reference."""
        ref_model, ref_variables = self.reference_sampler(variables)
        if self._mixture is None or self._mixture.ref_model is not ref_model:
            self._mixture = MixtureGenerator(self.policy, ref_model)
        args = self.args_rl
        ids, stopped = self._mixture.sample(
            [p.ids for p in prompts],
            cast(int, args.max_completion_length),
            variables=MixtureVariables(self.policy_variables(variables), ref_variables, jnp.float32(mixture_coef)),
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            min_p=args.min_p,
            stop_token_ids=self.stop_token_ids,
            seed=jax.random.fold_in(jax.random.key(self.seed), seed),
        )
        return self.as_sample(prompts, ids, stopped)

    def sample_pairs(
        self, variables: ModelVariables, prompts: Sequence[Prompt], *, seed: int, epoch: int
    ) -> dict[str, Any]:
        """Row ``2g``: the policy's completion of prompt ``g``; row ``2g + 1``: the mixture's."""
        coef = cast(NashMDConfig, self.args).mixture_coef_at(epoch)
        policy = self.sample(variables, prompts, 1, seed=seed)
        mixture = self.sample_mixture(variables, prompts, seed=seed + (1 << 30), mixture_coef=coef)
        return {k: [x for ab in zip(policy[k], mixture[k], strict=True) for x in ab] for k in policy}

    def judge_pairs(self, sample: Mapping[str, Any]) -> Judgement:
        """The probability that the policy's completion beats the mixture's:
        ``sigmoid(r0 - r1)`` from the rewards (TRL), else the judge's (soft when it can)."""
        if self.judge is None:
            verdict = super().judge_pairs(sample)
            rewards = cast(np.ndarray, verdict.rewards)  # reward functions always give them
            diff = rewards[0::2] - rewards[1::2]
            verdict.first = 1.0 / (1.0 + np.exp(-diff))  # NaN stays NaN: the pair is dropped
            return verdict
        n = len(sample["prompts"])
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in sample["completion_ids"]]
        prompts = [p.value for p in sample["prompts"][0::2]]
        return Judgement(self.call_judge(prompts, [[texts[i], texts[i + 1]] for i in range(0, n, 2)], soft=True))

    def pair_targets(
        self, verdict: Judgement, sample: Mapping[str, Any], epoch: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``probability`` (of the policy's completion winning), ``pair_weight``, ``beta``,
        and the scores of both sides with reward functions."""
        first = verdict.first
        beta = self.args_online.beta_at(epoch)
        out = {
            "probability": np.repeat(np.nan_to_num(first, nan=0.5), 2).astype(np.float32),
            "pair_weight": np.repeat(~np.isnan(first), 2).astype(np.float32),
            "beta": np.full(2 * len(first), beta, np.float32),
        }
        if verdict.rewards is not None:
            out["scores"] = np.nan_to_num(verdict.rewards).astype(np.float32)
        coef = cast(NashMDConfig, self.args).mixture_coef_at(epoch)
        return out, {"beta": beta, "mixture_coef": coef}

    def pair_metrics(self, verdict: Judgement, sample: Mapping[str, Any]) -> dict[str, float]:
        """Completion lengths, the undecided share, the win rate and per-side stop-token shares."""
        first = verdict.first
        decided = ~np.isnan(first)
        stopped = np.asarray(sample["stopped"], np.float64)
        wins = (first[decided] > 0.5) + 0.5 * (first[decided] == 0.5)
        metrics = {
            "objective/undecided_rate": float(1.0 - decided.mean()),
            "objective/win_rate": float(wins.mean()) if decided.any() else float("nan"),
            "val/model_contain_eos_token": float(stopped[0::2].mean()),
            "val/ref_contain_eos_token": float(stopped[1::2].mean()),
        }
        metrics.update(rollouts.completion_stats([len(c) for c in sample["completion_ids"]], sample["stopped"]))
        if verdict.rewards is not None and verdict.per_func is not None:
            metrics.update(reward_metrics(self.reward_names, verdict.per_func, verdict.rewards))
        return metrics

    def pair_loss(self, pairs: Pairs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """TRL's Nash-MD loss on the policy's completion of each pair (row 0)."""
        mask = pairs["completion_mask"][:, 0]
        logps, ref_logps = pairs["logps"][:, 0], pairs["ref_logps"][:, 0]
        probability_P, beta_P = pairs["probability"][:, 0], pairs["beta"][:, 0]
        loss_P, score_P, kl_P = nash_md_losses(logps, ref_logps, mask, probability_P, beta_P)
        policy_P = jnp.where(mask, logps, 0.0).sum(-1)
        ref_P = jnp.where(mask, ref_logps, 0.0).sum(-1)
        margin_P = policy_P - ref_P
        sums = {
            "loss/score": score_P,
            "loss/kl": kl_P,
            "objective/entropy": -policy_P,
            "rewards/probabilities": probability_P,
            "rewards/margins": margin_P,
            "rewards/accuracies": (margin_P > 0).astype(jnp.float32),
            "logps/chosen": policy_P,
            "logps/rejected": ref_P,
        }
        if self.scored:
            sums["rewards/chosen"], sums["rewards/rejected"] = pairs["scores"][:, 0], pairs["scores"][:, 1]
        return loss_P, sums
