"""Training callbacks: checkpointer, progress bar, TensorBoard, profiler."""

from kithara.callbacks.base import Callback, StepInfo
from kithara.callbacks.checkpointer import Checkpointer
from kithara.callbacks.profiler import Profiler
from kithara.callbacks.progress import ProgressBar
from kithara.callbacks.tensorboard import TensorBoardLogger

__all__ = ["Callback", "Checkpointer", "Profiler", "ProgressBar", "StepInfo", "TensorBoardLogger"]
