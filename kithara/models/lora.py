"""LoRA adapters on chosen projections of a keras-hub backbone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras

from kithara.models.families import PROJECTIONS

# Hugging Face module names (PEFT's target_modules) of kithara's projection names.
HF_PROJECTIONS = {
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "attention_output",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: ``W x + (alpha / rank) * B A x`` on the chosen projections.

    Args:
        rank: rank of the ``A`` and ``B`` factors.
        alpha: scaling numerator; defaults to ``rank`` (scale 1).
        targets: projections that get adapters, from ``query``, ``key``, ``value``,
            ``attention_output``, ``gate``, ``up``, ``down``, or ``("all",)``.
        seed: seed of the ``A`` initialisation (``B`` starts at zero).

    Example:
        >>> LoraConfig(rank=16, alpha=32, targets=("query", "key", "value", "attention_output"))
    """

    rank: int = 8
    alpha: float | None = None
    targets: Sequence[str] = ("query", "value")
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}.")
        targets = tuple(self.targets)
        if targets == ("all",):
            targets = PROJECTIONS
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown or not targets:
            raise ValueError(f"Unknown LoRA targets {unknown or targets}; choose from {PROJECTIONS} or ('all',).")
        object.__setattr__(self, "targets", targets)

    @classmethod
    def from_peft(cls, peft_config: Any) -> LoraConfig:
        """The same adapters as a ``peft.LoraConfig`` (``r``, ``lora_alpha``,
        ``target_modules`` in Hugging Face names such as ``q_proj`` or ``"all-linear"``).
        Settings kithara's adapters cannot reproduce (dropout, rsLoRA, DoRA, biases) are
        refused rather than ignored."""
        refused = {
            "lora_dropout": getattr(peft_config, "lora_dropout", 0.0) or None,
            "use_rslora": getattr(peft_config, "use_rslora", False) or None,
            "use_dora": getattr(peft_config, "use_dora", False) or None,
            "bias": None if getattr(peft_config, "bias", "none") == "none" else peft_config.bias,
        }
        refused = {k: v for k, v in refused.items() if v is not None}
        if refused:
            raise ValueError(f"peft_config sets {refused}, which kithara's LoRA does not support; leave them unset.")
        modules = peft_config.target_modules
        if modules is None or modules == "all-linear":
            targets: tuple[str, ...] = ("all",)
        else:
            names = [modules] if isinstance(modules, str) else list(modules)
            unknown = sorted(n for n in names if n not in HF_PROJECTIONS)
            if unknown:
                raise ValueError(
                    f"peft_config.target_modules {unknown} are not projections kithara knows; use "
                    f"{sorted(HF_PROJECTIONS)} or 'all-linear'."
                )
            wanted = {HF_PROJECTIONS[n] for n in names}
            targets = tuple(p for p in PROJECTIONS if p in wanted)  # peft keeps a set: a fixed order
        return cls(rank=int(peft_config.r), alpha=float(peft_config.lora_alpha), targets=targets)


def enable_lora(backbone: keras.Model, config: LoraConfig, layer_names: dict[str, str]) -> int:
    """Freezes every weight of ``backbone`` and adds adapters to the target projections.

    Returns the number of layers that received an adapter.
    """
    wanted = {layer_names[t] for t in config.targets}
    layers = [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]
    backbone.trainable = True
    for layer in layers:
        layer.trainable = False
    count = 0
    for layer in layers:
        if layer.name in wanted and hasattr(layer, "enable_lora"):
            layer.trainable = True
            layer.enable_lora(
                config.rank,
                lora_alpha=config.alpha if config.alpha is not None else config.rank,
                a_initializer=keras.initializers.HeUniform(seed=config.seed + count),
            )
            for weight in layer.weights:  # the frozen kernel, and a bias if the layer has one
                weight.trainable = weight.path.rsplit("/", 1)[-1].startswith("lora_kernel")
            count += 1
    if count == 0:
        raise ValueError(f"No layer of {backbone.name} matches the LoRA targets {config.targets} ({sorted(wanted)}).")
    return count
