"""kithara: post-training for large language models with JAX and Keras."""

import os

# First: kithara.logs notes how the user left logging before the imports below change it.
from kithara import logs

# Keras reads its backend once, at first import; kithara runs on JAX. Set it only if the
# user has not chosen, and refuse a different choice below with a clear message.
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras

if keras.backend.backend() != "jax":
    raise ImportError(
        f"kithara needs the JAX backend of Keras, but KERAS_BACKEND is {keras.backend.backend()!r}. "
        "Set KERAS_BACKEND=jax (or unset it) before importing keras."
    )

from kithara import data, distributed, judges, utils
from kithara.callbacks import (
    BEMACallback,
    Callback,
    Checkpointer,
    LogCompletionsCallback,
    MergeModelCallback,
    MLflowLogger,
    Profiler,
    ProgressBar,
    RichProgressCallback,
    StepInfo,
    SyncRefModelCallback,
    TensorBoardLogger,
    WandbLogger,
    WinRateCallback,
)
from kithara.data import Dataloader, Tokenizer
from kithara.logs import set_verbosity
from kithara.models import (
    Architecture,
    KerasHubModel,
    KerasHubSeq2SeqModel,
    LoraConfig,
    Model,
    ModelVariables,
    QuantizationConfig,
    ScalarHeadModel,
    ScaleConfig,
)
from kithara.objectives import (
    BCOTrainer,
    CPOTrainer,
    CycleTrainer,
    DPOTrainer,
    GRPOTrainer,
    IterativeSFTTrainer,
    KTOTrainer,
    NashMDTrainer,
    OnlineDPOTrainer,
    ORPOTrainer,
    PPOTrainer,
    PRMTrainer,
    RewardTrainer,
    RLOOTrainer,
    SFTTrainer,
    XPOTrainer,
)
from kithara.objectives.configs import CycleConfig, DPOConfig, IterativeSFTConfig, SFTConfig
from kithara.objectives.online_configs import NashMDConfig, OnlineDPOConfig, XPOConfig
from kithara.objectives.preference_configs import CPOConfig, ORPOConfig
from kithara.objectives.reward_configs import PRMConfig, RewardConfig
from kithara.objectives.rl_configs import GRPOConfig, PPOConfig, RLOOConfig, RolloutConfig
from kithara.objectives.unpaired_configs import BCOConfig, KTOConfig
from kithara.sharding import ShardingStrategy
from kithara.trainer import (
    LossOutput,
    Trainer,
    TrainState,
    optimizers,
)
from kithara.trainer.config import TrainingConfig

logs.configure_on_import()

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "BCOConfig",
    "BCOTrainer",
    "BEMACallback",
    "CPOConfig",
    "CPOTrainer",
    "Callback",
    "Checkpointer",
    "CycleConfig",
    "CycleTrainer",
    "DPOConfig",
    "DPOTrainer",
    "Dataloader",
    "GRPOConfig",
    "GRPOTrainer",
    "IterativeSFTConfig",
    "IterativeSFTTrainer",
    "KTOConfig",
    "KTOTrainer",
    "KerasHubModel",
    "KerasHubSeq2SeqModel",
    "LogCompletionsCallback",
    "LoraConfig",
    "LossOutput",
    "MLflowLogger",
    "MergeModelCallback",
    "Model",
    "ModelVariables",
    "NashMDConfig",
    "NashMDTrainer",
    "ORPOConfig",
    "ORPOTrainer",
    "OnlineDPOConfig",
    "OnlineDPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "PRMConfig",
    "PRMTrainer",
    "Profiler",
    "ProgressBar",
    "QuantizationConfig",
    "RLOOConfig",
    "RLOOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "RichProgressCallback",
    "RolloutConfig",
    "SFTConfig",
    "SFTTrainer",
    "ScalarHeadModel",
    "ScaleConfig",
    "ShardingStrategy",
    "StepInfo",
    "SyncRefModelCallback",
    "TensorBoardLogger",
    "Tokenizer",
    "TrainState",
    "Trainer",
    "TrainingConfig",
    "WandbLogger",
    "WinRateCallback",
    "XPOConfig",
    "XPOTrainer",
    "__version__",
    "data",
    "distributed",
    "judges",
    "optimizers",
    "set_verbosity",
    "utils",
]
