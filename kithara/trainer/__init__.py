"""The base Trainer, its state, step and losses."""

from kithara.trainer.losses import LossOutput, next_token_cross_entropy
from kithara.trainer.progress import TrainerState
from kithara.trainer.state import TrainState
from kithara.trainer.trainer import DataPlan, Trainer

__all__ = ["DataPlan", "LossOutput", "TrainState", "Trainer", "TrainerState", "next_token_cross_entropy"]
