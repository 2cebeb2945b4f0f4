"""Training objectives beyond next-token cross-entropy."""

from kithara.objectives import dpo_losses
from kithara.objectives.dpo import DPOTrainer

__all__ = ["DPOTrainer", "dpo_losses"]
