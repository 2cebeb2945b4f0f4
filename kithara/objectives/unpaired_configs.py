"""Configs of the unpaired preference trainers: ``KTOConfig`` and ``BCOConfig`` (TRL's names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from kithara.naming import check_names
from kithara.objectives import unpaired_losses
from kithara.objectives.configs import check_length, check_sync_ref, normalise_length
from kithara.trainer.config import TrainingConfig

SAMPLING_STRATEGIES = ("sequential", "random")
_COMMON_UNSUPPORTED = {
    "max_prompt_length": "TRL removed it; filter or shorten long prompts in the data, or lower max_length.",
    "max_completion_length": "TRL removed it; filter long completions in the data, or lower max_length.",
    "activation_offloading": "kithara's step is one XLA program; use gradient_checkpointing to save memory.",
    "pad_to_multiple_of": "kithara pads every row to max_length (one compiled step).",
    "dataset_num_proc": "each process tokenizes its own rows when its Dataloader is built.",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _UnpairedConfig(TrainingConfig):
    learning_rate: float = 1e-6
    logging_steps: int = 10
    beta: float = 0.1
    max_length: int = 1024
    truncation_mode: str = "keep_start"
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def _normalise(self) -> None:
        super()._normalise()
        normalise_length(self)

    def _validate(self) -> None:
        super()._validate()
        check_length(self, minimum=1)
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size must be >= 1, got {self.precompute_ref_batch_size}.")
        check_sync_ref(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KTOConfig(_UnpairedConfig):
    """Settings of ``KTOTrainer``: ``TrainingConfig``'s, plus the KTO loss and data.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's KTO default, 1e-6).
        logging_steps: TRL. 10, TRL's.
        beta: TRL. How far the policy may move from the reference.
        desirable_weight / undesirable_weight: TRL. Weights of the desirable and undesirable
            rows' losses (to balance unequal counts; TRL's Eq. 8 range is logged).
        loss_type: TRL. ``"kto"`` or ``"apo_zero_unpaired"`` (no KL rows).
        max_length: TRL. Tokens per row (``None`` is refused: rows have a fixed length).
        truncation_mode: kithara. ``"keep_start"`` (TRL 1.16 truncates the end) or ``"keep_end"``.
        precompute_ref_log_probs: TRL. Reference log-probs computed once before training.
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TRL. TR-DPO: every
            ``ref_model_sync_steps`` steps the reference becomes ``alpha * policy + (1 - alpha)
            * reference`` (``kithara.callbacks.SyncRefModelCallback``); needs a reference of
            its own (a frozen copy: no LoRA adapters, no precomputed log-probs).
        precompute_ref_batch_size: TRL. Rows per reference pass when precomputing (default 8).
        train_sampling_strategy: TRL. ``"sequential"`` (TRL's KTO default and requirement
            for ``loss_type="kto"``: a batch's KL rows are its own completions rotated) or
            ``"random"`` (refused for ``"kto"``, as TRL does).

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5, max_steps=200)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {**TrainingConfig.unsupported_arguments, **_COMMON_UNSUPPORTED}

    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    loss_type: str = "kto"
    train_sampling_strategy: str = "sequential"

    @property
    def calculate_kl(self) -> bool:
        """Whether the loss needs the mismatched KL rows (TRL's ``calculate_KL``)."""
        return self.loss_type in unpaired_losses.USES_KL

    def _validate(self) -> None:
        super()._validate()
        check_names([self.loss_type], unpaired_losses.KTO_LOSSES, "KTOConfig.loss_type", what="loss type",
                    error=ValueError)  # fmt: skip
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {self.desirable_weight}, "
                f"{self.undesirable_weight}."
            )
        check_names([self.train_sampling_strategy], SAMPLING_STRATEGIES, "train_sampling_strategy",
                    what="strategy", error=ValueError)  # fmt: skip
        if self.calculate_kl and self.train_sampling_strategy != "sequential":
            raise ValueError(
                f"loss_type={self.loss_type!r} estimates the KL term from each batch's own completions, rotated "
                "within the batch, which needs train_sampling_strategy='sequential' (TRL's rule); shuffle the data "
                "beforehand, or use loss_type='apo_zero_unpaired'."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BCOConfig(_UnpairedConfig):
    """Settings of ``BCOTrainer`` (TRL had one until 0.28, in ``trl.experimental`` last).

    Args:
        learning_rate: kithara's default 1e-6 (TRL's BCOConfig kept TrainingArguments' 5e-5).
        logging_steps: TRL. 10, TRL's.
        beta: TRL. Scale of the implicit reward ``beta * (log pi - log pi_ref)``.
        max_length: TRL. Tokens per row (``None`` is refused).
        truncation_mode: TRL. ``"keep_start"`` (kithara's default: the completion is kept)
            or ``"keep_end"`` (TRL's default; cuts the prompt's start).
        precompute_ref_log_probs: TRL. Reference log-probs computed once before training.
        sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps: TRL. TR-DPO: every
            ``ref_model_sync_steps`` steps the reference becomes ``alpha * policy + (1 - alpha)
            * reference`` (``kithara.callbacks.SyncRefModelCallback``); needs a reference of
            its own (a frozen copy: no LoRA adapters, no precomputed log-probs).
        precompute_ref_batch_size: kithara. Rows per reference pass when precomputing (default 8).
        train_sampling_strategy: kithara. ``"sequential"`` (TRL's BCO sampler) or ``"random"``.

        prompt_sample_size: TRL. Prompts of each kind the UDM density-ratio classifier is
            fitted on (with ``BCOTrainer(embedding_func=...)``).
        min_density_ratio / max_density_ratio: TRL. The UDM weights are clamped to this range.

    Example:
        >>> config = BCOConfig(beta=0.1, max_length=512, max_steps=200)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **TrainingConfig.unsupported_arguments,
        **_COMMON_UNSUPPORTED,
        "generate_during_eval": "generate with kithara.generate on the trained model after evaluation.",
    }

    train_sampling_strategy: str = "sequential"
    prompt_sample_size: int = 1024
    min_density_ratio: float = 0.5
    max_density_ratio: float = 10.0

    def _validate(self) -> None:
        super()._validate()
        check_names([self.train_sampling_strategy], SAMPLING_STRATEGIES, "train_sampling_strategy",
                    what="strategy", error=ValueError)  # fmt: skip
        if self.prompt_sample_size < 1:
            raise ValueError(f"prompt_sample_size must be >= 1, got {self.prompt_sample_size}.")
        if not 0 <= self.min_density_ratio <= self.max_density_ratio:
            raise ValueError(
                f"Need 0 <= min_density_ratio <= max_density_ratio, got {self.min_density_ratio}, "
                f"{self.max_density_ratio}."
            )
