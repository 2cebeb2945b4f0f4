"""Configs of the reference-free pairwise trainers: ``ORPOConfig`` and ``CPOConfig`` (SimPO and
AlphaPO are CPO loss types), TRL's names and defaults (``trl/experimental/orpo``, ``cpo``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import ClassVar

from kithara.naming import check_names
from kithara.objectives.configs import check_length, normalise_length
from kithara.objectives.ref_free_losses import AVERAGED_LOSSES, CPO_LOSSES, SMOOTHED_LOSSES
from kithara.trainer.config import TrainingConfig

logger = logging.getLogger(__name__)

# TRL options of ORPOConfig / CPOConfig that kithara has no field for, and why.
_NOT_FOR_PAIRWISE = {
    "ref_model": "this objective is reference-free: it trains on the policy's own log-probs (use DPOTrainer for "
    "a reference model).",
    "precompute_ref_log_probs": "this objective is reference-free: there are no reference log-probs.",
    "max_completion_length": "TRL reads it for encoder-decoder models only; kithara's pairwise trainers are "
    "decoder-only: max_length bounds prompt + completion.",
    "max_prompt_length": "TRL removed it; truncation_mode='keep_end' cuts the prompt first, or filter long prompts.",
    "is_encoder_decoder": "the pairwise trainers take decoder-only (causal) models.",
    "disable_dropout": "kithara builds its decoders with keras-hub's dropout=0 (from Hugging Face checkpoints too); "
    "build a keras-hub preset that sets dropout with dropout=0 instead.",
    "padding_value": "padding is masked out of every log-prob and loss; its token id never matters.",
    "generate_during_eval": "not supported yet; sample with kithara.generate on trainer.model after evaluate().",
    "trust_remote_code": "kithara builds its models itself and runs no model code from a checkpoint.",
    "dataset_num_proc": "rows are tokenized once, in this process, when the Dataloader is built.",
    "rpo_alpha": "a DPO option; CPO's NLL weight is cpo_alpha.",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairwiseConfig(TrainingConfig):
    """What ``ORPOConfig`` and ``CPOConfig`` share: TRL's learning rate and logging defaults,
    ``beta``, and the preference data's length and truncation."""

    unsupported_arguments: ClassVar[Mapping[str, str]] = {**TrainingConfig.unsupported_arguments, **_NOT_FOR_PAIRWISE}

    learning_rate: float = 1e-6
    logging_steps: int = 10
    beta: float = 0.1
    max_length: int = 1024
    truncation_mode: str = "keep_start"

    def _normalise(self) -> None:
        super()._normalise()
        normalise_length(self)

    def _validate(self) -> None:
        super()._validate()
        check_length(self, minimum=1)
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ValueError(f"beta must be a positive number, got {self.beta}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOConfig(PairwiseConfig):
    """Settings of ``ORPOTrainer`` (TRL's ``trl.experimental.orpo.ORPOConfig``): ``TrainingConfig``'s,
    plus the odds-ratio weight and the data's length.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's ORPO default, 1e-6; ORPO trains from the
            base model, so runs usually raise it, e.g. 8e-6 in the paper).
        logging_steps: TRL. 10, TRL's.
        beta: TRL. Weight of the odds-ratio term added to the chosen NLL (the paper's lambda).
        max_length: TRL. Tokens per chosen or rejected row (prompt + completion; ``None`` is refused).
        truncation_mode: kithara. ``"keep_start"`` (TRL's behaviour) cuts the end of a row that is
            too long; ``"keep_end"`` cuts the same prompt tokens from the front of both rows.

    TRL's ``disable_dropout``, ``padding_value``, ``max_completion_length``,
    ``generate_during_eval``, ``is_encoder_decoder``, ``dataset_num_proc`` and
    ``trust_remote_code`` are refused with the reason. See ``TrainingConfig`` for the rest.

    Example:
        >>> config = ORPOConfig(output_dir="runs/orpo", beta=0.1, learning_rate=8e-6, max_length=1024)
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPOConfig(PairwiseConfig):
    """Settings of ``CPOTrainer`` (TRL's ``trl.experimental.cpo.CPOConfig``): CPO, SimPO and
    AlphaPO, all reference-free.

    Args:
        learning_rate: TRL. Peak learning rate (TRL's default, 1e-6).
        logging_steps: TRL. 10, TRL's.
        beta: TRL. Temperature of the pairwise loss (IPO's tau; SimPO's paper uses 2 to 10).
        label_smoothing: TRL. Conservative smoothing of the ``sigmoid`` and ``simpo`` losses, in
            [0, 0.5); refused with the losses that would ignore it.
        loss_type: TRL. ``"sigmoid"`` (CPO), ``"hinge"`` (SLiC), ``"ipo"``, ``"simpo"`` or
            ``"alphapo"``, which (as in TRL) becomes ``"simpo"`` with ``cpo_alpha=0.0``. ``ipo``
            and ``simpo`` compare per-token mean log-probs, the others summed ones.
        cpo_alpha: TRL. Weight of the NLL of the chosen completions (CPO's behaviour-cloning
            term); 0 for SimPO.
        simpo_gamma: TRL. SimPO's target reward margin (``loss_type="simpo"`` only).
        alpha: TRL. AlphaPO's reward shape ``(1 - p^-alpha) / alpha`` for every loss type; 0 keeps
            the log-probs.
        max_length: TRL. Tokens per chosen or rejected row (prompt + completion).
        truncation_mode: kithara. ``"keep_start"`` (TRL's behaviour) or ``"keep_end"``.

    Deliberate differences from TRL: ``loss_type="alphapo"`` refuses a ``cpo_alpha`` it would
    overwrite (TRL sets 0 silently), and ``simpo_gamma`` or ``label_smoothing`` that the loss
    type would ignore are refused.

    Example:
        >>> simpo = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, learning_rate=1e-6)
        >>> alphapo = CPOConfig(loss_type="alphapo", alpha=0.25, beta=2.0)
        >>> (alphapo.loss_type, alphapo.cpo_alpha)
        ('simpo', 0.0)
    """

    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0

    @property
    def averages_logps(self) -> bool:
        """Whether the loss compares per-token mean log-probs (``ipo``, ``simpo``), not sums."""
        return self.loss_type in AVERAGED_LOSSES

    def _normalise(self) -> None:
        super()._normalise()
        if self.loss_type == "alphapo":  # TRL's CPOConfig.__post_init__: SimPO without the NLL term
            if self.cpo_alpha not in (0.0, 1.0):
                raise ValueError(
                    f"loss_type='alphapo' is SimPO with cpo_alpha=0 (TRL sets it), so cpo_alpha={self.cpo_alpha} "
                    "would be overwritten; for AlphaPO with an NLL term use loss_type='simpo' with alpha= and "
                    "cpo_alpha=."
                )
            if self.alpha == 0.0:
                logger.warning(
                    "CPOConfig(loss_type='alphapo') with alpha=0.0 is plain SimPO; set alpha (e.g. 0.25) for "
                    "AlphaPO's reward shape."
                )
            self._set("loss_type", "simpo")
            self._set("cpo_alpha", 0.0)

    def _validate(self) -> None:
        super()._validate()
        check_names(
            [self.loss_type],
            [*CPO_LOSSES, "alphapo"],
            "Unknown CPO loss (CPOConfig.loss_type)",
            what="loss type",
            error=ValueError,
        )
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in SMOOTHED_LOSSES:
            raise ValueError(
                f"label_smoothing={self.label_smoothing} would be ignored: loss_type={self.loss_type!r} has no "
                f"smoothing (only {list(SMOOTHED_LOSSES)} do)."
            )
        if self.simpo_gamma != 0.5 and self.loss_type != "simpo":
            raise ValueError(
                f"simpo_gamma={self.simpo_gamma} would be ignored: it is the target margin of loss_type='simpo' "
                f"(got {self.loss_type!r})."
            )
        for name in ("cpo_alpha", "simpo_gamma", "alpha"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}.")
        if self.cpo_alpha < 0:
            raise ValueError(f"cpo_alpha must be >= 0 (the weight of the chosen NLL), got {self.cpo_alpha}.")
