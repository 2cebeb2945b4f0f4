"""Training callbacks: progress bar, TensorBoard, profiler (checkpointing builds on these)."""

from kithara.callbacks.base import Callback
from kithara.callbacks.profiler import Profiler
from kithara.callbacks.progress import ProgressBar
from kithara.callbacks.tensorboard import TensorBoardLogger

__all__ = ["Callback", "Profiler", "ProgressBar", "TensorBoardLogger"]
