"""The loggers ``report_to`` asks for: TensorBoard, Weights & Biases, MLflow.

Example:
    >>> config = kithara.TrainingConfig(output_dir="runs/exp1", report_to=["tensorboard", "wandb"])
    >>> [type(logger).__name__ for logger in reporting_callbacks(config)]
    ['TensorBoardLogger', 'WandbLogger']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kithara.callbacks.base import Callback
from kithara.callbacks.mlflow_logger import MLflowLogger
from kithara.callbacks.tensorboard import TensorBoardLogger
from kithara.callbacks.wandb_logger import WandbLogger

if TYPE_CHECKING:
    from kithara.trainer.config import TrainingConfig


def config_values(config: TrainingConfig) -> dict[str, Any]:
    """A config's fields as plain values (tuples as lists, other objects as their ``str``),
    plus ``config_class``: what the wandb run's config and the MLflow run's parameters hold."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, bool | int | float | str) else str(value)

    values = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"config_class": type(config).__name__, **values}


def _tensorboard(config: TrainingConfig) -> Callback | None:
    directory = config.tensorboard_dir  # None without output_dir and logging_dir: nothing to write
    return None if directory is None else TensorBoardLogger(directory, every=config.logging_steps)


def _wandb(config: TrainingConfig) -> Callback:
    return WandbLogger(
        config.logging_steps, project=config.project, run_name=config.run_name, config=config_values(config)
    )


def _mlflow(config: TrainingConfig) -> Callback:
    return MLflowLogger(
        config.logging_steps,
        experiment_name=config.project,
        run_name=config.run_name,
        params=config_values(config),
    )


LOGGERS: Mapping[str, Callable[[TrainingConfig], Callback | None]] = {
    "tensorboard": _tensorboard,
    "wandb": _wandb,
    "mlflow": _mlflow,
}


def reporting_callbacks(config: TrainingConfig) -> list[Callback]:
    """One logger per integration ``config.report_to`` asks for (``config.report_integrations``),
    each writing every ``logging_steps`` steps: ``TensorBoardLogger`` into
    ``config.tensorboard_dir`` (none when there is no directory), ``WandbLogger`` and
    ``MLflowLogger`` with ``run_name`` and ``project`` and the config's fields."""
    loggers = [LOGGERS[name](config) for name in config.report_integrations]
    return [logger for logger in loggers if logger is not None]
