"""Settings of the online preference trainers (``OnlineDPOConfig``, ``XPOConfig``,
``NashMDConfig``) under TRL's names, on the rollout settings the online-RL trainers share."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

from kithara.naming import check_names
from kithara.objectives.rl_configs import RolloutConfig

ONLINE_LOSSES = ("sigmoid", "ipo")
_VLLM = "kithara samples with its own jitted KV-cache decoder on the training mesh; leave the vLLM options out."
_NOT_ONLINE = {
    "reward_model_path": "pass the reward model (a kithara.ScalarHeadModel or its directory) as reward_funcs.",
    "ds3_gather_for_generation": "kithara shards with its own device mesh; generation reads the sharded weights.",
    "trust_remote_code": "kithara loads no remote code.",
    **{
        name: _VLLM
        for name in (
            "vllm_model_impl",
            "vllm_structured_outputs_regex",
            "vllm_gpu_memory_utilization",
            "vllm_server_base_url",
            "vllm_server_host",
            "vllm_server_port",
            "vllm_server_timeout",
            "vllm_group_port",
            "vllm_tensor_parallel_size",
            "vllm_enable_sleep_mode",
        )
    },
}
# RolloutConfig fields that mean nothing to a DPO-style update on fresh pairs.
_GRPO_ONLY = {
    "epsilon": 0.2,
    "epsilon_high": 0.2,
    "mask_truncated_completions": False,
    "num_iterations": 1,
    "generation_batch_size": None,
    "steps_per_generation": None,
    "num_generations_eval": None,
}


def per_epoch(value: float | Sequence[float], epoch: int) -> float:
    """TRL's per-epoch schedule: ``value[epoch]``, the last entry after the list ends; a
    float is the same every epoch."""
    if isinstance(value, int | float):
        return float(value)
    return float(value[min(epoch, len(value) - 1)])


def _schedule(config: RolloutConfig, name: str) -> None:
    """A list of one value becomes that value (as TRL); longer lists become tuples."""
    value = getattr(config, name)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(f"{type(config).__name__}.{name} is an empty list; give a float or one per epoch.")
        config._set(name, float(value[0]) if len(value) == 1 else tuple(value))


def _values(value: float | Sequence[float]) -> tuple[float, ...]:
    return (float(value),) if isinstance(value, int | float) else tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineDPOConfig(RolloutConfig):
    """Settings of ``OnlineDPOTrainer`` (TRL's ``OnlineDPOConfig`` names and defaults).

    Every optimizer update samples fresh pairs: ``per_device_train_batch_size`` prompts per
    device and micro-batch, two completions each, as TRL counts its batch.

    Args:
        learning_rate: TRL. 5e-7, TRL's.
        per_device_train_batch_size: TRL. Prompts per device per micro-batch (8); each
            gives one pair of completions.
        max_new_tokens: TRL. 64. New tokens per completion at most (``max_completion_length``
            follows it).
        max_length: TRL. 512. Prompt plus completion; prompts lose tokens from the left to
            fit (``max_prompt_length`` is ``max_length - max_new_tokens``).
        temperature: TRL. 0.9. ``top_p``, ``top_k``, ``min_p`` as in TRL.
        missing_eos_penalty: TRL. Subtracted from the reward of a completion that ends
            without a stop token (reward functions only; a judge has no scores).
        beta: TRL. 0.1, or one value per epoch (the last one for the epochs after).
        loss_type: TRL. ``"sigmoid"`` (DPO) or ``"ipo"`` (TRL's Online DPO form, on summed
            log-probs: ``(margin - 1 / (2 beta))^2``), the functions of
            ``kithara.objectives.dpo_losses``.
        disable_dropout: TRL. Log-probs in the loss without dropout.
        reward_weights: TRL. One weight per reward function.

    Example:
        >>> config = OnlineDPOConfig(max_new_tokens=32, max_length=256, beta=[0.1, 0.05], max_steps=100)
        >>> config.max_prompt_length, config.beta_at(epoch=3)
        (224, 0.05)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {**RolloutConfig.unsupported_arguments, **_NOT_ONLINE}

    learning_rate: float = 5e-7
    num_generations: int = 2
    max_new_tokens: int = 64
    max_length: int = 512
    # Derived from max_new_tokens / max_length (the names GRPOTrainer reads).
    max_prompt_length: int | None = None  # type: ignore[assignment]
    max_completion_length: int | None = None  # type: ignore[assignment]
    temperature: float = 0.9
    missing_eos_penalty: float | None = None
    beta: float | tuple[float, ...] = 0.1  # type: ignore[assignment]
    loss_type: str = "sigmoid"
    disable_dropout: bool = True

    def beta_at(self, epoch: int) -> float:
        """``beta`` in ``epoch`` (0-based)."""
        return per_epoch(self.beta, epoch)

    def rollout_sizes(self, batch_shards: int) -> tuple[int, int]:
        """``(completions per rollout, updates per rollout)``: two completions of each of
        ``per_device_train_batch_size x batch shards x gradient_accumulation_steps``
        prompts, for one update."""
        return 2 * self.per_device_train_batch_size * batch_shards * self.gradient_accumulation_steps, 1

    def _normalise(self) -> None:
        super()._normalise()
        _schedule(self, "beta")
        for name, value in (
            ("max_completion_length", self.max_new_tokens),
            ("max_prompt_length", self.max_length - self.max_new_tokens),
        ):
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(
                    f"{type(self).__name__} derives {name} ({value}) from max_new_tokens={self.max_new_tokens} and "
                    f"max_length={self.max_length} (TRL's names); got {name}={given}. Set those two instead."
                )
            self._set(name, value)

    def _validate(self) -> None:
        if self.max_new_tokens < 1 or self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"Need 1 <= max_new_tokens < max_length (room for the prompt); got max_new_tokens="
                f"{self.max_new_tokens}, max_length={self.max_length}."
            )
        betas = _values(self.beta)
        # RolloutConfig checks a float beta; the schedule is checked here.
        given, self_beta = self.beta, betas[0]
        self._set("beta", self_beta)
        try:
            super()._validate()
        finally:
            self._set("beta", given)
        if any(b <= 0 for b in betas):
            raise ValueError(f"{type(self).__name__}.beta must be > 0 (every epoch's), got {self.beta}.")
        check_names(
            [self.loss_type],
            ONLINE_LOSSES,
            f"{type(self).__name__}.loss_type",
            what="loss type",
            unsupported={"hinge": "TRL's online trainers have sigmoid and ipo; DPOTrainer has the others."},
            error=ValueError,
        )
        if self.num_generations != 2:
            raise ValueError(
                f"{type(self).__name__} samples a pair per prompt: num_generations is 2, got {self.num_generations}."
            )
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}.")
        for name, default in _GRPO_ONLY.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} is a GRPO setting: online preference "
                    "trainers sample fresh pairs for every update (as TRL's); leave it out."
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class XPOConfig(OnlineDPOConfig):
    """Settings of ``XPOTrainer``: ``OnlineDPOConfig``'s plus TRL's ``alpha``.

    Args:
        alpha: TRL. 1e-5. Weight of the exploration term (``alpha`` times the policy's
            summed log-prob of the reference's completion, minimised); a float or one value
            per epoch.

    Example:
        >>> XPOConfig(alpha=[1e-4, 1e-5], max_new_tokens=16, max_length=64).alpha_at(epoch=0)
        0.0001
    """

    alpha: float | tuple[float, ...] = 1e-5

    def alpha_at(self, epoch: int) -> float:
        """``alpha`` in ``epoch`` (0-based)."""
        return per_epoch(self.alpha, epoch)

    def _normalise(self) -> None:
        super()._normalise()
        _schedule(self, "alpha")

    def _validate(self) -> None:
        super()._validate()
        if any(a < 0 for a in _values(self.alpha)):
            raise ValueError(f"XPOConfig.alpha must be >= 0, got {self.alpha}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NashMDConfig(OnlineDPOConfig):
    """Settings of ``NashMDTrainer``: ``OnlineDPOConfig``'s plus TRL's ``mixture_coef``.

    Args:
        mixture_coef: TRL. 0.5. The opponent samples from ``softmax(mixture_coef x
            reference logits + (1 - mixture_coef) x policy logits)`` (TRL's
            ``GeometricMixtureWrapper``); a float in [0, 1] or one value per epoch.

    Example:
        >>> NashMDConfig(mixture_coef=0.25, max_new_tokens=16, max_length=64).mixture_coef_at(epoch=2)
        0.25
    """

    mixture_coef: float | tuple[float, ...] = 0.5

    def mixture_coef_at(self, epoch: int) -> float:
        """``mixture_coef`` in ``epoch`` (0-based)."""
        return per_epoch(self.mixture_coef, epoch)

    def _normalise(self) -> None:
        super()._normalise()
        _schedule(self, "mixture_coef")

    def _validate(self) -> None:
        super()._validate()
        if any(not 0 <= m <= 1 for m in _values(self.mixture_coef)):
            raise ValueError(f"NashMDConfig.mixture_coef must be in [0, 1], got {self.mixture_coef}.")
        if self.loss_type != type(self).defaults()["loss_type"]:
            raise ValueError(
                f"NashMDConfig.loss_type={self.loss_type!r} would be ignored: Nash-MD's loss is its own (the "
                "preference REINFORCE term and the KL estimate; TRL ignores loss_type there too). Leave it out."
            )
