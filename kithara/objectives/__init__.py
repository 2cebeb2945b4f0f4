"""Training objectives: ``Trainer`` subclasses that override the loss (and the step where needed)."""

from kithara.objectives import dpo_losses
from kithara.objectives.dpo import DPOTrainer
from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.sft import SFTTrainer

__all__ = ["DPOTrainer", "IterativeSFTTrainer", "SFTTrainer", "dpo_losses"]
