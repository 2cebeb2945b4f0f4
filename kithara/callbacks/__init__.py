"""Training callbacks: checkpointer, progress bar, TensorBoard, profiler, and the callbacks
TRL users know (BEMA, reference-model sync, completions, win rate, merged model)."""

from kithara.callbacks.base import Callback, StepInfo
from kithara.callbacks.bema import BEMACallback
from kithara.callbacks.checkpointer import Checkpointer
from kithara.callbacks.log_completions import LogCompletionsCallback
from kithara.callbacks.merge_model import MergeConfig, MergeModelCallback
from kithara.callbacks.mlflow_logger import MLflowLogger
from kithara.callbacks.profiler import Profiler
from kithara.callbacks.progress import ProgressBar, RichProgressCallback
from kithara.callbacks.sync_ref import SyncRefModelCallback
from kithara.callbacks.tensorboard import TensorBoardLogger
from kithara.callbacks.wandb_logger import WandbLogger
from kithara.callbacks.win_rate import WinRateCallback

__all__ = [
    "BEMACallback",
    "Callback",
    "Checkpointer",
    "LogCompletionsCallback",
    "MLflowLogger",
    "MergeConfig",
    "MergeModelCallback",
    "Profiler",
    "ProgressBar",
    "RichProgressCallback",
    "StepInfo",
    "SyncRefModelCallback",
    "TensorBoardLogger",
    "WandbLogger",
    "WinRateCallback",
]
