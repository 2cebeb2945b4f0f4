"""The base Trainer: builds the state, jits one step, and runs the loop."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler, ProgressBar, StepInfo, TensorBoardLogger
from kithara.data.dataloader import DataIterator, Dataloader, pad_length
from kithara.distributed.consistency import check_same_on_all_processes
from kithara.models.model import Model, ModelVariables
from kithara.trainer import setup
from kithara.trainer import step as step_lib
from kithara.trainer.evaluation import evaluate_loader
from kithara.trainer.losses import LossOutput, next_token_cross_entropy
from kithara.trainer.optimizers import as_gradient_transformation
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

    Args:
        model: the model to train; its variables are taken over while training and handed
            back (``model.variables``) when ``train()`` or ``evaluate()`` returns.
        optimizer: an ``optax.GradientTransformation`` or a (fresh) keras optimizer.
        train_dataloader: batches for training; ``None`` for objectives that feed their own
            batches through ``run_step`` (``train()`` then refuses to run).
        eval_dataloader: batches for evaluation.
        steps: optimizer steps to run. Only one of ``steps`` and ``epochs``; neither
            means one epoch.
        epochs: passes over ``train_dataloader``.
        log_steps_interval: log metrics every this many steps.
        eval_steps_interval / eval_epochs_interval: evaluate every this many steps or
            epochs (at most one of them). With an eval loader and neither set, evaluates
            every epoch.
        max_eval_samples: evaluate on at most this many rows (packed rows when packing).
        tensorboard_dir: local or ``gs://`` directory for TensorBoard scalars.
        profiler: a ``kithara.Profiler`` that traces a window of steps.
        checkpointer: a ``kithara.Checkpointer``: saves the state periodically, and
            ``train()`` resumes from its latest checkpoint (unless ``resume=False``).
        callbacks: more ``Callback`` objects.
        gradient_accumulation_steps: micro-batches (loader batches) per optimizer step.
        progress_bar: show a rich progress bar on process 0.
        seed: seed of the step RNG (dropout and any sampling a subclass does).
        peak_flops_per_device: override the peak FLOP/s used for MFU.

    Example:
        >>> trainer = Trainer(model, kithara.optimizers.adamw(3e-4), train_loader,
        ...                   eval_dataloader=eval_loader, steps=200, eval_steps_interval=50)
        >>> trainer.train()
    """

    reports_perplexity = True  # evaluate() adds exp(loss); objectives whose loss is no token NLL turn it off
    # Attributes read while tracing the jitted steps: fixed once the base __init__ returns
    # (assigning one later raises, instead of being silently ignored by a compiled step).
    step_constants: tuple[str, ...] = ("model", "tx")

    def __init__(
        self,
        model: Model,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer,
        train_dataloader: Dataloader | None,
        eval_dataloader: Dataloader | None = None,
        steps: int | None = None,
        epochs: int | None = None,
        log_steps_interval: int = 1,
        eval_steps_interval: int | None = None,
        eval_epochs_interval: int | None = None,
        max_eval_samples: int | None = None,
        tensorboard_dir: str | None = None,
        profiler: Profiler | None = None,
        checkpointer: Checkpointer | None = None,
        callbacks: Sequence[Callback] = (),
        *,
        gradient_accumulation_steps: int = 1,
        progress_bar: bool = True,
        seed: int = 0,
        peak_flops_per_device: float | None = None,
    ) -> None:
        _check_positive(
            steps=steps,
            epochs=epochs,
            eval_steps_interval=eval_steps_interval,
            eval_epochs_interval=eval_epochs_interval,
            max_eval_samples=max_eval_samples,
            log_steps_interval=log_steps_interval,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        if steps is not None and epochs is not None:
            raise ValueError(f"Set steps ({steps}) or epochs ({epochs}), not both.")
        if eval_steps_interval is not None and eval_epochs_interval is not None:
            raise ValueError("Set only one of eval_steps_interval and eval_epochs_interval.")
        for name, loader in (("train_dataloader", train_dataloader), ("eval_dataloader", eval_dataloader)):
            if loader is not None and loader.packing and not model.supports_packing:
                raise ValueError(
                    f"The {name} packs several examples per row, but {type(model).__name__} cannot keep their "
                    "attention apart (supports_packing is False); training would leak attention across "
                    "examples. Build the loader with packing=False."
                )
        self.model = model
        self.train_dataloader = train_dataloader
        self.eval_dataloader = eval_dataloader
        self.gradient_accumulation_steps = gradient_accumulation_steps
        plan = self.data_plan()
        if not plan.has_eval and (eval_steps_interval or eval_epochs_interval or max_eval_samples):
            raise ValueError("An evaluation interval or max_eval_samples was set but no eval_dataloader was given.")
        if plan.has_eval and eval_steps_interval is None and eval_epochs_interval is None:
            eval_epochs_interval = 1
        self.has_eval = plan.has_eval
        if plan.batches_per_epoch is None:
            self.steps_per_epoch, self.total_steps = 1, steps or 0
        else:
            self.steps_per_epoch, self.total_steps = plan_steps(
                plan.batches_per_epoch,
                steps=steps,
                epochs=epochs,
                gradient_accumulation_steps=gradient_accumulation_steps,
            )
        self.log_steps_interval = log_steps_interval
        self.eval_steps_interval = eval_steps_interval
        self.eval_epochs_interval = eval_epochs_interval
        self.max_eval_samples = max_eval_samples
        self.tensorboard_dir = tensorboard_dir
        self.seed = seed
        self.peak_flops_per_device = peak_flops_per_device
        self.callbacks: list[Callback] = [cb for cb in (checkpointer, profiler) if cb is not None]
        if tensorboard_dir is not None:
            self.callbacks.append(TensorBoardLogger(tensorboard_dir, every=log_steps_interval))
        if progress_bar:
            self.callbacks.append(ProgressBar())
        self.callbacks.extend(callbacks)
        # A Checkpointer passed among the callbacks must restore too, not only save.
        found = [cb for cb in self.callbacks if isinstance(cb, Checkpointer)]
        if len(found) > 1:
            raise ValueError("Pass at most one Checkpointer (checkpointer= or among callbacks=).")
        self.checkpointer = found[0] if found else None

        self.tx = as_gradient_transformation(optimizer, setup.param_shapes(model))
        self.state_shardings = setup.state_shardings(model, self.tx)
        # Processes set up differently would compile different steps and hang in their first
        # collective; compare them now and name the difference instead.
        check_same_on_all_processes(self._setup_description(plan), "trainer set-up")
        self._frozen = self.frozen_variables()
        self._train_jit, self._eval_jit = self._jit_steps(self._frozen)
        self.state: TrainState | None = None
        self.data_iterator: DataIterator | None = None
        self.start_step = 0
        self.restored_step: int | None = None
        self.preempted = False  # set when a checkpointer saved and stopped on SIGTERM
        self.error: BaseException | None = None
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self._restored_data_state: dict[str, Any] | None = None
        self._stop_reason: str | None = None
        self._sequence_length = plan.sequence_length
        self._peak_flops: float | None = None
        self._epoch = 0
        self._manual = False  # run_step() has begun the callbacks and finish() has not ended them
        self._sealed = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).step_constants and self.__dict__.get("_sealed"):
            raise AttributeError(
                f"{type(self).__name__}.{name} is fixed at construction: the jitted steps read it when they "
                "compile, so a new value would be ignored. Build a new trainer with the value you want."
            )
        super().__setattr__(name, value)

    # The objective contract (docs/trainer.md, "Writing an objective") ------------------

    def compute_loss(
        self, variables: ModelVariables, batch: step_lib.Batch, rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The loss of one (micro-)batch as a ``LossOutput`` (sum and weight) plus the
        model's updated non-trainable variables. ``frozen`` is what ``frozen_variables()``
        returned (None by default). Runs inside ``jax.jit``: pure; reads only its arguments
        and ``step_constants``, never writes to ``self``."""
        del rng, frozen
        logits, non_trainable = self.model.apply(variables, batch, training=True)
        return next_token_cross_entropy(logits, batch["labels"], batch["label_mask"]), non_trainable

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

    # The jitted steps: the only jax.jit sites of training and evaluation -----------------

    def _jit_steps(self, frozen: Any) -> tuple[Any, Any]:
        mesh = self.model.mesh
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: _mesh_sharding(x, mesh), frozen)
        replicated = sharding_lib.replicated(mesh)
        train = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, sharding_lib.batch_sharding(mesh, leading_dims=1), frozen_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnames=("state",),
        )
        evaluate = jax.jit(
            functools.partial(_eval_step, self.compute_loss),
            in_shardings=(self.state_shardings.model, sharding_lib.batch_sharding(mesh), frozen_shardings),
            out_shardings=replicated,
        )
        return train, evaluate

    def jitted_train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """``train_step`` compiled (once per batch structure and shape), the frozen
        variables passed in; ``state`` is donated."""
        return self._train_jit(state, batch, self._frozen)

    def jitted_eval_step(self, variables: ModelVariables, batch: Any) -> LossOutput:
        """``compute_loss`` of one ``[rows, ...]`` batch, compiled, without gradients."""
        return self._eval_jit(variables, batch, self._frozen)

    def lower_train_step(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The train step lowered for ``(state, batch)`` (``.compile().memory_analysis()``
        and ``.cost_analysis()`` read its memory and FLOPs); nothing runs."""
        return self._train_jit.lower(state, batch, self._frozen)

    @property
    def compilations(self) -> dict[str, int]:
        """How many programs each jitted step has compiled (one per batch structure and shape)."""
        return {"train_step": self._train_jit._cache_size(), "eval_step": self._eval_jit._cache_size()}

    @property
    def frozen(self) -> Any:
        """The frozen variables passed to the steps (``frozen_variables()``'s result)."""
        return self._frozen

    # State ------------------------------------------------------------------------------

    def _setup_description(self, plan: DataPlan) -> dict[str, Any]:
        """What must be identical on every process: mesh, schedule, batch and state layout."""
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
        }

    def init_state(self) -> TrainState:
        """A fresh state from the model's current variables."""
        return setup.init_state(self.model, self.tx, self.state_shardings, self.seed)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (what a checkpoint is restored onto)."""
        return setup.abstract_state(self.model, self.tx, self.state_shardings, self.seed)

    def _restore_or_init(self) -> TrainState:
        ckpt = self.checkpointer
        if ckpt is not None and ckpt.resume and ckpt.latest_step() is not None:
            state, self._restored_data_state = ckpt.restore(self.abstract_state())
            self.restored_step = int(jax.device_get(state.step))
            logger.info("Restored step %d from %s", self.restored_step, ckpt.save_dir)
            return state
        return self.init_state()

    def _live_state(self) -> TrainState:
        """The state being trained (``_begin`` restores or creates it)."""
        if self.state is None:
            raise RuntimeError("The trainer has no state yet: train() or run_step() creates it.")
        return self.state

    def _live_model_variables(self) -> ModelVariables:
        return self.state.model if self.state is not None else self.model.variables

    # Callbacks --------------------------------------------------------------------------

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
            _state=lambda: self.state,
            _data_state=self.data_state,
        )

    def _notify(self, event: str, info: StepInfo) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(info)
        if info.stop_reason is not None:
            self._stop_reason = info.stop_reason
            self.preempted = self.preempted or info.stop_reason == "preempted"

    def _final_step(self) -> int:
        return int(jax.device_get(self.state.step)) if self.state is not None else self.start_step

    def _exit_if_preempted(self, step: int) -> None:
        if self.preempted and (self.checkpointer is None or self.checkpointer.exit_on_preemption):
            logger.warning("Preempted: stopped and saved at step %d; exiting.", step)
            raise SystemExit(0)

    # The loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Runs training; returns the per-step metrics (also in ``self.history``).

        With a checkpointer (and no state yet), resumes from its latest checkpoint if any.
        """
        plan_length = self._sequence_length
        if self.data_plan().batches_per_epoch is None:
            raise ValueError(f"{type(self).__name__} has no train_dataloader; feed batches with run_step().")
        self._begin(plan_length)
        logger.info(
            "Training %d steps (%d per epoch), %s",
            self.total_steps,
            self.steps_per_epoch,
            f"resuming at step {self.start_step}" if self.start_step else "from scratch",
        )
        self._notify("on_train_begin", self._info(self.start_step))
        try:
            self._run()
        except BaseException as error:
            self.error = error
            raise
        finally:
            self.model.variables = self._live_model_variables()
            self._notify("on_train_end", self._info(self._final_step()))
        self._exit_if_preempted(self._final_step())
        return self.history

    def _train_loader(self) -> Dataloader:
        if self.train_dataloader is None:
            raise ValueError(f"{type(self).__name__} has no train_dataloader; feed batches with run_step().")
        return self.train_dataloader

    def _begin(self, sequence_length: int | None) -> None:
        if self.state is None:
            self.state = self._restore_or_init()
        self.start_step = int(jax.device_get(self.state.step))
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
            self.state, metrics = self.host_step(self._live_state(), batch)
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
        try:
            global_batch = sharding_lib.shard_batch(dict(batch), self.model.mesh, leading_dims=1)
            self.state, metrics = self.host_step(self._live_state(), global_batch)
            for cb in self.callbacks:
                cb.needs_sync(step)
            self._complete(_Pending(step, 0, metrics))
        except BaseException as error:
            self.error = error
            self.finish()
            raise
        self.model.variables = self._live_state().model
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


def _eval_step(compute_loss: Any, variables: ModelVariables, batch: step_lib.Batch, frozen: Any) -> LossOutput:
    """Loss sums of one ``[rows, ...]`` evaluation batch (no gradient, no state change)."""
    out, _ = compute_loss(variables, batch, jax.random.key(0), frozen)
    return out


def _mesh_sharding(x: Any, mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh != mesh:
        raise ValueError(
            "frozen_variables() must return arrays placed on the model's mesh (NamedSharding over "
            f"model.mesh); got one with sharding {sharding}. Place it with jax.device_put or the "
            "frozen model's own variable_shardings on the same mesh."
        )
    return sharding


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _fmt(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in values.items())
