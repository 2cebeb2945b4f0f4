"""TrainingConfig: the base trainer's settings, under TRL's and transformers' names.

Objective configs (``kithara.objectives.configs``) extend it. Every config refuses unknown
fields with the closest known name, checks types and ranges when built, and is frozen:
``config.replace(**changes)`` makes a changed, re-checked copy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import optax

from kithara.naming import check_names
from kithara.trainer import optimizers

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")
SCHEDULER_KWARGS: Mapping[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": (),
    "linear": (),
    "cosine": ("num_cycles",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
}
# transformers schedulers kithara does not have yet.
_OTHER_SCHEDULERS = (
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
ADAMW_NAMES = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf")  # all AdamW
# bitsandbytes' AdamW8bit (transformers' OptimizerNames.ADAMW_BNB and its alias ADAMW_8BIT).
ADAMW_8BIT_NAMES = ("adamw_8bit", "adamw_bnb_8bit")
OPTIMIZERS = (*ADAMW_NAMES, *ADAMW_8BIT_NAMES, "sgd")
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "all")
# Integrations with an optional package: report_to name -> (module, kithara extra).
OPTIONAL_INTEGRATIONS: Mapping[str, tuple[str, str]] = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
# transformers' other report_to integrations, which kithara has no logger for.
_OTHER_INTEGRATIONS = (
    "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "neptune",
    "swanlab", "trackio",
)  # fmt: skip
_ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon")

# TRL / transformers options kithara has no field for, and what to do instead.
_NOT_IN_KITHARA = {
    "deepspeed": "kithara shards with its own device mesh; pick sharding= when building the model.",
    "fsdp": "kithara shards with its own device mesh; pick sharding='fsdp' when building the model.",
    "push_to_hub": "upload output_dir yourself; model.save_in_hf_format writes a Hugging Face checkpoint.",
    "model_init_kwargs": "build the model yourself: KerasHubModel.from_preset(path, precision=, sharding=, lora=).",
    "resume_from_checkpoint": "pass it to trainer.train(resume_from_checkpoint=True | path); by default kithara "
    "resumes from the latest checkpoint under output_dir (resume=True).",
    "use_liger_kernel": "Liger kernels are PyTorch kernels; kithara's step is compiled by XLA.",
    "torch_compile": "every kithara step is compiled with jax.jit already.",
    "gradient_checkpointing_kwargs": "torch.utils.checkpoint's options (use_reentrant, ...) have no JAX "
    "counterpart; gradient_checkpointing=True recomputes each decoder block (remat='full'), and "
    "KerasHubModel(scale=kithara.ScaleConfig(remat=...)) picks another policy (docs/scale.md).",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Settings of the base ``Trainer``: length of training, batch, optimizer and learning
    rate schedule, logging, evaluation, checkpoints, precision and profiling.

    Names and meanings follow TRL (``transformers.TrainingArguments``) where TRL has the
    setting ("TRL" below); a default that differs from TRL 1.x's says so. Unknown keywords
    raise ``TypeError`` naming the closest field (``SFTConfig(max_seq_length=512)``: "did you
    mean 'max_length'?"), bad values ``ValueError``, and TRL settings kithara has not
    implemented yet ``NotImplementedError``.

    Args:
        output_dir: TRL. Where checkpoints (``{output_dir}/checkpoints``) and TensorBoard logs
            (``{output_dir}/runs``) go, local or ``gs://``; ``None`` writes nothing
            (TRL: ``"trainer_output"``).
        max_steps: TRL. Optimizer steps to run; TRL's ``-1`` means "unset" and becomes ``None``.
        num_train_epochs: TRL. Whole passes over the training data; ``None`` is one epoch when
            ``max_steps`` is unset too (TRL: 3.0). A fraction is refused: use ``max_steps``.
            Setting both is refused (TRL lets ``max_steps`` win).
        per_device_train_batch_size: TRL. Rows per device per micro-batch (TRL: 8).
        per_device_eval_batch_size: TRL. Rows per device per eval batch; ``None`` is the train
            value (TRL: 8).
        gradient_accumulation_steps: TRL. Micro-batches per optimizer step.
        learning_rate: TRL. Peak learning rate.
        lr_scheduler_type: TRL. ``"constant"`` (TRL: ``"linear"``), ``"constant_with_warmup"``,
            ``"linear"``, ``"cosine"`` or ``"cosine_with_min_lr"``, with transformers' formulas
            (``schedule``); ``"constant"`` has no warmup, so warmup with it is refused.
        lr_scheduler_kwargs: TRL. ``{"num_cycles": ...}`` for the cosines, and exactly one of
            ``{"min_lr": ...}`` / ``{"min_lr_rate": ...}`` for ``"cosine_with_min_lr"``.
        warmup_steps: TRL. Linear warmup from 0: a number of steps, or a float in (0, 1) for
            that fraction of all steps (transformers 5).
        warmup_ratio: TRL (transformers 4). Warmup as a fraction of all steps; at most one of
            ``warmup_steps`` and ``warmup_ratio`` may be set.
        weight_decay: TRL. Decoupled (AdamW) weight decay, on every parameter (transformers
            exempts biases and norm weights).
        adam_beta1: TRL. AdamW's first-moment decay.
        adam_beta2: TRL. AdamW's second-moment decay.
        adam_epsilon: TRL. AdamW's epsilon.
        max_grad_norm: TRL. Clip gradients to this global norm; ``None`` or 0 does not clip.
        optim: TRL. ``"adamw"`` (also ``"adamw_torch"``, ``"adamw_torch_fused"``,
            ``"adamw_hf"``: all AdamW; TRL: ``"adamw_torch_fused"``), ``"adamw_8bit"`` (also
            ``"adamw_bnb_8bit"``: bitsandbytes' 8-bit AdamW, both moments in 8 bits with a
            float32 scale per 256 values, about a quarter of AdamW's state; see
            ``kithara.trainer.adamw_8bit``) or ``"sgd"``. Paged optimizers
            (``"paged_adamw_8bit"``, ...) are refused: ``offload_optimizer`` keeps the state in
            host memory instead.
        logging_steps: TRL. Log metrics (and write TensorBoard) every this many steps (a whole
            number; TRL also takes a fraction of all steps). 1 here, as the Kithara trainer's
            ``log_steps_interval``; ``SFTConfig`` and ``DPOConfig`` take TRL's 10.
        eval_strategy: TRL. ``"no"``, ``"steps"`` (every ``eval_steps``) or ``"epoch"`` (every
            ``eval_epochs``). ``None`` (TRL: ``"no"``): ``"steps"`` when ``eval_steps`` is set,
            ``"epoch"`` when ``eval_epochs`` is, else every epoch when there is evaluation
            data and never without (the Kithara trainer's rule).
        eval_steps: TRL. Steps between evaluations with ``eval_strategy="steps"``; ``None`` is
            ``logging_steps``, as in transformers.
        eval_epochs: kithara. Epochs between evaluations with ``eval_strategy="epoch"``;
            ``None`` is 1.
        max_eval_samples: kithara. Evaluate on at most this many rows (packed rows when packing).
        save_strategy: TRL. ``"steps"`` saves a checkpoint every ``save_steps`` when
            ``output_dir`` is set; ``"no"`` never saves.
        save_steps: TRL. Steps between checkpoints.
        save_total_limit: TRL. Keep at most this many checkpoints; ``None`` keeps all.
        resume: kithara. Resume from the latest checkpoint under ``output_dir``, if any.
        bf16: TRL. Mixed precision: float32 weights, bfloat16 compute (``precision`` is
            ``"mixed_bfloat16"``); when ``False`` the model keeps its own precision (TRL: ``True``
            unless ``fp16``).
        fp16: TRL. Mixed precision: float32 weights, float16 compute (``precision`` is
            ``"mixed_float16"``) with dynamic loss scaling (``kithara.trainer.loss_scale``:
            initial scale 2**15, halved on a non-finite step, which is skipped; doubled after
            2000 finite steps); the model must be built with that precision.
        gradient_checkpointing: TRL. Recompute each decoder block in the backward pass instead
            of keeping its activations: sets the model's ``ScaleConfig(remat="full")`` when the
            model's own policy is ``"none"`` (a named policy set on the model is kept). See
            docs/scale.md.
        loss_chunk_size: kithara. Compute the loss's log-softmax (and the LM-head matmul) this many
            sequence positions at a time, never holding float32 ``[batch, length, vocab]`` logits
            (SFT, DPO and the other log-prob losses); ``None``: whole sequences (docs/scale.md).
        offload_optimizer: kithara (DeepSpeed ZeRO's name). Keep the optimizer state in host memory
            (``pinned_host``) between steps where the backend has memory kinds (docs/scale.md).
        offload_params: kithara (DeepSpeed ZeRO's name). Keep the trainable (master) weights in
            host memory between steps where the backend has memory kinds (docs/scale.md).
        seed: TRL. Seed of data shuffling and the step RNG (TRL: 42).
        report_to: TRL. Where metrics go: ``"tensorboard"`` (TRL: ``"none"``), ``"wandb"``
            (Weights & Biases, the ``wandb`` extra), ``"mlflow"`` (the ``mlflow`` extra), a list
            of them, ``"all"`` (TensorBoard and every other integration that is installed) or
            ``"none"``. Every logger gets the same names (``train/loss``, ``eval/loss``, ...)
            against the optimizer step; only process 0 writes. An integration that is asked for
            by name but not installed is refused here, with its ``pip install`` line.
        run_name: TRL. The run's name in Weights & Biases and MLflow; ``None`` lets them pick one.
        project: TRL (transformers 5, for Trackio there). The Weights & Biases project and the
            MLflow experiment; ``None`` reads ``WANDB_PROJECT`` (else ``"kithara"``) and
            ``MLFLOW_EXPERIMENT_NAME`` (else MLflow's default experiment).
        logging_dir: kithara (transformers 4). TensorBoard directory; ``None`` is
            ``{output_dir}/runs`` when there is an ``output_dir``.
        disable_tqdm: TRL. Hide the progress bar.
        profile_start_step: kithara. Trace steps ``profile_start_step ..`` with
            ``jax.profiler`` into the TensorBoard directory; ``None`` does not profile.
        profile_num_steps: kithara. How many steps to trace.
        skip_bad_rows: kithara. Log and count malformed data rows instead of stopping on the
            first (its message names the file, line and field either way).
        peak_flops_per_device: kithara. Peak FLOP/s per device for MFU, when the device's own
            figure is unknown or wrong.

    Example:
        >>> config = TrainingConfig(output_dir="runs/exp1", max_steps=1000, learning_rate=3e-4,
        ...                         lr_scheduler_type="cosine", warmup_ratio=0.03)
        >>> tx = config.build_optimizer(total_steps=config.max_steps)
    """

    # Options TRL users may pass that kithara has no field for, and what to do instead.
    unsupported_arguments: ClassVar[Mapping[str, str]] = _NOT_IN_KITHARA

    output_dir: str | None = None
    max_steps: int | None = None
    num_train_epochs: int | None = None
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "constant"
    lr_scheduler_kwargs: dict[str, Any] | None = None
    warmup_steps: int | float = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    optim: str = "adamw"
    logging_steps: int = 1
    eval_strategy: str | None = None
    eval_steps: int | None = None
    eval_epochs: int | None = None
    max_eval_samples: int | None = None
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    resume: bool = True
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    seed: int = 0
    report_to: str | Sequence[str] = "tensorboard"
    run_name: str | None = None
    project: str | None = None
    logging_dir: str | None = None
    disable_tqdm: bool = False
    profile_start_step: int | None = None
    profile_num_steps: int = 3
    skip_bad_rows: bool = False
    peak_flops_per_device: float | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # Runs before the dataclass __init__, whose own error would name no alternative.
        cls._check_names(kwargs, cls.__name__)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self._normalise()
        self._check_types()
        self._validate()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str | None = None) -> Self:
        """A config from a mapping (a YAML section, say); unknown keys are refused with the
        closest field name, the message starting with ``where`` (default the class name)."""
        cls._check_names(mapping, where or cls.__name__)
        return cls(**mapping)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, checked like a new config."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_names(cls, names: Iterable[str], where: str) -> None:
        check_names(
            names, cls.field_names(), where, unsupported=cls.unsupported_arguments, docs=f"help({cls.__name__})"
        )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, by name (without building a config)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def changed_fields(self) -> dict[str, Any]:
        """The fields whose values differ from those of a default config of this class (as
        built, so normalised values such as a loss-type tuple compare equal), by name."""
        default = _default_config(type(self))
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    @property
    def needs_total_steps(self) -> bool:
        """Whether the learning-rate schedule spans the run's steps (so needs their count):
        every schedule but a constant one, and any warmup given as a fraction."""
        fraction = (isinstance(self.warmup_steps, float) and self.warmup_steps < 1) or self.warmup_ratio > 0
        return self.lr_scheduler_type not in ("constant", "constant_with_warmup") or fraction

    @property
    def precision(self) -> str | None:
        """The kithara precision the flags ask for (``"mixed_bfloat16"`` for ``bf16``,
        ``"mixed_float16"`` for ``fp16``), or ``None``: keep the model's."""
        return "mixed_bfloat16" if self.bf16 else "mixed_float16" if self.fp16 else None

    @property
    def eval_batch_size(self) -> int:
        """Rows per device per eval batch."""
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def eval_every_steps(self) -> int | None:
        """Steps between evaluations, or ``None`` when not evaluating by steps."""
        if self.eval_strategy != "steps":
            return None
        return self.eval_steps or self.logging_steps

    @property
    def eval_every_epochs(self) -> int | None:
        """Epochs between evaluations, or ``None`` when not evaluating by epochs."""
        if self.eval_strategy != "epoch":
            return None
        return self.eval_epochs or 1

    @property
    def checkpoint_dir(self) -> str | None:
        """Where checkpoints go, or ``None`` when none are saved."""
        if self.output_dir is None or self.save_strategy == "no":
            return None
        return _join(self.output_dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str | None:
        """Where TensorBoard scalars (and profiles) go, or ``None``."""
        if not self._reports_tensorboard:
            return None
        if self.logging_dir is not None:
            return self.logging_dir
        return None if self.output_dir is None else _join(self.output_dir, "runs")

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warmup steps out of ``total_steps``, as transformers' ``get_warmup_steps`` counts them."""
        _check_total_steps(total_steps)
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(total_steps * (self.warmup_steps or self.warmup_ratio))

    def schedule(self, total_steps: int) -> optax.Schedule:
        """The learning rate of each optimizer step (from 0) over ``total_steps`` steps,
        with transformers' ``get_scheduler`` formulas; ``k`` is the step, ``w`` the warmup
        steps, ``T`` the total, ``p = (k - w) / max(1, T - w)``:

        - ``constant``: ``lr``.
        - ``constant_with_warmup``: ``lr * k / w`` while ``k < w``, then ``lr``.
        - ``linear``: warmup, then ``lr * max(0, (T - k) / max(1, T - w))``.
        - ``cosine``: warmup, then ``lr * 0.5 * (1 + cos(2 pi num_cycles p))`` (num_cycles 0.5).
        - ``cosine_with_min_lr``: warmup, then the cosine factor ``f`` rescaled to
          ``lr * (r + (1 - r) f)`` with ``r = min_lr_rate`` or ``min_lr / lr``.
        """
        peak, total = self.learning_rate, float(total_steps)
        warmup = float(self.num_warmup_steps(total_steps))
        if self.lr_scheduler_type == "constant":
            return optax.constant_schedule(peak)
        options = self.lr_scheduler_kwargs or {}
        cycles = float(options.get("num_cycles", 0.5))
        floor = options["min_lr"] / peak if "min_lr" in options else float(options.get("min_lr_rate", 0.0))
        span = max(1.0, total - warmup)
        kind = self.lr_scheduler_type

        def after_warmup(k: jax.Array) -> jax.Array:
            if kind == "constant_with_warmup":
                return jnp.ones_like(k)
            if kind == "linear":
                return jnp.maximum(0.0, (total - k) / span)
            # 0.5 * (1 + cos(2 pi c p)) = sin(pi n / (2 span)) ** 2 with n = span - 2 c (k - w),
            # and sin(pi x) ** 2 repeats every 1 and mirrors about each integer. So n is folded
            # into [0, span] first (exactly: whole numbers when 2c is whole) and the sine of
            # the distance to the cosine's zero keeps float32 within a few ulps near it, where
            # the cosine form loses all relative precision (the last steps of training).
            n = jnp.mod(span - 2.0 * cycles * (k - warmup), 2.0 * span)
            wave = jnp.sin(jnp.pi * jnp.minimum(n, 2.0 * span - n) / (2.0 * span)) ** 2
            return jnp.maximum(0.0, floor + (1.0 - floor) * wave)

        def learning_rate(count: jax.Array | int) -> jax.Array:
            k = jnp.asarray(count, jnp.float32)
            return peak * jnp.where(k < warmup, k / max(1.0, warmup), after_warmup(k))

        return learning_rate

    def build_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optimizer over ``total_steps`` steps: ``optim`` with this config's schedule,
        weight decay, betas, epsilon and clipping; its learning rate is logged."""
        # A constant rate goes in as a number, as kithara.optimizers.adamw(lr) takes it: the
        # optimizer state then has no schedule counter, so checkpoints keep their layout.
        schedule: Any = self.learning_rate if self.lr_scheduler_type == "constant" else self.schedule(total_steps)
        if self.optim != "sgd":
            return optimizers.adamw(
                schedule,
                weight_decay=self.weight_decay,
                b1=self.adam_beta1,
                b2=self.adam_beta2,
                eps=self.adam_epsilon,
                max_grad_norm=self.max_grad_norm,
                state_dtype="int8" if self.optim in ADAMW_8BIT_NAMES else "float32",
            )

        def sgd(learning_rate: Any) -> optax.GradientTransformation:
            # torch.optim.SGD's weight decay: added to the (clipped) gradient, then scaled by lr.
            chain = [optax.clip_by_global_norm(self.max_grad_norm)] if self.max_grad_norm else []
            if self.weight_decay:
                chain.append(optax.add_decayed_weights(self.weight_decay))
            chain.append(optax.sgd(learning_rate))
            return optax.chain(*chain)

        return optax.inject_hyperparams(sgd)(learning_rate=schedule)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen once built

    def _normalise(self) -> None:
        """Turns TRL's spellings of values into kithara's before the type checks."""
        if self.max_steps == -1:
            self._set("max_steps", None)
        epochs = self.num_train_epochs
        if isinstance(epochs, float):
            if not epochs.is_integer():
                raise ValueError(
                    f"num_train_epochs={epochs}: kithara trains whole epochs; use max_steps for part of an epoch."
                )
            self._set("num_train_epochs", int(epochs))
        if self.eval_strategy is None and self.eval_steps is not None:
            self._set("eval_strategy", "steps")
        elif self.eval_strategy is None and self.eval_epochs is not None:
            self._set("eval_strategy", "epoch")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if isinstance(value, float):
                if 0 < value < 1:
                    raise ValueError(
                        f"{name}={value}: a fraction of all steps is not supported; give a number of steps."
                    )
                if value.is_integer():
                    self._set(name, int(value))
        warmup = self.warmup_steps
        if isinstance(warmup, float) and warmup >= 1:
            if not warmup.is_integer():
                raise ValueError(f"warmup_steps={warmup}: give a whole number of steps, or a fraction in (0, 1).")
            self._set("warmup_steps", int(warmup))

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for name in self.field_names():
            value, hint = getattr(self, name), hints[name]
            if not _is_instance(value, hint):
                raise ValueError(
                    f"{type(self).__name__}.{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})."
                )
            if isinstance(value, int) and not isinstance(value, bool) and hint in (float, float | None):
                self._set(name, float(value))

    def _validate(self) -> None:
        _at_least(1, per_device_train_batch_size=self.per_device_train_batch_size)
        _at_least(1, gradient_accumulation_steps=self.gradient_accumulation_steps, logging_steps=self.logging_steps)
        _at_least(1, save_steps=self.save_steps, profile_num_steps=self.profile_num_steps)
        _at_least(1, max_steps=self.max_steps, num_train_epochs=self.num_train_epochs)
        _at_least(1, per_device_eval_batch_size=self.per_device_eval_batch_size)
        _at_least(1, eval_steps=self.eval_steps, eval_epochs=self.eval_epochs, max_eval_samples=self.max_eval_samples)
        _at_least(1, save_total_limit=self.save_total_limit, profile_start_step=self.profile_start_step)
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError(
                f"Set max_steps ({self.max_steps}) or num_train_epochs ({self.num_train_epochs}), not both."
            )
        self._validate_unused()
        self._validate_optimizer()
        self._validate_schedule()
        self._validate_eval_and_save()
        self._validate_outputs()
        if self.fp16 and self.bf16:
            raise ValueError("Set bf16 or fp16, not both.")
        _at_least(1, loss_chunk_size=self.loss_chunk_size)

    def _validate_optimizer(self) -> None:
        if self.optim not in OPTIMIZERS:
            paged = (
                " Paged optimizers move state to CPU memory under CUDA memory pressure; kithara keeps it "
                "in host memory with offload_optimizer=True (with optim='adamw_8bit' for 8-bit state)."
                if self.optim.startswith("paged_")
                else ""
            )
            raise NotImplementedError(
                f"optim={self.optim!r} is not supported yet; choose one of {list(OPTIMIZERS)} "
                f"({', '.join(ADAMW_NAMES)} are all AdamW; {', '.join(ADAMW_8BIT_NAMES)} are bitsandbytes' "
                f"8-bit AdamW).{paged}"
            )
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.adam_epsilon <= 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}.")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}.")
        if self.peak_flops_per_device is not None and self.peak_flops_per_device <= 0:
            raise ValueError(f"peak_flops_per_device must be > 0, got {self.peak_flops_per_device}.")

    def _validate_schedule(self) -> None:
        kind = self.lr_scheduler_type
        if kind in _OTHER_SCHEDULERS:
            raise NotImplementedError(f"lr_scheduler_type={kind!r} is not supported yet; choose one of {SCHEDULERS}.")
        if kind not in SCHEDULERS:
            check_names([kind], SCHEDULERS, "lr_scheduler_type", what="scheduler", error=ValueError)
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ValueError(
                f"warmup_steps must be >= 0 and warmup_ratio in [0, 1], got {self.warmup_steps}, {self.warmup_ratio}."
            )
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                f"Set warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both "
                "(warmup_steps also takes a fraction in (0, 1))."
            )
        if kind == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError(
                "lr_scheduler_type='constant' has no warmup (transformers ignores it); use "
                "'constant_with_warmup' or drop warmup_steps / warmup_ratio."
            )
        options = self.lr_scheduler_kwargs or {}
        allowed = SCHEDULER_KWARGS[kind]
        check_names(options, allowed, f"lr_scheduler_kwargs for {kind!r}", what="option", error=ValueError)
        for name, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"lr_scheduler_kwargs[{name!r}] must be a number >= 0, got {value!r}.")
        if options.get("num_cycles", 0.5) <= 0:
            raise ValueError(f"lr_scheduler_kwargs['num_cycles'] must be > 0, got {options['num_cycles']}.")
        if kind == "cosine_with_min_lr":
            if ("min_lr" in options) == ("min_lr_rate" in options):
                raise ValueError(
                    "lr_scheduler_type='cosine_with_min_lr' needs exactly one of lr_scheduler_kwargs['min_lr'] "
                    "and lr_scheduler_kwargs['min_lr_rate']."
                )
            if "min_lr" in options and self.learning_rate == 0:
                raise ValueError("lr_scheduler_kwargs['min_lr'] needs learning_rate > 0 (it is divided by it).")

    def _validate_unused(self) -> None:
        """Refuses fields that would be ignored because of another field's value."""
        defaults = self.defaults()
        pairs = [
            ("save_steps", self.save_strategy == "no", "save_strategy='no' saves nothing"),
            ("profile_num_steps", self.profile_start_step is None, "profile_start_step is unset"),
        ]
        pairs += [(name, self.optim == "sgd", "optim='sgd' has no such setting") for name in _ADAM_FIELDS]
        for name, unused, why in pairs:
            if unused and getattr(self, name) != defaults[name]:
                raise ValueError(f"{name}={getattr(self, name)!r} would be ignored: {why}.")

    def _validate_eval_and_save(self) -> None:
        if self.eval_strategy is not None and self.eval_strategy not in EVAL_STRATEGIES:
            check_names([self.eval_strategy], EVAL_STRATEGIES, "eval_strategy", what="strategy", error=ValueError)
        if self.eval_steps is not None and self.eval_strategy != "steps":
            raise ValueError(
                f"eval_steps={self.eval_steps} needs eval_strategy='steps' (got {self.eval_strategy!r}); "
                "set eval_strategy='steps' or drop eval_steps."
            )
        if self.eval_epochs is not None and self.eval_strategy != "epoch":
            raise ValueError(
                f"eval_epochs={self.eval_epochs} needs eval_strategy='epoch' (got {self.eval_strategy!r}); "
                "set eval_strategy='epoch' or drop eval_epochs."
            )
        if self.save_strategy in ("epoch", "best"):
            raise NotImplementedError(
                f"save_strategy={self.save_strategy!r} is not supported yet; use 'steps' with save_steps."
            )
        if self.save_strategy not in SAVE_STRATEGIES:
            check_names([self.save_strategy], SAVE_STRATEGIES, "save_strategy", what="strategy", error=ValueError)
        if self.save_total_limit is not None and self.checkpoint_dir is None:
            raise ValueError(
                f"save_total_limit={self.save_total_limit} has no effect: checkpoints are saved only with an "
                "output_dir and save_strategy='steps'."
            )

    def _validate_outputs(self) -> None:
        names = self._report_to_names
        for name in names:
            if name in _OTHER_INTEGRATIONS:
                raise NotImplementedError(
                    f"report_to={self.report_to!r}: kithara has no {name} logger; choose from {list(REPORT_TO)}, "
                    "or write a kithara.Callback that logs info.metrics."
                )
        check_names(names, REPORT_TO, "report_to", what="integration", error=ValueError)
        if "none" in names and len(names) > 1:
            raise ValueError(f"report_to={self.report_to!r} mixes 'none' with integrations.")
        for name in names:
            if name in OPTIONAL_INTEGRATIONS and not integration_installed(name):
                module, extra = OPTIONAL_INTEGRATIONS[name]
                raise ImportError(
                    f"report_to={self.report_to!r} needs the {module} package, which is not installed: "
                    f'pip install "kithara[{extra}]".'
                )
        if self.logging_dir is not None and not self._reports_tensorboard:
            raise ValueError(
                f"logging_dir={self.logging_dir!r} is a TensorBoard directory, but report_to={self.report_to!r}."
            )
        if self.profile_start_step is not None and self.tensorboard_dir is None:
            raise ValueError(
                "profile_start_step is set, but profiles go to the TensorBoard directory and there is none: "
                "set output_dir or logging_dir (and report_to='tensorboard')."
            )

    @property
    def report_integrations(self) -> tuple[str, ...]:
        """The integrations ``report_to`` asks for, in the order ``tensorboard``, ``wandb``,
        ``mlflow``: ``"all"`` is TensorBoard (a core dependency) plus each optional one that
        is installed, as transformers' ``"all"`` is every installed integration."""
        names = self._report_to_names
        if "all" in names:
            wanted = {"tensorboard", *(n for n in OPTIONAL_INTEGRATIONS if integration_installed(n))}
        else:
            wanted = set(names) - {"none"}
        return tuple(n for n in REPORT_TO if n in wanted)

    @property
    def _report_to_names(self) -> list[str]:
        return [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)

    @property
    def _reports_tensorboard(self) -> bool:
        names = self._report_to_names
        return "tensorboard" in names or "all" in names


def integration_installed(name: str) -> bool:
    """Whether the package of the optional ``report_to`` integration ``name`` can be imported
    (looked up without importing it: wandb and mlflow take seconds to import)."""
    module = OPTIONAL_INTEGRATIONS[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec (set to None: import blocked)
        return False


_DEFAULT_CONFIGS: dict[type, TrainingConfig] = {}


def _default_config(cls: type[TrainingConfig]) -> TrainingConfig:
    """A default config of ``cls``, built once."""
    if cls not in _DEFAULT_CONFIGS:
        _DEFAULT_CONFIGS[cls] = cls()
    return _DEFAULT_CONFIGS[cls]


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"  # not os.path: gs:// paths too


def _check_total_steps(total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")


def _at_least(minimum: int, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _is_instance(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a field annotation (ints count as floats, bools as neither)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in args)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is None:
        return isinstance(value, hint)
    if not isinstance(value, origin):
        return False
    if origin in (dict, Mapping):
        return all(isinstance(k, str) for k in value)
    return not args or all(_is_instance(v, args[0]) for v in value)


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("collections.abc.", "")
