"""Run configuration: what ``kithara train`` and ``kithara demo`` read from YAML and ``--set``.

A run has the sections ``objective``, ``model``, ``lora``, ``data``, ``args``,
``generation_eval``, ``distributed`` and ``cpu_devices``. ``args`` is exactly the objective's
own config class (``SFTConfig``, ``DPOConfig``, ``IterativeSFTConfig``, ``CycleConfig``,
TRL's names), so it is validated by that class; the other sections are the typed
dataclasses below. Nothing comes from the demo: ``kithara demo`` loads
``kithara/configs/demo.yaml``, and a user's YAML starts from these defaults.

Example:
    >>> config = load_config("dpo.yaml", ["args.max_steps=100", "lora.enabled=true"])
    >>> config.args.beta, config.data.train_file
    (0.1, '/home/me/exp/pairs.jsonl')
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kithara.models.lora import LoraConfig
from kithara.models.precision import FLOAT16_POLICIES
from kithara.models.quantization import QuantizationConfig
from kithara.models.scale_config import ScaleConfig
from kithara.naming import check_names, suggest
from kithara.objectives.configs import CycleConfig, DPOConfig, IterativeSFTConfig, SFTConfig
from kithara.objectives.preference_configs import CPOConfig, ORPOConfig
from kithara.objectives.unpaired_configs import BCOConfig, KTOConfig
from kithara.sharding import ShardingStrategy
from kithara.trainer.config import TrainingConfig
from kithara.trainer.validation import check_heads

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
DEMO_CONFIG = PACKAGE / "configs" / "demo.yaml"

# objective -> the config class its ``args`` section is.
OBJECTIVES: Mapping[str, type[TrainingConfig]] = {
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "orpo": ORPOConfig,
    "cpo": CPOConfig,
    "kto": KTOConfig,
    "bco": BCOConfig,
    "iterative_sft": IterativeSFTConfig,
    "cycle": CycleConfig,
}
# Path-valued keys: relative paths are resolved against the YAML file's directory (values
# from --set: the working directory); ``@kithara/...`` is the package's bundled assets.
PATH_KEYS: Mapping[str, tuple[str, ...]] = {
    "data": ("train_file", "eval_file", "train_file_b", "eval_file_b", "tokenizer"),
    "model": ("preset",),
    "args": ("output_dir", "logging_dir"),
}


@dataclasses.dataclass
class ModelConfig:
    """The model: a keras-hub ``family`` built from the numbers below, or ``preset``."""

    family: str = "llama3"
    preset: str | None = None  # a model directory (keras-hub preset or HF checkpoint) or preset name
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    num_layers: int = 2
    hidden_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_dim: int = 256
    head_dim: int | None = None
    precision: str | None = None  # None: mixed_bfloat16 with args.bf16, mixed_float16 with args.fp16, else float32
    sharding: str = "fsdp"  # dp | fsdp | fsdp_tp
    tensor_parallel: int = 1
    quantization: str | None = None  # nf4 | int8: the frozen base stored quantized, for QLoRA (docs/models.md)
    seed: int = 0  # cycle with two models: model B uses seed + 1
    # remat, scan_layers, attention, attention_chunk_size, activation_sharding (docs/scale.md)
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)


@dataclasses.dataclass
class LoraSection:
    """LoRA adapters on the model (the trainers' ``peft_config``)."""

    enabled: bool = False
    rank: int = 8
    alpha: float | None = None
    targets: list[str] = dataclasses.field(default_factory=lambda: ["query", "value"])
    seed: int = 0

    def build(self) -> LoraConfig | None:
        return LoraConfig(self.rank, self.alpha, tuple(self.targets), self.seed) if self.enabled else None


@dataclasses.dataclass
class DataConfig:
    """Where the data comes from; how it is encoded is ``args`` (``max_length``, ``packing``, ...).

    Any source ``kithara.data.load_source`` reads: JSONL, JSON, Parquet, CSV/TSV, text (a row
    ``{"text": line}`` per line), globs, ``gs://``, a saved Hugging Face dataset.
    """

    train_file: str | None = None  # required
    eval_file: str | None = None
    train_file_b: str | None = None  # cycle only: texts of side B (train_file holds side A's)
    eval_file_b: str | None = None  # cycle only
    tokenizer: str | None = None  # a Hugging Face tokenizer directory; None: model.preset's directory
    columns: dict[str, str] | None = None  # source field -> kithara field, e.g. {question: prompt}
    split: str | None = None  # the split of a saved Hugging Face DatasetDict


@dataclasses.dataclass
class GenerationEvalConfig:
    """Exact match of greedy generations on eval prompts, before and after training."""

    enabled: bool = False
    max_samples: int = 200
    show: int = 5  # sample generations printed


@dataclasses.dataclass
class DistributedConfig:
    """Joining the processes of a multi-host job (see docs/distributed.md). All unset: JAX
    detects a TPU slice, SLURM or Open MPI job, or else the run is a single process."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None  # differs per process: pass it with --set distributed.process_id=N
    initialization_timeout: int = 300  # seconds to wait for all processes to connect (a dead one: that long)
    heartbeat_timeout: int = 100  # seconds of silence after which a process counts as dead


@dataclasses.dataclass
class Sections:
    """Every section but ``args`` (the OmegaConf schema that type-checks them)."""

    objective: str = "sft"  # sft | dpo | orpo | cpo | kto | bco | iterative_sft | cycle
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation_eval: GenerationEvalConfig = dataclasses.field(default_factory=GenerationEvalConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    cpu_devices: int | None = None  # forced host devices when running on CPU; None leaves JAX's default


@dataclasses.dataclass
class RunConfig(Sections):
    """A whole run: the sections, and ``args``, an instance of ``OBJECTIVES[objective]``."""

    args: TrainingConfig = dataclasses.field(default_factory=SFTConfig)


# Keys of the earlier schema, and where they live now.
_MOVED_SECTIONS = {
    "trainer": "the trainer's settings are the args section, under TRL's names (args.max_steps, args.logging_steps, "
    "args.eval_steps, args.output_dir, args.save_steps, ...).",
    "optimizer": "the optimizer's settings are the args section (args.learning_rate, args.warmup_steps, "
    "args.lr_scheduler_type, args.weight_decay, args.max_grad_norm).",
    "dpo": "DPO's settings are the args section with objective: dpo (args.beta, args.loss_type, args.loss_weights, "
    "args.label_smoothing, args.precompute_ref_log_probs).",
}
_MOVED_DATA_KEYS = {
    "format": "args.dataset_format (sft; dpo reads preference rows)",
    "max_length": "args.max_length",
    "max_seq_len": "args.max_length",
    "truncation_mode": "args.truncation_mode",
    "packing": "args.packing",
    "completion_only_loss": "args.completion_only_loss",
    "assistant_only_loss": "args.assistant_only_loss",
    "skip_bad_rows": "args.skip_bad_rows",
    "per_device_batch_size": "args.per_device_train_batch_size",
    "seed": "args.seed",
}


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    relative_to: str | Path | None = None,
) -> RunConfig:
    """The run described by the YAML file ``path``, then the ``key=value`` ``overrides``.

    Relative paths (``PATH_KEYS``) in the file are relative to ``relative_to``, by default the
    file's directory; in overrides, to the working directory. ``@kithara/...`` is the
    package's bundled assets. Unknown keys raise ``TypeError`` with the closest known key,
    bad values ``ValueError`` naming the key.
    """
    layers = []
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
            layers.append(_resolve_paths(_load_yaml(path), Path(relative_to or path.resolve().parent)))
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"Override {item!r} must look like key=value (e.g. args.max_steps=100).")
        # YAML cannot start a plain value with "@": quote bundled-asset paths for the user.
        layers.append(_resolve_paths(OmegaConf.from_dotlist([_quote_asset(o) for o in overrides]), Path.cwd()))
        merged = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"Invalid configuration: {error}") from None
    return from_dict(merged)  # type: ignore[arg-type]


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A checked ``RunConfig`` from a plain mapping (paths already resolved)."""
    raw = dict(raw)
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    check_names(raw, sections, "config", what="section", unsupported=_MOVED_SECTIONS)
    for field in dataclasses.fields(Sections):
        section = raw.get(field.name)
        if dataclasses.is_dataclass(field.default_factory) and isinstance(section, Mapping):
            known = [f.name for f in dataclasses.fields(field.default_factory)]
            moved = {k: f"it is {v} now." for k, v in _MOVED_DATA_KEYS.items()} if field.name == "data" else None
            check_names(section, known, field.name, what="key", unsupported=moved)
    objective = raw.get("objective", "sft")
    if objective not in OBJECTIVES:
        hint = suggest(str(objective), OBJECTIVES)
        raise ValueError(
            f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}"
            + (f" (did you mean {hint!r}?)." if hint else ".")
        )
    args = raw.pop("args", None)
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        raise ValueError(f"args must be a mapping of {OBJECTIVES[objective].__name__} fields, got {args!r}.")
    typed = _typed_sections(raw)
    config_class = OBJECTIVES[objective]
    where = f"args ({config_class.__name__}, for objective {objective})"
    _check_objective_fields(args, objective, where)
    try:
        training_args = config_class.from_dict(args, where=where)
    except (ValueError, NotImplementedError) as error:
        raise type(error)(f"{where}: {error}") from None
    config = RunConfig(**{f.name: getattr(typed, f.name) for f in dataclasses.fields(Sections)}, args=training_args)
    _check(config)
    _check_nothing_ignored(config)
    return config


# The model section's keys for a model built from config, which a preset's own config replaces.
_ARCHITECTURE_KEYS: tuple[str, ...] = ("family", "vocab_size", "num_layers", "hidden_dim", "num_heads")
_ARCHITECTURE_KEYS += ("num_kv_heads", "intermediate_dim", "head_dim", "seed")


def _check_nothing_ignored(config: RunConfig) -> None:
    """Refuses values the run would not use."""
    defaults = ModelConfig()
    if config.model.preset is not None:
        set_here = [k for k in _ARCHITECTURE_KEYS if getattr(config.model, k) != getattr(defaults, k)]
        if set_here:
            keys = ", ".join(f"model.{k}" for k in set_here)
            raise ValueError(
                f"model.preset={config.model.preset!r} brings its own architecture, so {keys} would be ignored; "
                "remove them (or model.preset)."
            )
    if config.objective == "iterative_sft" and config.data.eval_file and not config.generation_eval.enabled:
        raise ValueError(
            "objective iterative_sft uses data.eval_file only for generation_eval (exact match before and after); "
            "set generation_eval.enabled=true or remove data.eval_file."
        )


def _check_objective_fields(args: Mapping[str, Any], objective: str, where: str) -> None:
    """Refuses an ``args`` key that only another objective's config has (``beta`` with
    ``objective: sft``), naming that objective."""
    own = OBJECTIVES[objective].field_names()
    for key in args:
        if key in own or suggest(key, own) is not None:
            continue  # known, or a likely misspelling: the config class's own message says so
        owners = [name for name, cls in OBJECTIVES.items() if key in cls.field_names()]
        if owners:
            raise TypeError(
                f"{where}: {key!r} is a setting of objective {' / '.join(owners)}, not {objective}; set "
                f"objective: {owners[0]}, or remove args.{key}."
            )


def _typed_sections(raw: Mapping[str, Any]) -> Sections:
    """``Sections`` from ``raw``, type-checked by OmegaConf section by section, so that an
    error names its key."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Sections):
        if field.name not in raw:
            continue
        value, schema = raw[field.name], field.default_factory
        if not dataclasses.is_dataclass(schema):
            values[field.name] = _merged(Sections, {field.name: value}, "").__dict__[field.name]
            continue
        if not isinstance(value, Mapping):
            keys = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ValueError(f"{field.name} must be a mapping of its keys ({keys}), got {value!r}.")
        values[field.name] = _merged(cast(type, schema), value, f"{field.name}.")
    return Sections(**values)


def _merged(schema: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``schema`` filled with ``values`` by OmegaConf; its errors name the key as
    ``{prefix}{key}`` (found by trying the keys one by one when OmegaConf names none)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        key = getattr(error, "full_key", None)
        if not key:
            for name, value in values.items():
                try:
                    OmegaConf.merge(OmegaConf.structured(schema), {name: value})
                except (OmegaConfBaseException, ValueError, TypeError):
                    key = name
                    break
        message = (getattr(error, "msg", None) or str(error)).splitlines()[0].strip().rstrip(".")
        if not key:
            raise ValueError(f"Invalid configuration: {message}.") from None
        hints = typing.get_type_hints(schema)
        expected = f" (expected {_describe(hints[key])})" if key in hints else ""
        raise ValueError(f"{prefix}{key}: {message}{expected}.") from None


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("NoneType", "None")


def model_precision(config: RunConfig) -> str:
    """``model.precision``, or what ``args.bf16`` / ``args.fp16`` ask for when it is unset."""
    return config.model.precision or config.args.precision or "float32"


def _check(config: RunConfig) -> None:
    """Completes and checks what one section says about another."""
    d, m = config.data, config.model
    if not d.train_file:
        raise ValueError(
            "data.train_file is required: the training data (JSONL, Parquet, CSV, text, a glob or gs:// path). "
            "Set it in the YAML (data: {train_file: train.jsonl}) or with --set data.train_file=PATH."
        )
    cycle = config.objective == "cycle"
    if cycle and not d.train_file_b:
        raise ValueError(
            "objective cycle needs data.train_file_b: texts of side B (data.train_file holds side A's texts)."
        )
    for key in ("train_file_b", "eval_file_b"):
        if not cycle and getattr(d, key) is not None:
            raise ValueError(f"data.{key} is for objective cycle only (objective is {config.objective}); remove it.")
    if d.tokenizer is None:
        if m.preset is None or not Path(m.preset).is_dir():
            raise ValueError(
                "data.tokenizer is required: a Hugging Face tokenizer directory (tokenizer.json), e.g. "
                "@kithara/tokenizer. It defaults to model.preset only when that is a local model directory"
                + (f" (model.preset is {m.preset!r})." if m.preset else " (model.preset is not set).")
            )
        d.tokenizer = m.preset
    if m.precision is not None and config.args.bf16 and m.precision not in ("mixed_bfloat16", "bfloat16"):
        raise ValueError(
            f"model.precision={m.precision!r} contradicts args.bf16=true (bfloat16 compute); set "
            "model.precision=mixed_bfloat16, or leave it unset (null), or set args.bf16=false."
        )
    if m.precision is not None and config.args.fp16 and m.precision not in FLOAT16_POLICIES:
        raise ValueError(
            f"model.precision={m.precision!r} contradicts args.fp16=true (float16 compute with loss scaling); "
            "set model.precision=mixed_float16, or leave it unset (null), or set args.fp16=false."
        )
    m.precision = model_precision(config)
    if m.quantization is not None:
        try:
            QuantizationConfig(m.quantization)
        except ValueError as error:
            raise ValueError(f"model.quantization: {error}") from None
    try:
        ShardingStrategy(m.sharding, tensor_parallel=m.tensor_parallel)
    except ValueError as error:
        raise ValueError(f"model.sharding / model.tensor_parallel: {error}") from None
    if m.preset is None:  # a preset's head counts are checked when the trainer gets the model
        heads = {f"model.num_heads={m.num_heads}": m.num_heads, f"model.num_kv_heads={m.num_kv_heads}": m.num_kv_heads}
        fix = "Set model.tensor_parallel={fits} (the largest value that divides both) or change the head counts."
        check_heads(heads, m.tensor_parallel, setting="model.tensor_parallel", fix=fix)
    _check_eval_data(config)
    try:
        config.lora.build()
    except ValueError as error:
        raise ValueError(f"lora: {error}") from None
    g = config.generation_eval
    if g.enabled and d.eval_file is None and d.eval_file_b is None:
        raise ValueError(
            "generation_eval.enabled needs data.eval_file (eval prompts with reference answers); set it, or "
            "generation_eval.enabled=false."
        )
    if g.max_samples < 1 or g.show < 0:
        raise ValueError(f"generation_eval.max_samples must be >= 1 and show >= 0, got {g.max_samples}, {g.show}.")
    if config.cpu_devices is not None and config.cpu_devices < 1:
        raise ValueError(f"cpu_devices must be >= 1 or null, got {config.cpu_devices}.")


# args fields that only matter with evaluation data.
_EVAL_FIELDS = ("eval_steps", "eval_epochs", "max_eval_samples", "per_device_eval_batch_size")


def _check_eval_data(config: RunConfig) -> None:
    """Refuses evaluation settings without evaluation data (the trainer would refuse them only
    after building the model, naming no data key)."""
    args, d = config.args, config.data
    has_eval = config.objective != "iterative_sft" and (d.eval_file or d.eval_file_b)
    if has_eval:
        return
    changed = args.changed_fields()
    names = [n for n in _EVAL_FIELDS if n in changed and changed[n] is not None]
    if args.eval_strategy in ("steps", "epoch"):
        names.insert(0, "eval_strategy")
    if not names:
        return
    shown = ", ".join(f"args.{n}={getattr(args, n)!r}" for n in names)
    if config.objective == "iterative_sft":
        raise ValueError(
            f"{shown}: objective iterative_sft has no evaluation loop (data.eval_file feeds generation_eval "
            "only); remove these settings."
        )
    files = "data.eval_file or data.eval_file_b" if config.objective == "cycle" else "data.eval_file"
    verb = "needs" if len(names) == 1 else "need"
    raise ValueError(f"{shown} {verb} evaluation data, but {files} is not set; set it, or remove these settings.")


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ValueError(
            f'{path} is not valid YAML: {error}\n(Quote values that start with @, such as "@kithara/tokenizer".)'
        ) from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path} must hold a mapping of sections (objective, model, data, args, ...).")
    return loaded


def _quote_asset(item: str) -> str:
    key, value = item.split("=", 1)
    return f"{key}={value!r}" if value.startswith("@") else item


def _resolve_paths(layer: DictConfig, base: Path) -> DictConfig:
    """``layer`` with its relative ``PATH_KEYS`` values made absolute against ``base``."""
    for section, keys in PATH_KEYS.items():
        node = layer.get(section)
        if not isinstance(node, DictConfig):
            continue
        for key in keys:
            value = node.get(key)
            if isinstance(value, str) and value:
                node[key] = _resolve(value, base, preset=(section, key) == ("model", "preset"))
    return layer


def _resolve(value: str, base: Path, preset: bool = False) -> str:
    if value.startswith("@kithara/"):
        return str(ASSETS / value.removeprefix("@kithara/"))
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if preset and not ((base / path).exists() or "/" in value or value.startswith(".")):
        return value  # a keras-hub preset name, not a path (KerasHubModel.from_preset's own rule)
    return str((base / path).resolve())


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain values (lists, not tuples), sections in reading order."""
    order = ("objective", "model", "lora", "data", "args", "generation_eval", "distributed", "cpu_devices")
    values = {name: getattr(config, name) for name in order}
    return {k: _plain(v) for k, v in values.items()}


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def to_flat_dict(config: RunConfig) -> dict[str, Any]:
    """``{"args.max_steps": 400, ...}``: every leaf value under its dotted name."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix.rstrip(".")] = value

    visit("", to_dict(config))
    return flat


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
