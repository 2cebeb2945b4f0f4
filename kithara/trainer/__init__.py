"""The base Trainer, its state, step and losses."""

from kithara.trainer.losses import LossOutput, next_token_cross_entropy
from kithara.trainer.state import TrainState
from kithara.trainer.trainer import Trainer

__all__ = ["LossOutput", "TrainState", "Trainer", "next_token_cross_entropy"]
