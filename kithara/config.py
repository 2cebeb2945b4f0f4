"""Typed run configuration: YAML files and ``--set key=value`` overrides fill these."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclasses.dataclass
class ModelConfig:
    family: str = "llama3"
    preset: str | None = None  # a keras-hub preset or HF checkpoint dir; overrides the numbers below
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    num_layers: int = 2
    hidden_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_dim: int = 256
    head_dim: int | None = None
    precision: str = "float32"
    sharding: str = "fsdp"
    tensor_parallel: int = 1
    seed: int = 0


@dataclasses.dataclass
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float | None = None
    targets: list[str] = dataclasses.field(default_factory=lambda: ["query", "value"])


@dataclasses.dataclass
class DataConfig:
    format: str = "prompt_completion"  # text | prompt_completion | conversational | preference
    train_file: str = "@kithara/demo/train.jsonl"
    eval_file: str | None = "@kithara/demo/eval.jsonl"
    tokenizer: str = "@kithara/demo/tokenizer"  # a Hugging Face tokenizer directory
    columns: dict[str, str] | None = None  # source field -> format field
    split: str | None = None  # the split of a saved Hugging Face DatasetDict
    max_seq_len: int = 24
    truncation: str = "keep_start"
    packing: bool = False
    completion_only_loss: bool = True
    assistant_only_loss: bool = False
    skip_bad_rows: bool = False
    per_device_batch_size: int = 8
    seed: int = 0


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_learning_rate: float = 3e-4  # end of the cosine decay
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0


@dataclasses.dataclass
class TrainerConfig:
    steps: int | None = 400
    epochs: int | None = None
    log_steps_interval: int = 50
    eval_steps_interval: int | None = 200
    eval_epochs_interval: int | None = None
    max_eval_samples: int | None = None
    gradient_accumulation_steps: int = 1
    tensorboard_dir: str | None = "runs/demo"
    checkpoint_dir: str | None = None  # save here every checkpoint_interval steps; a rerun resumes
    checkpoint_interval: int = 200
    max_checkpoints: int | None = 3
    progress_bar: bool = True
    seed: int = 0


@dataclasses.dataclass
class GenerationEvalConfig:
    """Exact match of greedy generations on eval prompts, before and after training."""

    enabled: bool = True
    max_samples: int = 200
    show: int = 5


@dataclasses.dataclass
class DPOSection:
    """Used when ``objective: dpo`` (with ``data.format: preference``); see docs/dpo.md."""

    beta: float = 0.1
    loss_type: str = "sigmoid"  # a name in kithara.objectives.dpo_losses.LOSSES
    loss_weights: dict[str, float] | None = None  # {name: weight} instead of loss_type, e.g. RPO
    label_smoothing: float = 0.0
    precompute_ref_log_probs: bool = False


@dataclasses.dataclass
class DistributedConfig:
    """Joining the processes of a multi-host job (see docs/distributed.md). All unset: JAX
    detects a TPU slice, SLURM or Open MPI job, or else the run is a single process."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None  # differs per process: pass it with --set distributed.process_id=N
    initialization_timeout: int = 300  # seconds to wait for all processes to connect
    heartbeat_timeout: int = 100  # seconds of silence after which a process counts as dead


@dataclasses.dataclass
class RunConfig:
    objective: str = "sft"  # sft (next-token loss on the data's label mask) | dpo
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    generation_eval: GenerationEvalConfig = dataclasses.field(default_factory=GenerationEvalConfig)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    cpu_devices: int | None = 8  # forced host devices when running on CPU; None leaves JAX's default


ASSETS = Path(__file__).resolve().parent / "assets"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides, type-checked.

    ``@kithara/`` at the start of a path means the package's bundled assets; other relative
    paths are relative to the config file's directory.
    """
    schema = OmegaConf.structured(RunConfig)
    layers: list[Any] = [schema]
    base = Path.cwd()
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
            layers.append(OmegaConf.load(path))
            base = path.resolve().parent
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"Override {item!r} must look like key=value (e.g. trainer.steps=100).")
        # YAML cannot start a plain value with "@": quote bundled-asset paths for the user.
        dotlist = [_quote_asset(item) for item in overrides]
        layers.append(OmegaConf.from_dotlist(dotlist))
        config: RunConfig = OmegaConf.to_object(OmegaConf.merge(*layers))  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ValueError(f"Invalid configuration: {error}") from None
    for field in ("train_file", "eval_file", "tokenizer"):
        value = getattr(config.data, field)
        if value is not None:
            setattr(config.data, field, _resolve(value, base))
    return config


def _quote_asset(item: str) -> str:
    key, value = item.split("=", 1)
    return f"{key}={value!r}" if value.startswith("@") else item


def _resolve(value: str, base: Path) -> str:
    if value.startswith("@kithara/"):
        return str(ASSETS / value.removeprefix("@kithara/"))
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_flat_dict(config: RunConfig) -> dict[str, Any]:
    """``{"trainer.steps": 400, ...}``: every leaf value under its dotted name."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix.rstrip(".")] = value

    visit("", dataclasses.asdict(config))
    return flat
