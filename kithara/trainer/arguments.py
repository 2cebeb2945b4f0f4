"""One configuration from the ways a trainer can be called: ``args=<config>``, config fields
as keywords, and the Kithara trainer's own argument names (``steps``, ``epochs``,
``log_steps_interval``, ...), which map onto the TRL-named fields."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kithara.data.dataloader import Dataloader
from kithara.models.model import Model
from kithara.models.precision import FLOAT16_POLICIES
from kithara.naming import check_names
from kithara.trainer.config import TrainingConfig


def _eval_every_steps(n: int | None) -> dict[str, Any]:
    return {} if n is None else {"eval_strategy": "steps", "eval_steps": n}


def _eval_every_epochs(n: int | None) -> dict[str, Any]:
    return {} if n is None else {"eval_strategy": "epoch", "eval_epochs": n}


def _tensorboard(path: str | None) -> dict[str, Any]:
    return {} if path is None else {"logging_dir": str(path), "report_to": "tensorboard"}


def _progress(on: bool | None) -> dict[str, Any]:
    return {} if on is None else {"disable_tqdm": not on}


# The Kithara trainer's argument names (seed 002) and the config fields they set.
KITHARA_ARGUMENTS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "steps": lambda v: {} if v is None else {"max_steps": v},
    "epochs": lambda v: {} if v is None else {"num_train_epochs": v},
    "log_steps_interval": lambda v: {} if v is None else {"logging_steps": v},
    "eval_steps_interval": _eval_every_steps,
    "eval_epochs_interval": _eval_every_epochs,
    "tensorboard_dir": _tensorboard,
    "progress_bar": _progress,
}


def resolve_config(
    config_class: type[TrainingConfig],
    args: TrainingConfig | None,
    kithara_arguments: Mapping[str, Any],
    fields: Mapping[str, Any],
    *,
    where: str,
    other_names: tuple[str, ...] = (),
) -> TrainingConfig:
    """The trainer's config: ``args`` (or the config class's defaults), changed by the
    Kithara-named arguments and the config fields given as keywords.

    A keyword that is neither a field nor in ``other_names`` is refused with the closest
    spelling; a keyword that contradicts a value set in ``args`` is refused naming both.
    """
    check_names(
        fields,
        (*config_class.field_names(), *KITHARA_ARGUMENTS, *other_names),
        where,
        unsupported=config_class.unsupported_arguments,
        docs=f"help(kithara.{config_class.__name__})",
    )
    if args is None:
        base = None
    elif isinstance(args, config_class):
        base = args
    elif isinstance(args, TrainingConfig) and issubclass(config_class, type(args)):
        # A base TrainingConfig for an objective: the fields it sets carry over; the others
        # (learning_rate, logging_steps, ...) keep the objective's own defaults.
        base = config_class(**args.changed_fields())
    else:
        raise TypeError(
            f"{where}: args must be a kithara.{config_class.__name__} (or a kithara.TrainingConfig), "
            f"got {type(args).__name__}."
        )
    _check_positive(**{k: v for k, v in kithara_arguments.items() if k not in ("tensorboard_dir", "progress_bar")})
    if kithara_arguments.get("eval_steps_interval") is not None and kithara_arguments.get("eval_epochs_interval"):
        raise ValueError("Set only one of eval_steps_interval and eval_epochs_interval.")
    changes: dict[str, tuple[str, Any]] = {}  # field -> (the keyword that set it, value)
    for name, value in kithara_arguments.items():
        for field, field_value in KITHARA_ARGUMENTS[name](value).items():
            changes[field] = (name, field_value)
    for name, value in fields.items():
        if name in config_class.field_names():
            if name in changes and changes[name][1] != value:
                raise ValueError(
                    f"{where}: {changes[name][0]}= and {name}= disagree ({changes[name][1]!r} vs {value!r}); "
                    "pass one of them."
                )
            changes[name] = (name, value)
    if base is None:
        return config_class(**{field: value for field, (_, value) in changes.items()})
    set_in_args = base.changed_fields()
    for field, (name, value) in changes.items():
        current = getattr(base, field)
        if field in set_in_args and current != value:
            raise ValueError(
                f"{where}: {name}={value!r} contradicts args.{field}={current!r}; set it in one place "
                f"(args=config.replace({field}=...) changes a config)."
            )
    return base.replace(**{field: value for field, (_, value) in changes.items()}) if changes else base


def model_policy(model: Model) -> str | None:
    """The keras dtype policy the model's backbone was built with (None when it has none)."""
    return getattr(getattr(getattr(model, "backbone", None), "dtype_policy", None), "name", None)


def computes_in_float16(model: Model) -> bool:
    """Whether the model computes in float16, so training needs a dynamic loss scale."""
    return model_policy(model) in FLOAT16_POLICIES


def check_precision(model: Model, config: TrainingConfig) -> None:
    """Refuses ``bf16=True`` or ``fp16=True`` for a model built to compute in another dtype
    (its variables and compute dtype are fixed when it is built)."""
    policy = model_policy(model)
    if config.bf16 and policy is not None and policy not in ("mixed_bfloat16", "bfloat16"):
        raise ValueError(
            f"args.bf16=True asks for bfloat16 compute, but the model was built with precision {policy!r}; build "
            "it with precision='mixed_bfloat16' (KerasHubModel.from_preset(..., precision='mixed_bfloat16')) "
            "or drop bf16."
        )
    if config.fp16 and policy is not None and policy not in FLOAT16_POLICIES:
        raise ValueError(
            f"args.fp16=True asks for float16 compute with loss scaling, but the model was built with precision "
            f"{policy!r}; build it with precision='mixed_float16' (KerasHubModel.from_preset(..., "
            "precision='mixed_float16')) or drop fp16."
        )


def check_float16_attention(model: Model) -> None:
    """Refuses float16 compute with keras' attention off NVIDIA/ROCm GPUs: keras-hub's Llama,
    Mistral and Qwen attention call ``jax.nn.dot_product_attention``, which asks XLA for a
    float16 x float16 -> float32 dot that the CPU and TPU backends do not compile (the error
    would come at the first step, naming only ``F16_F16_F32``)."""
    scale = getattr(model, "scale", None)
    if not computes_in_float16(model) or getattr(scale, "attention", None) != "keras":
        return
    platform = model.mesh.devices.flat[0].platform
    if platform != "gpu":
        raise ValueError(
            f"precision='mixed_float16' on {platform}: keras' attention path (ScaleConfig(attention='keras'), "
            "the default) needs float16 x float16 -> float32 dots, which XLA compiles on GPUs only. Build the "
            "model with scale=kithara.ScaleConfig(attention='chunked') (same results), or train in "
            "mixed_bfloat16 (bf16=True), the usual choice on TPU."
        )


def as_dataloader(kind: str, loader: Dataloader | None, dataset: Any, config: TrainingConfig) -> Dataloader | None:
    """``{kind}_dataloader`` or ``{kind}_dataset`` (TRL's name), as a Dataloader."""
    if loader is not None and dataset is not None:
        raise ValueError(f"Pass {kind}_dataloader or {kind}_dataset, not both.")
    if loader is not None and not isinstance(loader, Dataloader):
        raise TypeError(
            f"{kind}_dataloader must be a kithara.Dataloader, got {type(loader).__name__}; pass data to be "
            f"batched as {kind}_dataset."
        )
    data = loader if loader is not None else dataset
    if data is None or isinstance(data, Dataloader):
        return data
    if kind == "train":
        return Dataloader(
            data, config.per_device_train_batch_size, seed=config.seed, skip_bad_rows=config.skip_bad_rows
        )
    return Dataloader(
        data, config.eval_batch_size, shuffle=False, drop_remainder=False, skip_bad_rows=config.skip_bad_rows
    )


# Fields that only shape the optimizer the trainer builds when none is given.
OPTIMIZER_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
)
CHECKPOINT_FIELDS = ("save_strategy", "save_steps", "save_total_limit", "resume")
PROFILE_FIELDS = ("profile_start_step", "profile_num_steps")


def check_nothing_ignored(
    config: TrainingConfig,
    *,
    optimizer_given: bool,
    checkpointer_given: bool,
    profiler_given: bool,
    loaders: Mapping[str, Dataloader | None],
    where: str,
) -> None:
    """Refuses settings the run would not use: optimizer, checkpoint or profiling fields next
    to a ready optimizer, checkpointer or profiler, and batch sizes that differ from a ready
    loader's (objectives check their own data settings: ``inputs.check_ready_data``)."""
    changed = config.changed_fields()
    ready = (
        (optimizer_given, "optimizer=", OPTIMIZER_FIELDS, "configure the optimizer the trainer builds, but"),
        (checkpointer_given, "checkpointer=", CHECKPOINT_FIELDS, "would be ignored:"),
        (profiler_given, "profiler=", PROFILE_FIELDS, "would be ignored:"),
    )
    for given, what, fields, verb in ready:
        if given and (unused := [f"{f}={changed[f]!r}" for f in fields if f in changed]):
            raise ValueError(
                f"{where}: {', '.join(unused)} {verb} {what} was given and has its own settings; set them "
                f"there, or drop {what}"
            )
    for kind, loader in loaders.items():
        if loader is None:
            continue
        field = "per_device_train_batch_size" if kind == "train" else "per_device_eval_batch_size"
        wanted = getattr(config, field)
        if field in changed and wanted is not None and wanted != loader.per_device_batch_size:
            raise ValueError(
                f"{where}: {field}={wanted}, but the {kind} Dataloader given has per_device_batch_size="
                f"{loader.per_device_batch_size}; build the loader with that batch size or pass the data unbatched."
            )


def _check_positive(**values: Any) -> None:
    """The Kithara-named counts, checked under the name the caller used."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
