"""Training objectives: ``Trainer`` subclasses that override the loss (and the step where needed)."""

from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.sft import SFTTrainer

__all__ = ["IterativeSFTTrainer", "SFTTrainer"]
