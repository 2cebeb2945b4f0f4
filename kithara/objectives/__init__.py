"""Training objectives: ``Trainer`` subclasses that override the loss (and the step where needed)."""

from kithara.objectives import dpo_losses, ref_free_losses, reward_losses, unpaired_losses
from kithara.objectives.bco import BCOTrainer
from kithara.objectives.cpo import CPOTrainer
from kithara.objectives.cycle import CycleTrainer
from kithara.objectives.cycle_models import TwoAdapters, TwoModels
from kithara.objectives.dpo import DPOTrainer
from kithara.objectives.grpo import GRPOTrainer
from kithara.objectives.iterative_sft import IterativeSFTTrainer
from kithara.objectives.kto import KTOTrainer, UnpairedPreferenceTrainer
from kithara.objectives.nash_md import NashMDTrainer
from kithara.objectives.online_dpo import OnlineDPOTrainer
from kithara.objectives.orpo import ORPOTrainer
from kithara.objectives.pairwise import PairwiseTrainer
from kithara.objectives.ppo import PPOTrainer
from kithara.objectives.prm import PRMTrainer
from kithara.objectives.reward import RewardTrainer
from kithara.objectives.rloo import RLOOTrainer
from kithara.objectives.sft import SFTTrainer
from kithara.objectives.xpo import XPOTrainer

__all__ = [
    "BCOTrainer",
    "CPOTrainer",
    "CycleTrainer",
    "DPOTrainer",
    "GRPOTrainer",
    "IterativeSFTTrainer",
    "KTOTrainer",
    "NashMDTrainer",
    "ORPOTrainer",
    "OnlineDPOTrainer",
    "PPOTrainer",
    "PRMTrainer",
    "PairwiseTrainer",
    "RLOOTrainer",
    "RewardTrainer",
    "SFTTrainer",
    "TwoAdapters",
    "TwoModels",
    "UnpairedPreferenceTrainer",
    "XPOTrainer",
    "dpo_losses",
    "ref_free_losses",
    "reward_losses",
    "unpaired_losses",
]
