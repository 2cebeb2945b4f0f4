"""The objective trainers' configs: ``TrainingConfig`` plus each objective's settings,
under TRL's names (``SFTConfig``, ``DPOConfig``, ``IterativeSFTConfig``) where TRL has them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from kithara.data.formats import TRUNCATIONS
from kithara.naming import check_names
from kithara.objectives import dpo_losses
from kithara.trainer.config import TrainingConfig

SFT_DATASET_FORMATS = ("text", "prompt_completion", "conversational")
# Loss types TRL's DPOTrainer has and kithara's dpo_losses does not (yet).
_TRL_ONLY_DPO_LOSSES = {
    name: f"TRL has it, kithara does not yet; kithara's are {sorted(dpo_losses.LOSSES)}."
    for name in ("exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm")
}
# What CycleConfig.generation_kwargs may set; the trainer sets the rest of generate's arguments.
CYCLE_GENERATION_OPTIONS = ("temperature", "top_k", "top_p", "stop_token_ids")


def check_sync_ref(config: Any) -> None:
    """TR-DPO's settings (``sync_ref_model``, ``ref_model_mixup_alpha``,
    ``ref_model_sync_steps``, on DPO, KTO/BCO and the rollout configs): in range, and refused
    (not ignored) without ``sync_ref_model`` or with precomputed reference log-probs."""
    if not 0.0 <= config.ref_model_mixup_alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {config.ref_model_mixup_alpha}.")
    steps = config.ref_model_sync_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ref_model_sync_steps must be an int >= 1, got {steps!r}.")
    if config.sync_ref_model and getattr(config, "precompute_ref_log_probs", False):
        raise ValueError(
            "sync_ref_model=True with precompute_ref_log_probs=True: precomputed log-probs assume a fixed "
            "reference, and syncing would make them stale. Set one of them to False (TRL refuses this too)."
        )
    if not config.sync_ref_model:
        defaults = type(config).defaults()
        changed = [n for n in ("ref_model_mixup_alpha", "ref_model_sync_steps") if getattr(config, n) != defaults[n]]
        if changed:
            raise ValueError(f"{' and '.join(changed)} set but sync_ref_model=False; set sync_ref_model=True.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(TrainingConfig):
    """Settings of ``SFTTrainer``: ``TrainingConfig``'s, plus the data's.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's SFT default, 2e-5).
        logging_steps: TRL. 10, TRL's (the base ``TrainingConfig`` logs every step).
        max_length: TRL. Tokens per row; longer examples are truncated (``None``, TRL's "no
            truncation", is refused: kithara's rows have a fixed length).
        truncation_mode: TRL. ``"keep_start"`` (drop the end) or ``"keep_end"`` (drop the
            start; TRL deprecates it).
        packing: TRL. Pack several examples per row (needs a segment-aware model).
        completion_only_loss: TRL. Prompt-completion data: loss on the completion only;
            ``None`` (TRL's default) means ``True``.
        assistant_only_loss: TRL. Conversational data: loss on the assistant replies only.
        dataset_text_field: TRL. The field holding the text of text data.
        dataset_format: kithara. ``"text"``, ``"prompt_completion"`` or ``"conversational"``;
            ``None`` reads it off the first row's fields.
        length_buckets: kithara. Row lengths to pad each batch to (the smallest that fits);
            ``None`` pads every row to ``max_length``.

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = SFTConfig(output_dir="runs/sft", max_length=512, num_train_epochs=2,
        ...                    assistant_only_loss=True)
    """

    learning_rate: float = 2e-5
    logging_steps: int = 10
    max_length: int = 1024
    truncation_mode: str = "keep_start"
    packing: bool = False
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    dataset_text_field: str = "text"
    dataset_format: str | None = None
    length_buckets: tuple[int, ...] | None = None

    def _normalise(self) -> None:
        super()._normalise()
        normalise_length(self)
        _normalise_buckets(self)

    def _validate(self) -> None:
        super()._validate()
        check_length(self, minimum=1)
        if self.dataset_format is not None and self.dataset_format not in SFT_DATASET_FORMATS:
            check_names([self.dataset_format], SFT_DATASET_FORMATS, "dataset_format", what="format", error=ValueError)
        if not self.dataset_text_field:
            raise ValueError("dataset_text_field must name a field, got ''.")
        _check_buckets(self, minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(TrainingConfig):
    """Settings of ``DPOTrainer``: ``TrainingConfig``'s, plus the preference loss and data.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's DPO default, 1e-6).
        logging_steps: TRL. 10, TRL's (the base ``TrainingConfig`` logs every step).
        beta: TRL. How far the policy may move from the reference (IPO's tau).
        loss_type: TRL. A loss name of ``kithara.objectives.dpo_losses.LOSSES``, or a list of
            them to add up (TRL 1.x); stored as a tuple. RPO (TRL 0.x's ``rpo_alpha``) is
            ``["sigmoid", "sft"]`` with ``loss_weights=[1.0, alpha]``.
        loss_weights: TRL. One weight per ``loss_type`` entry; ``None`` weighs each 1.0.
        label_smoothing: TRL. Robust DPO's label-flip probability (in [0, 0.5)) and the
            sigmoid loss's conservative smoothing.
        precompute_ref_log_probs: TRL. Compute the reference log-probs once before training
            and drop the reference model.
        max_length: TRL. Tokens per chosen or rejected row (``None`` is refused).
        truncation_mode: TRL. ``"keep_end"`` (TRL: ``"keep_start"``) cuts the same prompt
            tokens from the front of both rows; ``"keep_start"`` cuts the end of each row.
        sync_ref_model: TRL. TR-DPO: every ``ref_model_sync_steps`` steps, move the reference
            toward the policy (``kithara.callbacks.SyncRefModelCallback``). Needs a reference
            of its own (``ref_model``, or the frozen copy of a model without LoRA adapters);
            refused with LoRA adapters and with ``precompute_ref_log_probs``, as in TRL.
        ref_model_mixup_alpha: TRL. TR-DPO's alpha, in [0, 1]:
            ``ref = alpha * policy + (1 - alpha) * ref``.
        ref_model_sync_steps: TRL. TR-DPO's tau: sync on every multiple of this step.

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = DPOConfig(output_dir="runs/dpo", beta=0.1, loss_type=["sigmoid", "sft"],
        ...                    loss_weights=[1.0, 1.0], max_steps=500)
        >>> config.loss_weight_map()
        {'sigmoid': 1.0, 'sft': 1.0}
    """

    unsupported_arguments: ClassVar[Mapping[str, str]] = {
        **TrainingConfig.unsupported_arguments,
        "rpo_alpha": "TRL removed it in 0.29; use loss_type=['sigmoid', 'sft'], loss_weights=[1.0, rpo_alpha].",
        "max_prompt_length": "TRL removed it in 0.29; filter or shorten long prompts in the data, or lower "
        "max_length (truncation_mode='keep_end' cuts prompts first).",
        "max_completion_length": "TRL removed it in 0.29; filter long completions in the data, or lower max_length.",
    }

    learning_rate: float = 1e-6
    logging_steps: int = 10
    beta: float = 0.1
    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = False
    max_length: int = 1024
    truncation_mode: str = "keep_end"
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def loss_weight_map(self) -> dict[str, float]:
        """``{loss name: weight}``, the form ``DPOTrainer`` and ``dpo_losses.combined_loss`` take."""
        weights = self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_type)
        return dict(zip(self.loss_type, (float(w) for w in weights), strict=True))

    def _normalise(self) -> None:
        super()._normalise()
        normalise_length(self)
        if isinstance(self.loss_type, str):
            self._set("loss_type", (self.loss_type,))
        elif isinstance(self.loss_type, Sequence):
            self._set("loss_type", tuple(self.loss_type))
        if isinstance(self.loss_weights, Sequence) and not isinstance(self.loss_weights, str):
            self._set("loss_weights", tuple(self.loss_weights))

    def _validate(self) -> None:
        super()._validate()
        check_length(self, minimum=1)
        if not self.loss_type:
            raise ValueError("loss_type is empty; give a name such as 'sigmoid' or a list of names.")
        repeated = sorted({n for n in self.loss_type if self.loss_type.count(n) > 1})
        if repeated:
            raise ValueError(f"loss_type names {repeated} more than once; give each loss once, with its weight.")
        check_names(
            self.loss_type,
            dpo_losses.LOSSES,
            "Unknown DPO loss (DPOConfig.loss_type)",
            what="loss type",
            unsupported=_TRL_ONLY_DPO_LOSSES,
            error=ValueError,
        )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights must have one weight per loss_type entry: got {len(self.loss_weights)} weights for "
                f"{len(self.loss_type)} loss types {list(self.loss_type)}."
            )
        dpo_losses.loss_weights(self.loss_weight_map(), beta=self.beta, label_smoothing=self.label_smoothing)
        check_sync_ref(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSFTConfig(TrainingConfig):
    """Settings of ``IterativeSFTTrainer`` (TRL had one until 0.23).

    Args:
        learning_rate: kithara's default 1e-5 (TRL's IterativeSFTConfig: 5e-5).
        max_length: TRL. Tokens per row, at least 2 (TRL: ``None``, no truncation).
        truncation_mode: TRL. ``"keep_end"`` (drop the start) or ``"keep_start"`` (drop the end).
        length_buckets: kithara. Row lengths to pad each step to (each in [2, max_length]);
            ``None`` pads every row to ``max_length``.
        disable_tqdm: TRL. ``True`` by default here: the caller's loop makes the steps, so
            there is no total to show progress against.

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = IterativeSFTConfig(max_length=512, truncation_mode="keep_end", learning_rate=1e-5)
    """

    learning_rate: float = 1e-5
    max_length: int = 512
    truncation_mode: str = "keep_end"
    length_buckets: tuple[int, ...] | None = None
    disable_tqdm: bool = True

    def _normalise(self) -> None:
        super()._normalise()
        normalise_length(self)
        _normalise_buckets(self)

    def _validate(self) -> None:
        super()._validate()
        check_length(self, minimum=2)
        _check_buckets(self, minimum=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CycleConfig(TrainingConfig):
    """Settings of ``CycleTrainer`` (no TRL counterpart). Its batch is counted in texts of
    each language across all devices, so ``per_device_train_batch_size``,
    ``per_device_eval_batch_size`` and ``gradient_accumulation_steps`` stay at their defaults.

    Args:
        batch_size_per_side: kithara. Texts of each language per cycle step, across all devices.
        max_length: kithara. Tokens per training row, at least 4 (longer rows lose their end).
        max_new_tokens: kithara. Tokens each synthetic translation may have.
        separator: kithara. Text between source and target in a causal side's rows.
        generation_kwargs: kithara. Sampling options for synthetic text: ``temperature``,
            ``top_k``, ``top_p``, ``stop_token_ids`` (default greedy, stopping at EOS).

    See ``TrainingConfig`` for the rest.

    Example:
        >>> config = CycleConfig(max_steps=200, batch_size_per_side=16, max_length=48, max_new_tokens=16,
        ...                      learning_rate=1e-3)
    """

    batch_size_per_side: int = 8
    max_length: int = 64
    max_new_tokens: int = 32
    separator: str = " ="
    generation_kwargs: dict[str, Any] | None = None

    def _validate(self) -> None:
        super()._validate()
        if self.batch_size_per_side < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size_per_side and max_new_tokens must be >= 1, got {self.batch_size_per_side}, "
                f"{self.max_new_tokens}."
            )
        check_length(self, minimum=4)
        for name, default in (
            ("per_device_train_batch_size", 1),
            ("per_device_eval_batch_size", None),
            ("gradient_accumulation_steps", 1),
        ):
            if getattr(self, name) != default:
                raise ValueError(
                    f"CycleConfig counts its batch in texts per side across all devices: set batch_size_per_side, "
                    f"not {name} ({getattr(self, name)})."
                )
        check_names(
            self.generation_kwargs or {},
            CYCLE_GENERATION_OPTIONS,
            "CycleConfig.generation_kwargs",
            what="option",
            unsupported={
                "do_sample": "set temperature > 0 to sample.",
                "max_new_tokens": "set CycleConfig.max_new_tokens.",
                "seed": "the trainer derives the sampling seed from CycleConfig.seed.",
            },
            error=ValueError,
        )


def check_length(config: Any, minimum: int) -> None:
    """Refuses ``max_length`` below ``minimum`` and an unknown ``truncation_mode``."""
    if config.max_length < minimum:
        raise ValueError(f"max_length must be >= {minimum}, got {config.max_length}.")
    if getattr(config, "truncation_mode", TRUNCATIONS[0]) not in TRUNCATIONS:
        raise ValueError(f"truncation_mode must be one of {TRUNCATIONS}, got {config.truncation_mode!r}.")


def normalise_length(config: Any) -> None:
    """Refuses ``max_length=None``: rows have a fixed length."""
    if config.max_length is None:
        raise ValueError(
            f"{type(config).__name__}: max_length=None (TRL: no truncation) is not supported; kithara's rows have "
            "a fixed length, so give a number of tokens."
        )


def _normalise_buckets(config: Any) -> None:
    """``length_buckets`` from any sequence of ints (a YAML list) as a sorted tuple without repeats."""
    buckets = config.length_buckets
    if isinstance(buckets, Sequence) and not isinstance(buckets, str):
        whole = all(isinstance(b, int) and not isinstance(b, bool) for b in buckets)
        config._set("length_buckets", tuple(sorted(set(buckets))) if whole else tuple(buckets))


def _check_buckets(config: Any, minimum: int) -> None:
    buckets = config.length_buckets
    if buckets is None:
        return
    if not buckets or buckets[0] < minimum or buckets[-1] > config.max_length:
        raise ValueError(
            f"length_buckets must be row lengths in [{minimum}, max_length={config.max_length}], got {list(buckets)}."
        )
