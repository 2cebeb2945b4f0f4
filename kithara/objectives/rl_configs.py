"""Settings of the online-RL trainers (``GRPOConfig``, ``RLOOConfig``, ``PPOConfig``) under
TRL 1.16's names, plus the rollout settings they share (``RolloutConfig``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

from kithara.objectives.configs import check_sync_ref
from kithara.trainer.config import TrainingConfig

SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
# GRPO loss types TRL 1.16 has and kithara does not (yet).
_TRL_ONLY_LOSSES = ("vespo",)
_GENERATION_NOT_HERE = {
    "use_vllm": "kithara samples with its own jitted KV-cache decoder on the training mesh.",
    "vllm_mode": "kithara samples with its own jitted KV-cache decoder on the training mesh.",
    "generation_kwargs": "set temperature, top_p, top_k, min_p and stop_token_ids directly.",
    "repetition_penalty": "not supported by kithara's decoder yet; leave it out (1.0).",
    "cache_implementation": "kithara uses keras-hub's KV cache.",
    "multi_objective_aggregation": "kithara sums the weighted rewards, then normalises ('sum_then_normalize').",
    "use_transformers_paged": "kithara samples with its own jitted KV-cache decoder.",
    "chat_template_kwargs": "not supported yet: give the tokenizer the chat template you want (chat_template=).",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig(TrainingConfig):
    """What every online-RL trainer shares: the rollout batch and the sampling.

    Args:
        learning_rate: TRL. 1e-6, TRL's.
        logging_steps: TRL. 10.
        per_device_train_batch_size: TRL. Completions per device per micro-batch (8, TRL's).
        num_generations: TRL. Completions sampled per prompt (a group).
        max_prompt_length: kithara (TRL removed it). Prompt tokens kept, from the end.
        max_completion_length: TRL. New tokens per completion at most.
        generation_batch_size / steps_per_generation: TRL. Completions per rollout, or
            micro-batches per rollout (default ``gradient_accumulation_steps``: one rollout
            per optimizer step). Set one of them.
        num_iterations: TRL. Updates on each rollout batch (mu); old log-probs are
            computed once per rollout.
        temperature / top_p / top_k / min_p: TRL. Sampling (``top_k=0``: off).
        stop_token_ids: kithara. Ids that end a completion (kept in it); ``None``: the
            tokenizer's EOS.
        mask_truncated_completions: TRL. No loss on completions that hit the length limit.
        reward_weights: TRL. One weight per reward function (default 1.0 each).
        beta: TRL. Weight of the KL to the reference.
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TRL. TR-DPO: every
            ``ref_model_sync_steps`` steps the reference becomes ``alpha * policy + (1 - alpha)
            * reference`` (``kithara.callbacks.SyncRefModelCallback``); needs a reference of
            its own (a frozen copy: no LoRA adapters, ``beta > 0``).
        epsilon / epsilon_high: TRL. Clipping range (``epsilon_high``: clip-higher, DAPO).
        num_generations_eval: TRL. Completions per prompt in ``evaluate()`` (default 1).
        log_completions / num_completions_to_print: TRL. Log sample completions each rollout.
        logprob_chunk_size: kithara. Sequence positions per chunk of the vocabulary
            projection when computing log-probs (peak memory; see docs/rl.md).
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **TrainingConfig.unsupported_arguments,
        **_GENERATION_NOT_HERE,
    }

    learning_rate: float = 1e-6
    logging_steps: int = 10
    per_device_train_batch_size: int = 8
    num_generations: int = 8
    max_prompt_length: int = 512
    max_completion_length: int = 512
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    num_iterations: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    stop_token_ids: tuple[int, ...] | None = None
    mask_truncated_completions: bool = False
    reward_weights: tuple[float, ...] | None = None
    beta: float = 0.0
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    epsilon: float = 0.2
    epsilon_high: float | None = None
    num_generations_eval: int | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = None
    logprob_chunk_size: int | None = 256

    def _normalise(self) -> None:
        super()._normalise()
        for name in ("stop_token_ids", "reward_weights"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                self._set(name, tuple(value))
        if self.epsilon_high is None:
            self._set("epsilon_high", self.epsilon)

    def _validate(self) -> None:
        super()._validate()
        if self.loss_chunk_size is not None:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size}: rollout trainers chunk their log-probs with "
                "logprob_chunk_size; set that instead and leave loss_chunk_size unset."
            )
        positive = {
            "num_generations": self.num_generations,
            "max_prompt_length": self.max_prompt_length,
            "max_completion_length": self.max_completion_length,
            "num_iterations": self.num_iterations,
        }
        for name, value in {
            **positive,
            "generation_batch_size": self.generation_batch_size,
            "steps_per_generation": self.steps_per_generation,
            "num_generations_eval": self.num_generations_eval,
            "logprob_chunk_size": self.logprob_chunk_size,
        }.items():
            if value is not None and value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {value}.")
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                f"Set generation_batch_size ({self.generation_batch_size}) or steps_per_generation "
                f"({self.steps_per_generation}), not both."
            )
        if self.steps_per_generation is not None and self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}): a rollout feeds whole updates."
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (online RL samples), got {self.temperature}.")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or (self.min_p is not None and not 0 <= self.min_p <= 1):
            raise ValueError(
                f"Need 0 < top_p <= 1, top_k >= 0, 0 <= min_p <= 1; got {self.top_p}, {self.top_k}, {self.min_p}."
            )
        if self.epsilon < 0 or self.epsilon_high is None or self.epsilon_high < 0:
            raise ValueError(f"epsilon and epsilon_high must be >= 0, got {self.epsilon}, {self.epsilon_high}.")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}.")
        check_sync_ref(self)
        if self.sync_ref_model and self.beta == 0:
            raise ValueError(
                "sync_ref_model=True with beta=0: without a KL term there is no reference to synchronize; "
                "set beta > 0 or sync_ref_model=False."
            )
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids}.")

    def rollout_sizes(self, batch_shards: int) -> tuple[int, int]:
        """``(completions per rollout, updates per rollout batch before reuse)`` on a mesh
        that splits the batch ``batch_shards`` ways, checked against ``num_generations``."""
        rows_per_micro = self.per_device_train_batch_size * batch_shards
        if self.generation_batch_size is not None:
            if self.generation_batch_size % rows_per_micro:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a multiple of "
                    f"per_device_train_batch_size x batch shards ({rows_per_micro})."
                )
            micro = self.generation_batch_size // rows_per_micro
            if micro % self.gradient_accumulation_steps:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) holds {micro} micro-batches of "
                    f"{rows_per_micro}; that must be a multiple of gradient_accumulation_steps "
                    f"({self.gradient_accumulation_steps})."
                )
        else:
            micro = self.steps_per_generation or self.gradient_accumulation_steps
        rows = rows_per_micro * micro
        if rows % self.num_generations:
            raise ValueError(
                f"A rollout holds {rows} completions (per_device_train_batch_size {self.per_device_train_batch_size}"
                f" x {batch_shards} batch shards x {micro} micro-batches), not a multiple of num_generations "
                f"({self.num_generations}); change one of them."
            )
        return rows, micro // self.gradient_accumulation_steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(RolloutConfig):
    """Settings of ``GRPOTrainer``: ``RolloutConfig``'s plus the GRPO loss family (TRL's names).

    Args:
        loss_type: TRL. ``"dapo"`` (TRL's default: token sum over the accumulated batch's
            tokens), ``"grpo"`` (per-sequence token mean), ``"bnpo"`` (per micro-batch token
            mean), ``"dr_grpo"`` (constant normaliser ``max_completion_length``), ``"cispo"``
            (clipped, detached ratio times the log-prob; ``epsilon_high`` is then an absolute
            cap, TRL suggests 5.0), ``"sapo"`` (a sigmoid gate instead of the clip) or
            ``"luspo"`` (sequence sums, mean over rows).
        scale_rewards: TRL. Divide advantages by the ``"group"`` std, the ``"batch"`` std,
            or ``"none"`` (``True``/``False`` mean ``"group"``/``"none"``).
        importance_sampling_level: TRL. ``"token"``, or ``"sequence"`` (GSPO).
        delta: TRL. Upper bound on the importance ratio (two-sided clipping); ``None``: off.
        use_bias_correction_kl: TRL. Multiply the k3 KL by the importance ratio (TRL's default).
        sapo_temperature_pos / sapo_temperature_neg: TRL. SAPO's gate temperatures.

    Example:
        >>> config = GRPOConfig(num_generations=4, max_completion_length=64, loss_type="dr_grpo",
        ...                     beta=0.04, epsilon_high=0.28, max_steps=200)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **RolloutConfig.unsupported_arguments,
        "top_entropy_quantile": "not supported yet.",
        "off_policy_mask_threshold": "not supported yet.",
    }

    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    delta: float | None = None
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def _normalise(self) -> None:
        super()._normalise()
        if isinstance(self.scale_rewards, bool):
            self._set("scale_rewards", "group" if self.scale_rewards else "none")

    def _validate(self) -> None:
        from kithara.naming import check_names
        from kithara.objectives.rl_losses import POLICY_LOSSES

        super()._validate()
        check_names(
            [self.loss_type],
            sorted(POLICY_LOSSES),
            "GRPOConfig.loss_type",
            what="loss type",
            unsupported={name: "TRL has it, kithara does not yet." for name in _TRL_ONLY_LOSSES},
            error=ValueError,
        )
        check_names([self.scale_rewards], SCALE_REWARDS, "GRPOConfig.scale_rewards", what="value", error=ValueError)
        check_names(
            [self.importance_sampling_level],
            IMPORTANCE_LEVELS,
            "GRPOConfig.importance_sampling_level",
            what="level",
            error=ValueError,
        )
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta caps the importance ratio from above: it must be > 1, got {self.delta}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig(RolloutConfig):
    """Settings of ``RLOOTrainer`` (TRL 1.16's): a sequence-level clipped loss, the
    leave-one-out baseline, and the KL (first-order, summed over the completion) taken out
    of the reward.

    Args:
        num_generations: TRL. 2, TRL's (k samples per prompt).
        beta: TRL. 0.05, TRL's: weight of the sequence KL subtracted from the reward.
        normalize_advantages: TRL. Normalise advantages over the batch.
        reward_clip_range: TRL. ``(low, high)`` to clip the weighted reward to.
    """

    num_generations: int = 2
    beta: float = 0.05
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None

    def _normalise(self) -> None:
        super()._normalise()
        if isinstance(self.reward_clip_range, Sequence) and not isinstance(self.reward_clip_range, str):
            self._set("reward_clip_range", tuple(float(x) for x in self.reward_clip_range))

    def _validate(self) -> None:
        super()._validate()
        if self.num_generations < 2:
            raise ValueError("RLOO needs num_generations >= 2: the baseline is the other samples' mean.")
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
            raise ValueError(f"reward_clip_range must be (low, high) with low <= high, got {clip}.")


KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(RolloutConfig):
    """Settings of ``PPOTrainer`` (TRL's experimental ``PPOConfig`` names and defaults).

    A rollout is ``per_device_train_batch_size x batch shards x gradient_accumulation_steps x
    num_mini_batches`` completions; it feeds ``num_mini_batches`` optimizer updates, and is
    gone over ``num_ppo_epochs`` times. Those two are the one source of truth:
    ``num_iterations`` and ``steps_per_generation`` follow from them (giving either with
    another value, or ``generation_batch_size``, is refused), and ``beta`` follows
    ``kl_coef`` (the reference exists whenever ``kl_coef > 0``).

    Args:
        num_generations: kithara. 1 (PPO has no groups); more samples each prompt k times.
        num_ppo_epochs: TRL. 4. Passes over each rollout (``num_iterations``).
        num_mini_batches: TRL. 1. Optimizer updates per pass over a rollout.
        kl_coef: TRL. 0.05. Weight of the per-token KL to the reference in the reward.
        kl_estimator: TRL. ``"k1"`` (``logp - ref``) or ``"k3"`` (``exp(ref - logp) - 1 -
            (ref - logp)``), the per-token KL in the reward.
        cliprange: TRL. 0.2. Clipping range of the policy ratio.
        vf_coef: TRL. 0.1. Weight of the value loss.
        cliprange_value: TRL. 0.2. Clipping range of the value around the rollout's value.
        gamma: TRL. 1.0. Discount factor.
        lam: TRL. 0.95. GAE's lambda.
        whiten_rewards: TRL. Whiten the per-token rewards (mean kept) before GAE.
        missing_eos_penalty: TRL. Subtracted from the score of completions that end
            without a stop token; ``None``: off.

    Example:
        >>> config = PPOConfig(num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.02,
        ...                    max_completion_length=64, max_steps=200)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **RolloutConfig.unsupported_arguments,
        "total_episodes": "set max_steps (optimizer updates) or num_train_epochs.",
        "response_length": "use max_completion_length.",
        "stop_token": "use stop_token_ids (default: the tokenizer's EOS).",
        "stop_token_id": "use stop_token_ids.",
        "local_rollout_forward_batch_size": "a rollout is scored in one jitted call.",
        "num_sample_generations": "use eval_dataset with an eval schedule.",
        "reward_model_path": "pass reward models or functions as reward_funcs.",
        "sft_model_path": "pass the policy as model.",
    }

    num_generations: int = 1
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    # Derived (see the class docstring): None means "follow the PPO names".
    num_iterations: int | None = None  # type: ignore[assignment]
    beta: float | None = None  # type: ignore[assignment]

    def _normalise(self) -> None:
        super()._normalise()
        if self.num_iterations is not None and self.num_iterations != self.num_ppo_epochs:
            raise ValueError(
                f"PPOConfig reuses each rollout num_ppo_epochs ({self.num_ppo_epochs}) times; num_iterations "
                f"({self.num_iterations}) says otherwise. Set num_ppo_epochs only."
            )
        self._set("num_iterations", self.num_ppo_epochs)
        if self.beta is not None and self.beta != self.kl_coef:
            raise ValueError(
                f"PPOConfig weighs the KL with kl_coef ({self.kl_coef}); beta ({self.beta}) says otherwise. "
                "Set kl_coef only."
            )
        self._set("beta", self.kl_coef)
        if self.generation_batch_size is not None:
            raise ValueError(
                "PPOConfig sizes a rollout with num_mini_batches (per_device_train_batch_size x batch shards x "
                "gradient_accumulation_steps x num_mini_batches completions); generation_batch_size is not used."
            )
        if isinstance(self.num_mini_batches, int) and isinstance(self.gradient_accumulation_steps, int):
            steps = self.num_mini_batches * self.gradient_accumulation_steps
            if self.steps_per_generation is not None and self.steps_per_generation != steps:
                raise ValueError(
                    f"PPOConfig makes steps_per_generation num_mini_batches x gradient_accumulation_steps ({steps}); "
                    f"got steps_per_generation={self.steps_per_generation}. Set num_mini_batches only."
                )
            self._set("steps_per_generation", steps)

    def _validate(self) -> None:
        from kithara.naming import check_names

        super()._validate()
        for name in ("num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}.")
        check_names([self.kl_estimator], KL_ESTIMATORS, "PPOConfig.kl_estimator", what="estimator", error=ValueError)
        for name in ("kl_coef", "cliprange", "vf_coef", "cliprange_value"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}.")
