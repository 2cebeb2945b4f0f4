"""Training objectives: ``Trainer`` subclasses that override the loss (and the step where needed)."""

from kithara.objectives import dpo_losses
from kithara.objectives.cycle import CycleTrainer
from kithara.objectives.cycle_models import TwoAdapters, TwoModels
from kithara.objectives.dpo import DPOTrainer
from kithara.objectives.grpo import GRPOTrainer
from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.ppo import PPOTrainer
from kithara.objectives.rloo import RLOOTrainer
from kithara.objectives.sft import SFTTrainer

__all__ = [
    "CycleTrainer",
    "DPOTrainer",
    "GRPOTrainer",
    "IterativeSFTTrainer",
    "PPOTrainer",
    "RLOOTrainer",
    "SFTTrainer",
    "TwoAdapters",
    "TwoModels",
    "dpo_losses",
]
