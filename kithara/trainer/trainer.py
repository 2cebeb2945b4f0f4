"""The base Trainer: builds the state, jits one step, and runs the loop."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax

from kithara import sharding as sharding_lib
from kithara.callbacks import Callback, Checkpointer, Profiler, ProgressBar, TensorBoardLogger
from kithara.data.dataloader import DataIterator, Dataloader, pad_length
from kithara.distributed.consistency import check_same_on_all_processes
from kithara.models.model import Model, ModelVariables
from kithara.trainer import step as step_lib
from kithara.trainer.losses import LossOutput, next_token_cross_entropy
from kithara.trainer.optimizers import as_gradient_transformation, state_shardings
from kithara.trainer.state import TrainState
from kithara.trainer.throughput import mesh_peak_flops

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    epoch: int
    metrics: dict[str, jax.Array]


class Trainer:
    """Trains a ``Model`` with next-token cross-entropy; subclass it for other objectives.

    Subclasses override ``compute_loss`` (and ``train_step`` only when the algorithm needs
    a different update); the loop, accumulation, logging and callbacks stay here.

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
        if eval_dataloader is None and (eval_steps_interval or eval_epochs_interval or max_eval_samples):
            raise ValueError("An evaluation interval or max_eval_samples was set but no eval_dataloader was given.")
        if eval_dataloader is not None and eval_steps_interval is None and eval_epochs_interval is None:
            eval_epochs_interval = 1
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
        if train_dataloader is None:
            self.steps_per_epoch, self.total_steps = 1, steps or 0
        else:
            self.steps_per_epoch, self.total_steps = plan_steps(
                len(train_dataloader),
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
        self.checkpointer = checkpointer
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

        params = model.variables
        self._param_shapes = {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in params.trainable.items()}
        self.tx = as_gradient_transformation(optimizer, self._param_shapes)
        self.state_shardings = self._state_shardings()
        # Processes set up differently would compile different steps and hang in their first
        # collective; compare them now and name the difference instead.
        check_same_on_all_processes(self._setup_description(), "trainer set-up")
        self._train_step_fn = jax.jit(
            functools.partial(self.train_step, loss_fn=self.compute_loss, tx=self.tx),
            in_shardings=(self.state_shardings, sharding_lib.batch_sharding(model.mesh, leading_dims=1)),
            out_shardings=(self.state_shardings, sharding_lib.replicated(model.mesh)),
            donate_argnames=("state",),
        )
        self._eval_step_fn = jax.jit(
            functools.partial(step_lib.eval_step, loss_fn=self.compute_loss),
            in_shardings=(self.state_shardings.model, sharding_lib.batch_sharding(model.mesh)),
            out_shardings=sharding_lib.replicated(model.mesh),
        )
        self.state: TrainState | None = None
        self.data_iterator: DataIterator | None = None
        self.start_step = 0
        self.restored_step: int | None = None
        self._restored_data_state: dict[str, Any] | None = None
        self.stop_training = False  # a callback sets it to end training after the current step
        self.preempted = False  # set on SIGTERM by the checkpointer, after its save
        self.error: BaseException | None = None
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self._peak_flops: float | None = None
        self._manual = False  # run_step() has begun the callbacks and finish() has not ended them

    # The subclass contract --------------------------------------------------------------

    def compute_loss(
        self, variables: ModelVariables, batch: step_lib.Batch, rng: jax.Array
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        """The loss of one (micro-)batch as a ``LossOutput`` (sum and weight) plus the
        model's updated non-trainable variables. Runs inside ``jax.jit``: it must be pure
        (read configuration from ``self``, never write to it)."""
        del rng
        logits, non_trainable = self.model.apply(variables, batch, training=True)
        return next_token_cross_entropy(logits, batch["labels"], batch["label_mask"]), non_trainable

    train_step = staticmethod(step_lib.train_step)

    # State ------------------------------------------------------------------------------

    def _state_shardings(self) -> TrainState:
        mesh = self.model.mesh
        model_shardings = self.model.variable_shardings
        opt_shapes = jax.eval_shape(self.tx.init, self._param_shapes)
        opt_shardings = state_shardings(opt_shapes, model_shardings.trainable, self._param_shapes, mesh)
        replicated = sharding_lib.replicated(mesh)
        return TrainState(model=model_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)

    def _setup_description(self) -> dict[str, Any]:
        """What must be identical on every process: mesh, schedule, batch and state layout."""

        def digest(tree: Any) -> str:
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            return hashlib.sha256(repr(leaves).encode()).hexdigest()[:16]

        shapes = jax.eval_shape(self.tx.init, self._param_shapes)
        return {
            "mesh": {name: int(size) for name, size in self.model.mesh.shape.items()},
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            # None without a loader: batches then come through run_step.
            "global_batch_size": loader.global_batch_size if (loader := self.train_dataloader) else None,
            "sequence_length": loader.sequence_length if loader else None,
            "seed": self.seed,
            "trainable_variables": f"{len(self._param_shapes)} arrays, {digest(self._param_shapes)}",
            "variable_shardings": digest(jax.tree.map(lambda s: s.spec, self.state_shardings.model)),
            "optimizer_state": digest(shapes),
        }

    def init_state(self) -> TrainState:
        """A fresh state from the model's current variables."""
        params = self.model.variables
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params.trainable)
        replicated = sharding_lib.replicated(self.model.mesh)
        return TrainState(
            model=params,
            opt_state=opt_state,
            step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
            rng=jax.device_put(jax.random.key_data(jax.random.key(self.seed)), replicated),
        )

    # The loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Runs training; returns the per-step metrics (also in ``self.history``).

        With a checkpointer (and no state yet), resumes from its latest checkpoint if any.
        """
        self._begin(self._train_loader().sequence_length)
        logger.info(
            "Training %d steps (%d per epoch), %s",
            self.total_steps,
            self.steps_per_epoch,
            f"resuming at step {self.start_step}" if self.start_step else "from scratch",
        )
        for cb in self.callbacks:
            cb.on_train_begin(self)
        try:
            self._run()
        except BaseException as error:
            self.error = error
            raise
        finally:
            self.model.variables = self._live_model_variables()
            for cb in self.callbacks:
                cb.on_train_end(self)
        if self.preempted and (self.checkpointer is None or self.checkpointer.exit_on_preemption):
            step = int(jax.device_get(self._live_state().step))
            logger.warning("Preempted: stopped and saved at step %d; exiting.", step)
            raise SystemExit(0)
        return self.history

    def _train_loader(self) -> Dataloader:
        if self.train_dataloader is None:
            raise ValueError(f"{type(self).__name__} has no train_dataloader; feed batches with run_step().")
        return self.train_dataloader

    def _live_state(self) -> TrainState:
        """The state being trained (``_begin`` restores or creates it)."""
        if self.state is None:
            raise RuntimeError("The trainer has no state yet: train() or run_step() creates it.")
        return self.state

    def _begin(self, sequence_length: int) -> None:
        if self.state is None:
            self.state = self._restore_or_init()
        self.start_step = int(jax.device_get(self.state.step))
        self._peak_flops = mesh_peak_flops(self.model.mesh, self.peak_flops_per_device)
        self._flops_per_token = self.model.flops_per_token(sequence_length)
        self.error = None
        self.stop_training = self.preempted = False

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
            for cb in self.callbacks:
                cb.on_train_begin(self)
            self._manual = True
        step = len(self.history) and int(self.history[-1]["step"])
        step = max(step, self.start_step) + 1
        try:
            global_batch = sharding_lib.shard_batch(dict(batch), self.model.mesh, leading_dims=1)
            self.state, metrics = self._train_step_fn(self._live_state(), global_batch)
            for cb in self.callbacks:
                cb.needs_sync(step)
            self._complete(_Pending(step, 0, metrics))
        except BaseException as error:
            self.error = error
            self.finish()
            raise
        self.model.variables = self.state.model
        if self.preempted:
            self.finish()
            if self.checkpointer is None or self.checkpointer.exit_on_preemption:
                logger.warning("Preempted: saved at step %d; exiting.", step)
                raise SystemExit(0)
        return self.history[-1]

    def finish(self) -> None:
        """Ends the callbacks begun by ``run_step`` (a final checkpoint, closing TensorBoard)."""
        if not self._manual:
            return
        self._manual = False
        self.model.variables = self._live_model_variables()
        for cb in self.callbacks:
            cb.on_train_end(self)

    def _restore_or_init(self) -> TrainState:
        ckpt = self.checkpointer
        if ckpt is not None and ckpt.resume and ckpt.latest_step() is not None:
            state, self._restored_data_state = ckpt.restore(self)
            self.restored_step = int(jax.device_get(state.step))
            logger.info("Restored step %d from %s", self.restored_step, ckpt.save_dir)
            return state
        return self.init_state()

    def _run(self) -> None:
        batches = self._batches(self.start_step)
        pending: _Pending | None = None
        self._last_ready = time.perf_counter()
        for step in range(self.start_step + 1, self.total_steps + 1):
            epoch, batch = next(batches)
            self.state, metrics = self._train_step_fn(self.state, batch)
            if pending is not None:
                self._complete(pending)
            pending = _Pending(step, epoch, metrics)
            eval_due = self._eval_due(step)
            sync = [cb.needs_sync(step) for cb in self.callbacks]  # every callback sees every step
            if step == self.total_steps or eval_due or any(sync):
                self._complete(pending)
                pending = None
                if eval_due:
                    self.evaluate(_step=step)
            if self.stop_training:
                break
        if pending is not None:
            self._complete(pending)

    def _batches(self, start_step: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """(epoch, global batch of K micro-batches) for each step from ``start_step``.

        Reads through ``self.data_iterator``, whose state after step N's batches is what a
        checkpoint of step N records.
        """
        k = self.gradient_accumulation_steps
        self.data_iterator = self._train_loader().iterator(batches_per_epoch=self.steps_per_epoch * k)
        if self._restored_data_state is not None:
            # Refuses, with the loader's message, a state saved for other data or settings.
            self.data_iterator.set_state(self._restored_data_state)
            self._restored_data_state = None
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
        if self._peak_flops:
            values["mfu"] = values["tokens"] * self._flops_per_token / step_time / self._peak_flops
        self.history.append({"step": pending.step, **values})
        if pending.step % self.log_steps_interval == 0 or pending.step == self.total_steps:
            logger.info("step %d: %s", pending.step, _fmt(values))
        for cb in self.callbacks:
            cb.on_step_end(self, pending.step, values)

    def _eval_due(self, step: int) -> bool:
        if self.eval_dataloader is None:
            return False
        if self.eval_steps_interval is not None:
            return step % self.eval_steps_interval == 0
        epochs_done, into_epoch = divmod(step, self.steps_per_epoch)
        if into_epoch or self.eval_epochs_interval is None:
            return False
        return epochs_done % self.eval_epochs_interval == 0

    # Evaluation -------------------------------------------------------------------------

    def evaluate(self, *, _step: int | None = None) -> dict[str, float]:
        """Loss, perplexity and token accuracy over the eval loader (``max_eval_samples``
        rows at most), summed on device and read once at the end."""
        if self.eval_dataloader is None:
            raise ValueError("evaluate() needs an eval_dataloader.")
        loader = self.eval_dataloader
        variables = self._live_model_variables()
        limit = self.max_eval_samples or math.inf
        totals: LossOutput | None = None
        for index, local in enumerate(loader.epoch(0)):
            if index * loader.global_batch_size >= limit:
                break
            local = _mask_rows_past(local, index, loader, limit)
            out = self._eval_step_fn(variables, sharding_lib.shard_batch(local, self.model.mesh))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if totals is None:
            raise ValueError("The eval loader produced no batches.")
        host = jax.device_get(totals)
        weight = max(float(host.weight), 1.0)
        loss = float(host.total) / weight
        metrics = {"loss": loss}
        if self.reports_perplexity:
            metrics["perplexity"] = math.exp(min(loss, 80.0))
        metrics.update({k: float(v) / weight for k, v in host.sums.items()})
        step = _step if _step is not None else (int(jax.device_get(self.state.step)) if self.state else 0)
        self.eval_history.append({"step": step, **metrics})
        logger.info("eval at step %d: %s", step, _fmt(metrics))
        for cb in self.callbacks:
            cb.on_eval_end(self, step, metrics)
        if _step is None:
            self.model.variables = variables
        return metrics

    def _live_model_variables(self) -> ModelVariables:
        return self.state.model if self.state is not None else self.model.variables


def plan_steps(
    batches_per_epoch: int, *, steps: int | None, epochs: int | None, gradient_accumulation_steps: int = 1
) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: ``steps`` if set, else ``epochs`` (default 1)
    passes, each of ``batches_per_epoch // gradient_accumulation_steps`` steps."""
    steps_per_epoch = batches_per_epoch // gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"The train loader has {batches_per_epoch} batches per epoch, fewer than "
            f"gradient_accumulation_steps={gradient_accumulation_steps}."
        )
    return steps_per_epoch, steps if steps is not None else (epochs or 1) * steps_per_epoch


def _mask_rows_past(
    local: dict[str, np.ndarray], index: int, loader: Dataloader, limit: float
) -> dict[str, np.ndarray]:
    """Zeroes the label mask of rows beyond ``limit`` (global row order by process)."""
    rows = loader.local_batch_size
    first_global = index * loader.global_batch_size
    global_rows = first_global + jax.process_index() + jax.process_count() * np.arange(rows)
    keep = global_rows < limit
    if keep.all():
        return local
    return {k: v & keep[:, None] if k.endswith("label_mask") else v for k, v in local.items()}


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4g}" for k, v in values.items())
