"""Small utilities shared by objectives, and TRL's model and evaluation helpers."""

from kithara.utils.accuracy import compute_accuracy
from kithara.utils.adapter_precision import cast_adapters
from kithara.utils.dropout import disable_dropout
from kithara.utils.freezing import freeze_layers
from kithara.utils.memory import empty_cache
from kithara.utils.parameters import count_parameters
from kithara.utils.running_moments import Moments, RunningMoments, batch_moments, merge

__all__ = [
    "Moments",
    "RunningMoments",
    "batch_moments",
    "cast_adapters",
    "compute_accuracy",
    "count_parameters",
    "disable_dropout",
    "empty_cache",
    "freeze_layers",
    "merge",
]
