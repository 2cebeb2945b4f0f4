"""Training objectives: ``Trainer`` subclasses that override the loss (and the step where needed)."""

from kithara.objectives import dpo_losses
from kithara.objectives.cycle import CycleTrainer
from kithara.objectives.cycle_models import TwoAdapters, TwoModels
from kithara.objectives.dpo import DPOTrainer
from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.sft import SFTTrainer

__all__ = ["CycleTrainer", "DPOTrainer", "IterativeSFTTrainer", "SFTTrainer", "TwoAdapters", "TwoModels", "dpo_losses"]
