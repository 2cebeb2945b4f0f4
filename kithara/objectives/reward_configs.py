"""Configs of the reward-model trainers: ``RewardConfig`` (TRL 1.16's names) and ``PRMConfig``
(TRL's PRMConfig, removed from TRL in 0.29; its names as TRL 0.24 had them)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import ClassVar

from kithara.naming import check_names
from kithara.objectives import reward_losses
from kithara.trainer.config import TrainingConfig

_DATA_BY_KITHARA = "kithara encodes each process's rows once, in the Dataloader; there is nothing to parallelise."
_COMMON_UNSUPPORTED = {
    "dataset_num_proc": _DATA_BY_KITHARA,
    "trust_remote_code": "kithara never runs code from a model directory.",
    "activation_offloading": "XLA schedules activation memory itself; kithara has no offloading switch.",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig(TrainingConfig):
    """Settings of ``RewardTrainer``: ``TrainingConfig``'s, plus the reward model's.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's reward default, 1e-4).
        logging_steps: TRL. 10, TRL's (the base ``TrainingConfig`` logs every step).
        max_length: TRL. Tokens per chosen or rejected sequence (prompt + answer + EOS);
            a pair with a longer one is skipped, as TRL filters it (``None``, TRL's "no
            filtering", is refused: kithara's rows have a fixed length).
        disable_dropout: TRL. Run the model without dropout while training (``training=False``
            in its forward pass).
        center_rewards_coefficient: TRL. Adds ``coefficient * mean((r_chosen + r_rejected) ** 2)``
            to the loss, pulling rewards towards mean zero (TRL recommends 0.01); ``None`` off.
        loss_type: kithara. ``"ranking"`` (Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected
            - margin)``, TRL's only loss).
        margin: kithara. The margin of rows without a ``margin`` column (0.0: TRL's loss
            without margins).

    TRL options without a kithara field (``eos_token``, ``pad_to_multiple_of``,
    ``chat_template_path``, ``dataset_num_proc``, ...) are refused naming what to do instead.
    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = RewardConfig(loss_type="ranking", margin=0.1, max_length=512,
        ...                       center_rewards_coefficient=0.01)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **TrainingConfig.unsupported_arguments,
        **_COMMON_UNSUPPORTED,
        "eos_token": "the tokenizer's EOS ends each sequence; pass a tokenizer whose eos_token is the one you want.",
        "pad_token": "TRL deprecated it; padding positions are masked in kithara, so the pad id does not matter.",
        "pad_to_multiple_of": "rows are padded to max_length (one compiled step); choose max_length instead.",
        "chat_template_path": "pass kithara.Tokenizer(backend, chat_template=...) as processing_class.",
    }

    learning_rate: float = 1e-4
    logging_steps: int = 10
    max_length: int = 1024
    disable_dropout: bool = True
    center_rewards_coefficient: float | None = None
    loss_type: str = "ranking"
    margin: float = 0.0

    def _normalise(self) -> None:
        super()._normalise()
        _refuse_unbounded(self, "max_length")

    def _validate(self) -> None:
        super()._validate()
        _refuse_loss_chunking(self)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (an answer token and EOS), got {self.max_length}.")
        check_names(
            [self.loss_type], reward_losses.LOSSES, "RewardConfig.loss_type", what="loss type", error=ValueError
        )
        if not math.isfinite(self.margin):
            raise ValueError(f"margin must be a finite number, got {self.margin}.")
        coefficient = self.center_rewards_coefficient
        if coefficient is not None and not (math.isfinite(coefficient) and coefficient >= 0):
            raise ValueError(f"center_rewards_coefficient must be a number >= 0 or None, got {coefficient}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PRMConfig(TrainingConfig):
    """Settings of ``PRMTrainer`` (TRL's ``PRMConfig``, which TRL 0.29 removed).

    Args:
        learning_rate: TRL. Peak learning rate (TRL's PRM default, 1e-5).
        logging_steps: TRL. 10, TRL's.
        max_length: TRL. Tokens per row (prompt + steps); longer rows lose their end (steps
            whose label falls past it are not trained on). ``None`` is refused.
        max_prompt_length: TRL. Keep at most this many prompt tokens (its end, after BOS).
            TRL 0.24 has the field (default 512) but never reads it; ``None`` (the default
            here) keeps TRL's behaviour.
        max_completion_length: TRL. Keep the first this many tokens of the joined steps;
            ``None`` keeps them all.
        disable_dropout: TRL. Run the model without dropout while training.
        step_separator: TRL. Text appended to every step; the last token of step + separator
            carries the step's label (with a separator that tokenizes to nothing, the step's own
            last token).
        train_on_last_step_only: TRL. Training rows label only their last step (evaluation
            rows label every step, as TRL's).

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = PRMConfig(step_separator="\\n", max_length=512, train_on_last_step_only=False)
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {**TrainingConfig.unsupported_arguments, **_COMMON_UNSUPPORTED}

    learning_rate: float = 1e-5
    logging_steps: int = 10
    max_length: int = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    disable_dropout: bool = True
    step_separator: str = "\n"
    train_on_last_step_only: bool = False

    def _normalise(self) -> None:
        super()._normalise()
        _refuse_unbounded(self, "max_length")

    def _validate(self) -> None:
        super()._validate()
        _refuse_loss_chunking(self)
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None where allowed), got {value}.")


def _refuse_unbounded(config: TrainingConfig, name: str) -> None:
    if getattr(config, name) is None:
        raise ValueError(
            f"{type(config).__name__}: {name}=None (TRL: no limit) is not supported; kithara's rows have a fixed "
            "length, so give a number of tokens."
        )


def _refuse_loss_chunking(config: TrainingConfig) -> None:
    """Reward models score with a small head: there are no vocabulary logits to chunk."""
    if config.loss_chunk_size is not None:
        raise ValueError(
            f"{type(config).__name__}: loss_chunk_size={config.loss_chunk_size} chunks a language model's "
            "vocabulary logits; a reward model's head has none. Leave loss_chunk_size unset."
        )
