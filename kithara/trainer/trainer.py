"""The base Trainer: builds the state, jits one step, and runs the loop."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler, ProgressBar, StepInfo
from kithara.callbacks.base import check_hooks, hook
from kithara.callbacks.loggers import reporting_callbacks
from kithara.data.dataloader import DataIterator, Dataloader, pad_length
from kithara.distributed.consistency import check_same_on_all_processes
from kithara.models import remat
from kithara.models.model import Model, ModelVariables
from kithara.trainer import loss_scale, offload, setup, validation
from kithara.trainer import step as step_lib
from kithara.trainer.arguments import (
    KITHARA_ARGUMENTS,
    as_dataloader,
    check_float16_attention,
    check_nothing_ignored,
    check_precision,
    computes_in_float16,
    resolve_config,
)
from kithara.trainer.config import TrainingConfig
from kithara.trainer.evaluation import evaluate_loader
from kithara.trainer.losses import LossOutput, causal_lm_loss
from kithara.trainer.optimizers import as_gradient_transformation
from kithara.trainer.programs import StepPrograms
from kithara.trainer.progress import TrainerState, log_history
from kithara.trainer.restore import checkpoint_to_restore
from kithara.trainer.setup import plan_steps
from kithara.trainer.state import TrainState
from kithara.trainer.throughput import mesh_peak_flops

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the loop needs to know of the training data before it starts.

    Attributes:
        batches_per_epoch: micro-batches in one epoch, or None when batches come only
            through ``run_step`` (then ``steps`` bounds ``train()``).
        global_batch_size: rows per micro-batch over all processes (None if unknown).
        sequence_length: tokens per row, for FLOP counts (None if unknown).
        has_eval: whether ``evaluate()`` has data (schedules evaluation).
    """

    batches_per_epoch: int | None
    global_batch_size: int | None = None
    sequence_length: int | None = None
    has_eval: bool = False


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    epoch: int
    metrics: dict[str, jax.Array]


class Trainer:
    """Trains a ``Model`` with next-token cross-entropy; subclass it for other objectives.

    Subclasses implement the hooks of "Writing an objective" in docs/trainer.md
    (``compute_loss``, and when the algorithm needs them ``frozen_variables``,
    ``train_step``, ``host_step``, ``batches`` / ``data_state``, ``data_plan`` and
    ``eval_metrics``); the loop, accumulation, jitting, logging, restore and callbacks
    stay here.

    Settings come as one ``kithara.TrainingConfig`` (``args=``, TRL's names), as its fields
    given as keywords (``max_steps=100``), or under the Kithara trainer's names below, which
    set the matching fields; an unknown keyword is refused with the closest spelling.

    Args:
        model: the model to train; its variables are taken over while training and handed
            back (``model.variables``) when ``train()`` or ``evaluate()`` returns.
        optimizer: an ``optax.GradientTransformation`` or a (fresh) keras optimizer; ``None``
            builds ``args``'s (``optim``, ``learning_rate``, ``lr_scheduler_type``, warmup,
            ``weight_decay``, ``max_grad_norm``) over the run's total steps.
        train_dataloader: a ``kithara.Dataloader`` of training batches; ``None`` for
            objectives that feed their own batches through ``run_step``.
        eval_dataloader: a ``kithara.Dataloader`` for evaluation.
        steps: ``args.max_steps``: optimizer steps to run. Only one of ``steps`` and
            ``epochs``; neither means one epoch.
        epochs: ``args.num_train_epochs``: passes over the training data.
        log_steps_interval: ``args.logging_steps``.
        eval_steps_interval / eval_epochs_interval: evaluate every this many steps or
            epochs (``args.eval_strategy`` with ``eval_steps`` / ``eval_epochs``). With
            evaluation data and neither set, evaluates every epoch.
        max_eval_samples: evaluate on at most this many rows (packed rows when packing).
        tensorboard_dir: ``args.logging_dir``: TensorBoard scalars, local or ``gs://``.
        profiler: a ``kithara.Profiler`` (or ``args.profile_start_step``).
        checkpointer: a ``kithara.Checkpointer`` (or ``args.output_dir``: checkpoints every
            ``save_steps`` in ``{output_dir}/checkpoints``); ``train()`` resumes from its
            latest checkpoint.
        callbacks: more ``Callback`` objects (``add_callback`` adds them later).
        args: a ``kithara.TrainingConfig`` (an objective takes its own config class).
        train_dataset / eval_dataset: TRL's names: a ``Dataloader``, a ``kithara.data``
            dataset or example rows, batched with ``args.per_device_train_batch_size`` /
            ``per_device_eval_batch_size``.
        progress_bar: ``not args.disable_tqdm``.
        **fields: any ``TrainingConfig`` field (``gradient_accumulation_steps``, ``seed``,
            ``learning_rate``, ``peak_flops_per_device``, ...).

    Example:
        >>> trainer = Trainer(model, kithara.optimizers.adamw(3e-4), train_loader,
        ...                   eval_dataloader=eval_loader, steps=200, eval_steps_interval=50)
        >>> trainer = Trainer(model, train_dataset=loader,
        ...                   args=kithara.TrainingConfig(max_steps=200, learning_rate=3e-4))
        >>> trainer.train()
    """

    reports_perplexity = True  # evaluate() adds exp(loss); objectives whose loss is no token NLL turn it off
    # Attributes read while tracing the jitted steps: fixed once the base __init__ returns
    # (assigning one later raises, instead of being silently ignored by a compiled step).
    step_constants: tuple[str, ...] = ("model", "tx", "args")
    config_class: type[TrainingConfig] = TrainingConfig

    def __init__(
        self,
        model: Model,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | None = None,
        train_dataloader: Dataloader | None = None,
        eval_dataloader: Dataloader | None = None,
        steps: int | None = None,
        epochs: int | None = None,
        log_steps_interval: int | None = None,
        eval_steps_interval: int | None = None,
        eval_epochs_interval: int | None = None,
        max_eval_samples: int | None = None,
        tensorboard_dir: str | None = None,
        profiler: Profiler | None = None,
        checkpointer: Checkpointer | None = None,
        callbacks: Sequence[Callback] = (),
        *,
        args: TrainingConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        progress_bar: bool | None = None,
        **fields: Any,
    ) -> None:
        kithara_arguments = dict(
            steps=steps,
            epochs=epochs,
            log_steps_interval=log_steps_interval,
            eval_steps_interval=eval_steps_interval,
            eval_epochs_interval=eval_epochs_interval,
            tensorboard_dir=tensorboard_dir,
            progress_bar=progress_bar,
        )
        if max_eval_samples is not None:
            fields["max_eval_samples"] = max_eval_samples
        config = self.resolve_config(args, **kithara_arguments, **fields)
        self.args = config
        if not isinstance(model, Model):
            raise TypeError(f"model must be a kithara.Model, got {type(model).__name__}.")
        check_precision(model, config)
        check_float16_attention(model)
        if config.gradient_checkpointing:  # TRL's name for ScaleConfig(remat="full") (docs/scale.md)
            remat.enable_gradient_checkpointing(model)
        if config.loss_chunk_size is not None and not model.supports_chunked_loss:
            raise ValueError(
                f"loss_chunk_size={config.loss_chunk_size}: {type(model).__name__} computes its logits whole "
                "(no LM head to run on chunks of positions), so the option would do nothing. Leave it unset."
            )
        train_dataloader = as_dataloader("train", train_dataloader, train_dataset, config)
        eval_dataloader = as_dataloader("eval", eval_dataloader, eval_dataset, config)
        check_nothing_ignored(
            config,
            optimizer_given=optimizer is not None,
            checkpointer_given=checkpointer is not None or any(isinstance(cb, Checkpointer) for cb in callbacks),
            profiler_given=profiler is not None,
            loaders={"train": train_dataloader, "eval": eval_dataloader},
            where=type(self).__name__,
        )
        loaders = {"train_dataloader": train_dataloader, "eval_dataloader": eval_dataloader}
        validation.check_setup(model, getattr(self, "tokenizer", None), loaders)
        self.model = model
        self.train_dataloader = train_dataloader
        self.eval_dataloader = eval_dataloader
        self.gradient_accumulation_steps = config.gradient_accumulation_steps
        plan = self.data_plan()
        if not plan.has_eval and (config.eval_strategy not in (None, "no") or config.max_eval_samples):
            raise ValueError(
                "An evaluation schedule (eval_strategy / eval_steps / eval_epochs) or max_eval_samples was set "
                "but no eval_dataloader (or eval_dataset) was given."
            )
        if not plan.has_eval and config.per_device_eval_batch_size is not None:
            raise ValueError(
                f"per_device_eval_batch_size={config.per_device_eval_batch_size} is set but there is no "
                "evaluation data (eval_dataloader / eval_dataset)."
            )
        if plan.batches_per_epoch is None and config.num_train_epochs is not None:
            raise ValueError(
                f"num_train_epochs={config.num_train_epochs}: {type(self).__name__} gets its batches through "
                "run_step / step(), so it has no epochs; set max_steps (the length of the learning-rate "
                "schedule) instead."
            )
        strategy = config.eval_strategy or ("epoch" if plan.has_eval else "no")
        self.has_eval = plan.has_eval
        if plan.batches_per_epoch is None:
            self.steps_per_epoch, self.total_steps = 1, config.max_steps or 0
        else:
            self.steps_per_epoch, self.total_steps = plan_steps(
                plan.batches_per_epoch,
                steps=config.max_steps,
                epochs=config.num_train_epochs,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
            )
        self.log_steps_interval = config.logging_steps
        self.eval_steps_interval = (config.eval_steps or config.logging_steps) if strategy == "steps" else None
        self.eval_epochs_interval = (config.eval_epochs or 1) if strategy == "epoch" else None
        self.max_eval_samples = config.max_eval_samples
        self.tensorboard_dir = config.tensorboard_dir
        self.seed = config.seed
        self.peak_flops_per_device = config.peak_flops_per_device
        if profiler is None and config.profile_start_step is not None:
            profiler = Profiler(config.profile_start_step, config.profile_num_steps)
        if config.checkpoint_dir is not None:
            if checkpointer is not None or any(isinstance(cb, Checkpointer) for cb in callbacks):
                raise ValueError(
                    f"args.output_dir={config.output_dir!r} saves checkpoints (save_strategy='steps') and a "
                    "Checkpointer was passed too; use one of them (or save_strategy='no')."
                )
            checkpointer = Checkpointer(
                config.checkpoint_dir, config.save_steps, config.save_total_limit, resume=config.resume
            )
        self.callbacks: list[Callback] = [cb for cb in (checkpointer, profiler) if cb is not None]
        self.callbacks.extend(reporting_callbacks(config))
        if not config.disable_tqdm:
            self.callbacks.append(ProgressBar())
        self.callbacks.extend(callbacks)
        check_signatures(self)
        # A Checkpointer passed among the callbacks must restore too, not only save.
        found = [cb for cb in self.callbacks if isinstance(cb, Checkpointer)]
        if len(found) > 1:
            raise ValueError("Pass at most one Checkpointer (checkpointer= or among callbacks=).")
        self.checkpointer = found[0] if found else None

        # The steps the trainer's own learning-rate schedule spans: a resumed run must match.
        self._schedule_steps = self.total_steps if optimizer is None and config.needs_total_steps else None
        if optimizer is None:
            if self.total_steps == 0 and config.needs_total_steps:
                raise ValueError(
                    f"lr_scheduler_type={config.lr_scheduler_type!r} (or a warmup fraction) spans the run's steps, "
                    f"but {type(self).__name__} steps come through run_step and max_steps is unset: set "
                    "args.max_steps, or use 'constant' / 'constant_with_warmup' with warmup_steps as a count."
                )
            optimizer = self.default_optimizer(max(self.total_steps, 1))
        tx = as_gradient_transformation(optimizer, setup.param_shapes(model))
        if computes_in_float16(model):  # float16 gradients underflow and overflow without a loss scale
            tx = loss_scale.with_loss_scaling(tx, setup.param_shapes(model))
        self.tx = tx
        self.state_shardings = setup.state_shardings(model, self.tx)
        if config.offload_optimizer or config.offload_params:  # host memory between steps (docs/scale.md)
            where = dict(offload_optimizer=config.offload_optimizer, offload_params=config.offload_params)
            offload.check_supported(model.mesh, **where)
            self.state_shardings = offload.offloaded_shardings(self.state_shardings, **where)
        # Processes set up differently would compile different steps and hang in their first
        # collective; compare them now and name the difference instead.
        self._plan = plan
        check_same_on_all_processes(self._setup_description(), "trainer set-up")
        self._programs = StepPrograms(
            self.train_step,
            self.compute_loss,
            self.score_batch,
            self.state_shardings,
            model.mesh,
            self.frozen_variables(),
        )
        self.train_state: TrainState | None = None
        self.data_iterator: DataIterator | None = None
        self.start_step = 0
        self.restored_step: int | None = None
        self.preempted = False  # set when a checkpointer saved and stopped on SIGTERM
        self.error: BaseException | None = None
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self._restored_data_state: dict[str, Any] | None = None
        self._stop_reason: str | None = None
        self._peak_flops: float | None = None
        self._epoch = 0
        self._manual = False  # run_step() has begun the callbacks and finish() has not ended them
        self._training = False  # train() is running (its callbacks have begun)
        self._sealed = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).step_constants and self.__dict__.get("_sealed"):
            raise AttributeError(
                f"{type(self).__name__}.{name} is fixed at construction: the jitted steps read it when they "
                "compile, so a new value would be ignored. Build a new trainer with the value you want."
            )
        super().__setattr__(name, value)

    @classmethod
    def resolve_config(cls, args: TrainingConfig | None = None, /, **arguments: Any) -> TrainingConfig:
        """``cls.config_class`` from ``args`` and keywords: config fields, or the Kithara
        trainer's names (``steps``, ``epochs``, ...). Unknown names are refused with the
        closest spelling; a keyword that contradicts ``args`` is refused naming both."""
        kithara = {k: arguments.pop(k) for k in list(arguments) if k in KITHARA_ARGUMENTS}
        return resolve_config(cls.config_class, args, kithara, arguments, where=cls.__name__)

    # The objective contract (docs/trainer.md, "Writing an objective") ------------------

    def compute_loss(
        self, variables: ModelVariables, batch: step_lib.Batch, rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The loss of one (micro-)batch as a ``LossOutput`` (sum and weight) plus the
        model's updated non-trainable variables. ``frozen`` is what ``frozen_variables()``
        returned (None by default). Runs inside ``jax.jit``: pure; reads only its arguments
        and ``step_constants``, never writes to ``self``."""
        del rng, frozen
        return causal_lm_loss(self.model, variables, batch, chunk_size=self.args.loss_chunk_size)

    def default_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optimizer when none is given (called once, by the base ``__init__``): by
        default ``args.build_optimizer(total_steps)`` (AdamW or SGD with its schedule)."""
        return self.args.build_optimizer(total_steps)

    def frozen_variables(self) -> Any:
        """Arrays the steps read but never train (reference, reward or value models), placed
        on the model's mesh; passed into the jitted steps as an argument with their own
        shardings, never baked in as constants. Called once, by the base ``__init__``."""
        return None

    def train_step(self, state: TrainState, batch: step_lib.Batch, frozen: Any) -> tuple[TrainState, dict]:
        """One pure optimizer update (jitted once, here in the base class, with the state
        donated): by default ``kithara.trainer.step.train_step`` on ``compute_loss``."""
        loss_fn = functools.partial(self.compute_loss, frozen=frozen)
        return step_lib.train_step(state, batch, loss_fn=loss_fn, tx=self.tx)

    def host_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One training step on the host, between batches: by default one call of the jitted
        ``train_step``. Objectives whose update takes several programs (generate, then
        update; several updates per batch) override it and call ``jitted_train_step`` and
        their own generation. Returns device metrics (read one step late); they must hold
        ``loss`` and ``tokens``."""
        return self.jitted_train_step(state, batch)

    def score_batch(self, variables: ModelVariables, batch: step_lib.Batch, frozen: Any) -> dict[str, jax.Array]:
        """Per-row (or per-token) quantities of a ``[rows, ...]`` batch without gradients,
        for objectives that score their own rollouts before updating on them (old and
        reference log-probs, values); called through ``jitted_score``. Pure, like
        ``compute_loss``. Not defined by default."""
        raise NotImplementedError(f"{type(self).__name__} defines no score_batch hook.")

    def data_plan(self) -> DataPlan:
        """Sizes of the training data (called by the base ``__init__``): by default those of
        ``train_dataloader`` and whether there is an ``eval_dataloader``."""
        loader = self.train_dataloader
        if loader is None:
            return DataPlan(None, has_eval=self.eval_dataloader is not None)
        return DataPlan(
            len(loader), loader.global_batch_size, loader.sequence_length, has_eval=self.eval_dataloader is not None
        )

    def batches(self, start_step: int, data_state: dict[str, Any] | None) -> Iterator[tuple[int, Any]]:
        """``(epoch, batch)`` for every step from ``start_step`` on. ``data_state`` is what
        ``data_state()`` returned when the restored checkpoint was saved (None when not
        resuming). By default: ``gradient_accumulation_steps`` loader batches stacked into
        ``[micro_batches, rows, length]`` global arrays."""
        k = self.gradient_accumulation_steps
        self.data_iterator = self._train_loader().iterator(batches_per_epoch=self.steps_per_epoch * k)
        if data_state is not None:
            # Refuses, with the loader's message, a state saved for other data or settings.
            self.data_iterator.set_state(data_state)
        else:
            epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
            self.data_iterator.seek(epoch, step_in_epoch * k)
        for step in itertools.count(start_step):
            epoch = step // self.steps_per_epoch
            micro = [next(self.data_iterator) for _ in range(k)]
            if k == 1:  # the common case: a view, no padding or copy on the host
                stacked = {key: v[None] for key, v in micro[0].items()}
            else:
                length = max(v.shape[-1] for m in micro for v in m.values() if v.ndim >= 2)
                micro = [pad_length(m, length) for m in micro]
                stacked = {key: np.stack([m[key] for m in micro]) for key in micro[0]}
            yield epoch, sharding_lib.shard_batch(stacked, self.model.mesh, leading_dims=1)

    def data_state(self) -> dict[str, Any]:
        """The data position after the batches ``batches`` has yielded so far (JSON-able):
        what a checkpoint stores, handed back to ``batches`` on resume."""
        return self.data_iterator.get_state() if self.data_iterator is not None else {}

    def eval_metrics(self, variables: ModelVariables) -> dict[str, float]:
        """Evaluation metrics of ``variables``: by default loss, perplexity and the
        ``LossOutput`` sums over the eval loader (``max_eval_samples`` rows at most)."""
        if self.eval_dataloader is None:
            raise ValueError("evaluate() needs an eval_dataloader.")
        return evaluate_loader(
            self.jitted_eval_step,
            variables,
            self.eval_dataloader,
            self.model.mesh,
            max_eval_samples=self.max_eval_samples,
            reports_perplexity=self.reports_perplexity,
        )

    # The compiled steps (kithara.trainer.programs: the only jax.jit sites) -------------

    def jitted_train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """``train_step`` compiled (once per batch structure and shape), the frozen
        variables passed in; ``state`` is donated."""
        return self._programs.train(state, batch)

    def jitted_eval_step(self, variables: ModelVariables, batch: Any) -> LossOutput:
        """``compute_loss`` of one ``[rows, ...]`` batch, compiled, without gradients."""
        return self._programs.evaluate(variables, batch)

    def jitted_score(self, variables: ModelVariables, batch: Any) -> dict[str, jax.Array]:
        """``score_batch`` compiled (once per batch shape), the frozen variables passed in;
        the result is replicated, so every process can read all of it."""
        return self._programs.score(variables, batch)

    def lower_train_step(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The train step lowered for ``(state, batch)`` (``.compile().memory_analysis()``
        and ``.cost_analysis()`` read its memory and FLOPs); nothing runs."""
        return self._programs.lower_train(state, batch)

    @property
    def compilations(self) -> dict[str, int]:
        """How many programs each jitted step has compiled (one per batch structure and shape)."""
        return self._programs.compilations

    @property
    def state(self) -> TrainerState:
        """Progress as TRL reports it: ``global_step``, ``epoch``, ``max_steps`` and
        ``log_history`` (the device state is ``train_state``)."""
        step = self._final_step()
        history = log_history(
            self.history,
            self.eval_history,
            steps_per_epoch=self.steps_per_epoch,
            logging_steps=self.log_steps_interval,
            total_steps=self.total_steps,
        )
        return TrainerState(step, step / self.steps_per_epoch, self.total_steps, history)

    @property
    def frozen(self) -> Any:
        """The frozen variables passed to the steps (``frozen_variables()``'s result, or what
        was last assigned).

        Assigning replaces them (a reference model moved toward the policy, say) without
        recompiling: the new value must have the same tree structure, shapes and dtypes, and
        is placed on the shardings the steps were compiled with (arrays already there are
        not copied, except those sharing memory with the train state, which the next step
        donates). The old arrays are dropped. ``SyncRefModelCallback`` assigns it.

        Example:
            >>> trainer.frozen = jax.tree.map(lambda r: 0.5 * r, trainer.frozen)
        """
        return self._programs.frozen

    @frozen.setter
    def frozen(self, variables: Any) -> None:
        self._programs.replace_frozen(variables, self.train_state, who=type(self).__name__)

    # State ------------------------------------------------------------------------------

    def _setup_description(self) -> dict[str, Any]:
        """What must be identical on every process: mesh, schedule, batch and state layout."""
        plan = self._plan
        shapes = setup.param_shapes(self.model)
        return {
            "mesh": {name: int(size) for name, size in self.model.mesh.shape.items()},
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            # None without a loader: batches then come through run_step.
            "global_batch_size": plan.global_batch_size,
            "sequence_length": plan.sequence_length,
            "seed": self.seed,
            "trainable_variables": f"{len(shapes)} arrays, {setup.digest(shapes)}",
            "variable_shardings": setup.digest(jax.tree.map(lambda s: s.spec, self.state_shardings.model)),
            "optimizer_state": setup.digest(jax.eval_shape(self.tx.init, shapes)),
            "offload": [self.args.offload_optimizer, self.args.offload_params],
            # Options that change the compiled step: processes that differ would hang in collectives.
            "scale": repr(getattr(self.model, "scale", None)),
            "loss_chunk_size": self.args.loss_chunk_size,
        }

    def init_state(self) -> TrainState:
        """A fresh state from the model's current variables (offloaded ones moved to host
        memory; the model's device arrays are released by the first step, as its donation
        would release them without offload)."""
        state = setup.init_state(self.model, self.tx, self.state_shardings, self.seed)
        sources: list[jax.Array] = []
        moved = offload.move_to(state, self.state_shardings, released=sources)
        self._programs.release_after_next_step(sources)
        return moved

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (what a checkpoint is restored onto)."""
        return setup.abstract_state(self.model, self.tx, self.state_shardings, self.seed)

    def _restore_or_init(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> TrainState:
        """The state to train from: a restored checkpoint or a fresh state (see ``train``)."""
        source, step = checkpoint_to_restore(self.checkpointer, resume_from_checkpoint)
        if source is None:
            return self.init_state()
        try:
            state, self._restored_data_state = source.restore(self.abstract_state(), step)
        finally:
            if source is not self.checkpointer:
                source.close()
        restored = int(jax.device_get(state.step))
        saved = self._restored_data_state.pop("trainer", None) if self._restored_data_state else None
        self._check_resumable(saved, f"checkpoint of step {restored} in {source.save_dir!r}")
        own = self.checkpointer
        later = [s for s in (own.all_steps() if own is not None else []) if s > restored]
        if own is not None and later:
            raise ValueError(
                f"Resuming from step {restored}, but {own.save_dir!r} already holds later checkpoints "
                f"{later}, which this run's saves would collide with; resume into another output_dir / save_dir "
                "(or delete those steps yourself)."
            )
        self.restored_step = restored
        logger.info("Restored step %d from %s", self.restored_step, source.save_dir)
        return state

    def _checkpoint_data_state(self) -> dict[str, Any]:
        """``data_state()`` and the settings a resumed run must share (``_check_resumable``)."""
        settings = {"steps": self.total_steps, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "lr_schedule_steps": self._schedule_steps}  # fmt: skip
        return {**self.data_state(), "trainer": settings}

    def _check_resumable(self, saved: Mapping[str, Any] | None, where: str) -> None:
        """Refuses a checkpoint saved with another ``gradient_accumulation_steps``, or with
        another ``max_steps`` when this trainer's learning-rate schedule spans them (another
        step count is fine otherwise: a run can be extended)."""
        if saved is None:  # saved by a kithara that did not record them
            return
        problems = []
        k = self.gradient_accumulation_steps
        if saved.get("gradient_accumulation_steps", k) != k:
            problems.append(
                f"gradient_accumulation_steps: checkpoint {saved['gradient_accumulation_steps']}, this run {k} "
                "(each step would average other batches)"
            )
        before, now = saved.get("lr_schedule_steps"), self._schedule_steps
        if before is not None and now is not None and before != now:
            problems.append(
                f"max_steps: checkpoint {before}, this run {now} (the learning-rate schedule spans max_steps, "
                "so every remaining step would get another learning rate; pass your own optimizer to extend "
                "a run on purpose)"
            )
        if problems:
            raise ValueError(
                f"The {where} cannot be resumed exactly: {'; '.join(problems)}. Resume with the checkpoint's "
                "settings, or start a new run in another output_dir / save_dir."
            )

    def _live_state(self) -> TrainState:
        """The state being trained (``_begin`` restores or creates it)."""
        if self.train_state is None:
            raise RuntimeError("The trainer has no state yet: train() or run_step() creates it.")
        return self.train_state

    def _live_model_variables(self) -> ModelVariables:
        if self.train_state is None:
            return self.model.variables
        return offload.device_copy(self.train_state.model)  # offloaded weights: copied to device memory

    # Callbacks --------------------------------------------------------------------------

    def add_callback(self, callback: Callback | type[Callback]) -> None:
        """Adds a callback after construction (transformers' ``Trainer.add_callback``): an
        instance, or a class to build with no arguments. It runs after those already there.

        Checked as at construction (``on_*`` methods that are not hooks are refused). Allowed
        before ``train()`` or the first ``run_step()`` and between runs, not while one runs.
        A ``Checkpointer`` is refused when the trainer has one (``checkpointer=``,
        ``args.output_dir``) or already holds a state (it restores the state training starts
        from).

        Example:
            >>> trainer.add_callback(kithara.callbacks.BEMACallback(update_freq=50))
        """
        self._check_callbacks_idle("add_callback")
        if isinstance(callback, type):
            callback = callback()
        check_hooks(callback)
        if isinstance(callback, Checkpointer):
            if self.checkpointer is not None:
                raise ValueError(
                    f"{type(self).__name__} already has a Checkpointer (saving to {self.checkpointer.save_dir!r}, "
                    "from checkpointer=, callbacks= or args.output_dir); a trainer has at most one. Remove it "
                    "first (pop_callback(kithara.Checkpointer)) or pass the one you want at construction."
                )
            if self.train_state is not None:
                raise ValueError(
                    "A Checkpointer restores the state training starts from, and this trainer already holds one; "
                    "add it before the first train() / run_step(), or pass it at construction."
                )
            self.checkpointer = callback
        self.callbacks.append(callback)

    def pop_callback(self, callback: Callback | type[Callback]) -> Callback | None:
        """Removes and returns the first callback that is ``callback`` (or an instance of
        it, when a class is given); None when there is none (transformers' name). Not while
        ``train()`` or ``run_step()`` runs."""
        self._check_callbacks_idle("pop_callback")
        for found in self.callbacks:
            if found is callback or (isinstance(callback, type) and isinstance(found, callback)):
                self.callbacks.remove(found)
                if found is self.checkpointer:
                    self.checkpointer = None
                return found
        return None

    def remove_callback(self, callback: Callback | type[Callback]) -> None:
        """``pop_callback`` without the result (transformers' name)."""
        self.pop_callback(callback)

    def _check_callbacks_idle(self, what: str) -> None:
        if self._training or self._manual:
            raise RuntimeError(
                f"{what}() while {'train()' if self._training else 'run_step() (until finish())'} runs: the "
                "callbacks have begun, so a change now would miss or break their hooks. Change the callbacks "
                "before training starts, or between runs."
            )

    def _info(self, step: int, metrics: Mapping[str, float] | None = None) -> StepInfo:
        return StepInfo(
            step=step,
            epoch=self._epoch,
            total_steps=self.total_steps,
            start_step=self.start_step,
            restored_step=self.restored_step,
            metrics=dict(metrics or {}),
            log_dir=self.tensorboard_dir,
            error=self.error,
            _state=functools.cache(lambda: offload.device_view(self.train_state)),
            _data_state=self._checkpoint_data_state,
        )

    def _notify(self, event: str, info: StepInfo) -> None:
        for cb in self.callbacks:
            hook(cb, event)(info)
        if info.stop_reason is not None:
            self._stop_reason = info.stop_reason
            self.preempted = self.preempted or info.stop_reason == "preempted"

    def _final_step(self) -> int:
        return int(jax.device_get(self.train_state.step)) if self.train_state is not None else self.start_step

    def _exit_if_preempted(self, step: int) -> None:
        if self.preempted and (self.checkpointer is None or self.checkpointer.exit_on_preemption):
            logger.warning("Preempted: stopped and saved at step %d; exiting.", step)
            raise SystemExit(0)

    # The loop ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Runs training; returns the per-step metrics (also in ``self.history`` and, TRL's
        way, ``self.state.log_history``).

        Args:
            resume_from_checkpoint: ``None`` (default): with a checkpointer (and no state
                yet), resume from its latest checkpoint if there is one (``args.resume``).
                ``True``: resume from it, and fail if there is none. ``False``: start from
                the model's variables (refused if the checkpointer's directory already holds
                checkpoints). A path: resume from that checkpoint, a step directory
                (``.../checkpoints/200``) or a directory of steps (its latest); new saves still
                go to this trainer's checkpointer.
        """
        if self._plan.batches_per_epoch is None:
            raise ValueError(f"{type(self).__name__} has no train_dataloader; feed batches with run_step().")
        if resume_from_checkpoint is not None:
            self.train_state = None  # restore (or start) exactly as asked
        self._begin(self._plan.sequence_length, resume_from_checkpoint)
        logger.info(
            "Training %d steps (%d per epoch), %s",
            self.total_steps,
            self.steps_per_epoch,
            f"resuming at step {self.start_step}" if self.start_step else "from scratch",
        )
        self._training = True  # add_callback / pop_callback are refused until train() returns
        try:
            self._notify("on_train_begin", self._info(self.start_step))
        except BaseException:
            self._training = False
            raise
        try:
            self._run()
        except BaseException as error:
            self.error = error
            raise
        finally:
            self.model.variables = self._live_model_variables()
            try:
                self._notify("on_train_end", self._info(self._final_step()))
            finally:
                self._training = False
        self._exit_if_preempted(self._final_step())
        return self.history

    def _train_loader(self) -> Dataloader:
        if self.train_dataloader is None:
            raise ValueError(f"{type(self).__name__} has no train_dataloader; feed batches with run_step().")
        return self.train_dataloader

    def _begin(
        self, sequence_length: int | None, resume_from_checkpoint: bool | str | os.PathLike | None = None
    ) -> None:
        if self.train_state is None:
            self.train_state = self._restore_or_init(resume_from_checkpoint)
        self.start_step = int(jax.device_get(self.train_state.step))
        self._epoch = self.start_step // self.steps_per_epoch
        self._peak_flops = mesh_peak_flops(self.model.mesh, self.peak_flops_per_device)
        self._flops_per_token = self.model.flops_per_token(sequence_length) if sequence_length else 0.0
        self.error = None
        self.preempted = False
        self._stop_reason = None

    def _run(self) -> None:
        data_state, self._restored_data_state = self._restored_data_state, None
        batches = self.batches(self.start_step, data_state)
        pending: _Pending | None = None
        self._last_ready = time.perf_counter()
        for step in range(self.start_step + 1, self.total_steps + 1):
            epoch, batch = next(batches)
            self.train_state, metrics = self.host_step(self._live_state(), batch)
            if pending is not None:
                self._complete(pending)
            pending = _Pending(step, epoch, metrics)
            eval_due = self._eval_due(step)
            sync = [cb.needs_sync(step) for cb in self.callbacks]  # every callback sees every step
            if step == self.total_steps or eval_due or any(sync):
                self._complete(pending)
                pending = None
                if eval_due:
                    self._evaluate_at(step)
            if self._stop_reason is not None:
                break
        if pending is not None:
            self._complete(pending)

    def _complete(self, pending: _Pending) -> None:
        """Reads a step's metrics (blocking on that step only), checks them, logs them."""
        values = {k: float(v) for k, v in jax.device_get(pending.metrics).items()}
        now = time.perf_counter()
        step_time, self._last_ready = now - self._last_ready, now
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"Loss is {values['loss']} at step {pending.step} (epoch {pending.epoch}); training stopped. "
                "The last checkpoint, if any, was written before this step and is kept."
            )
        if values.get("skipped"):
            logger.warning(
                "step %d: non-finite gradients at loss scale %s (float16 overflow); update skipped, loss scale "
                "lowered (%d skipped so far)",
                pending.step,
                loss_scale.describe(values["loss_scale"]),
                values["skipped_steps"],
            )
        values["epoch"] = pending.epoch
        values["step_time"] = step_time
        values["tokens_per_second"] = values["tokens"] / step_time
        if self._peak_flops and self._flops_per_token:
            values["mfu"] = values["tokens"] * self._flops_per_token / step_time / self._peak_flops
        self.history.append({"step": pending.step, **values})
        if pending.step % self.log_steps_interval == 0 or pending.step == self.total_steps:
            logger.info("step %d: %s", pending.step, _fmt(values))
        self._epoch = pending.epoch
        self._notify("on_step_end", self._info(pending.step, values))

    def _eval_due(self, step: int) -> bool:
        if not self.has_eval:
            return False
        if self.eval_steps_interval is not None:
            return step % self.eval_steps_interval == 0
        epochs_done, into_epoch = divmod(step, self.steps_per_epoch)
        if into_epoch or self.eval_epochs_interval is None:
            return False
        return epochs_done % self.eval_epochs_interval == 0

    # Steps fed by the caller ------------------------------------------------------------

    def run_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a batch the caller built, outside ``train()``.

        ``batch`` holds this process's ``[micro_batches, rows, length]`` numpy arrays (the
        keys a loader yields). Keep the shapes fixed across calls: the jitted step compiles
        once per shape. The first call restores the checkpointer's latest state (or
        initializes one) and begins the callbacks; ``finish()`` ends them. Between calls
        ``self.model`` holds the updated variables, so the caller can generate with it.
        Returns the step's metrics (also appended to ``self.history``).
        """
        if not self._manual:
            length = next(v.shape[-1] for v in batch.values() if np.ndim(v) >= 3)
            self._begin(length)
            self._last_ready = time.perf_counter()
            self._notify("on_train_begin", self._info(self.start_step))
            self._manual = True
        step = len(self.history) and int(self.history[-1]["step"])
        step = max(step, self.start_step) + 1
        if self.total_steps and step == self.total_steps + 1:
            logger.warning(
                "Step %d is past max_steps=%d: the learning-rate schedule has ended (it stays at its last value).",
                step,
                self.total_steps,
            )
        try:
            global_batch = sharding_lib.shard_batch(dict(batch), self.model.mesh, leading_dims=1)
            self.train_state, metrics = self.host_step(self._live_state(), global_batch)
            for cb in self.callbacks:
                cb.needs_sync(step)
            self._complete(_Pending(step, 0, metrics))
        except BaseException as error:
            self.error = error
            self.finish()
            raise
        self.model.variables = self._live_model_variables()
        if self.preempted:
            self.finish()
            self._exit_if_preempted(step)
        return self.history[-1]

    def finish(self) -> None:
        """Ends the callbacks begun by ``run_step`` (a final checkpoint, closing TensorBoard)."""
        if not self._manual:
            return
        self._manual = False
        self.model.variables = self._live_model_variables()
        self._notify("on_train_end", self._info(self._final_step()))

    # Evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The objective's evaluation metrics (``eval_metrics``) of the current variables;
        recorded in ``eval_history`` and passed to the callbacks' ``on_eval_end``."""
        variables = self._live_model_variables()
        metrics = self._evaluate_at(self._final_step())
        self.model.variables = variables
        return metrics

    def _evaluate_at(self, step: int) -> dict[str, float]:
        metrics = self.eval_metrics(self._live_model_variables())
        self.eval_history.append({"step": step, **metrics})
        logger.info("eval at step %d: %s", step, _fmt(metrics))
        self._notify("on_eval_end", self._info(step, metrics))
        return metrics


def check_signatures(trainer: Trainer) -> None:
    """Refuses hooks written for the old contract, naming the new form (instead of a bare
    TypeError at the first step)."""
    wanted = {"compute_loss": 4, "train_step": 3, "host_step": 2}
    for name, count in wanted.items():
        parameters = inspect.signature(getattr(trainer, name)).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters) and len(parameters) != count:
            raise TypeError(
                f"{type(trainer).__name__}.{name} takes {len(parameters)} arguments; the objective contract's "
                f"{name} takes {count}: compute_loss(variables, batch, rng, frozen), train_step(state, batch, "
                "frozen), host_step(state, batch). See docs/trainer.md, 'Writing an objective'."
            )
    for callback in trainer.callbacks:
        check_hooks(callback)


def _fmt(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in values.items())
