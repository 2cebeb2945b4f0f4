"""Saves and restores the training state with orbax: periodic, async, atomic, preemption-safe."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from kithara.callbacks.base import Callback, StepInfo

if TYPE_CHECKING:
    from kithara.trainer.state import TrainState

logger = logging.getLogger(__name__)

_ITEMS = ("state", "data")
# The checksum entry of the data item (the iterator position), next to the state's arrays.
_DATA_CHECKSUM = "data:iterator"


class Checkpointer(Callback):
    """Saves the train state (model variables, optimizer state, step, RNG) and the data
    iterator's position together, every ``save_interval`` steps and at the end of training,
    with orbax's ``CheckpointManager``; the Trainer resumes from the latest one.

    Every process writes its own shards into one directory (local or ``gs://``). A step is
    written to a temporary directory and renamed when complete, so a process killed mid-save
    leaves the previous checkpoint loadable. On SIGTERM the trainer finishes the step in
    flight, saves it and exits with code 0. Arrays are stored with tensorstore and the data
    position and checksums (per array, and of the position) as JSON: nothing is pickled.
    Restoring checks names, shapes and dtypes against the model before reading, and the
    checksums after.

    Args:
        save_dir: directory holding one subdirectory per saved step (local, relative to the
            working directory, or a URL such as ``gs://...``). A local one is created and
            checked for writing before training starts.
        save_interval: save every this many optimizer steps (the last step is always saved).
        max_to_keep: keep only the newest this many checkpoints (None keeps all).
        async_save: write in a background thread while training goes on (arrays are copied
            to host memory first, so the next step can reuse the device buffers).
        resume: restore the latest checkpoint in ``save_dir`` when training starts. False
            starts from the model's current variables and needs a ``save_dir`` without
            checkpoints (two runs in one directory would mix their steps).
        exit_on_preemption: after the save triggered by SIGTERM, raise ``SystemExit(0)`` from
            ``Trainer.train()``; False returns normally (``trainer.preempted`` is then True).
        read_only: only read ``save_dir`` (another run's checkpoints): nothing is written,
            cleaned up or deleted there; ``save`` refuses.

    Example:
        >>> ckpt = kithara.Checkpointer("runs/exp1/ckpt", save_interval=100, max_to_keep=3)
        >>> kithara.Trainer(model, tx, loader, steps=1000, checkpointer=ckpt).train()
        >>> # Run the same script again: it resumes at the latest saved step.
    """

    def __init__(
        self,
        save_dir: str,
        save_interval: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        *,
        resume: bool = True,
        exit_on_preemption: bool = True,
        read_only: bool = False,
    ) -> None:
        if not isinstance(save_interval, int) or save_interval < 1:
            raise ValueError(f"save_interval must be a positive int, got {save_interval!r}.")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        save_dir = str(save_dir)
        # orbax's array store refuses relative paths; a local one is taken from the working directory.
        self.save_dir = save_dir if "://" in save_dir else os.path.abspath(save_dir)
        self.save_interval = save_interval
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self.resume = resume
        self.exit_on_preemption = exit_on_preemption
        self.read_only = read_only
        self.preempted = False
        self._sigterm = threading.Event()
        self._previous_handler: Any = None
        self._manager: ocp.CheckpointManager | None = None
        self._total_steps = 0
        self._due: set[int] = set()
        self._warned_no_preemption_service = False
        self._last_saved: int | None = None

    # Orbax ------------------------------------------------------------------------------

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The orbax ``CheckpointManager`` over ``save_dir`` (created on first use)."""
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if self.read_only else self.max_to_keep,
                enable_async_checkpointing=self.async_save,
                cleanup_tmp_directories=not self.read_only,
                read_only=self.read_only,
                create=not self.read_only,
            )
            handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
            self._manager = ocp.CheckpointManager(
                self.save_dir, options=options, item_names=_ITEMS, item_handlers=handlers
            )
        return self._manager

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (also when ``save_dir`` is missing)."""
        if not epath.Path(self.save_dir).exists():
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints in ``save_dir`` (none when it is missing)."""
        if not epath.Path(self.save_dir).exists():
            return []
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
        """Saves ``state`` (which must be the state after ``step``) and the data position."""
        if self.read_only:
            raise ValueError(f"This Checkpointer only reads {self.save_dir!r} (read_only=True); it saves nothing.")
        data_state = json.loads(json.dumps(data_state))  # as it will read back (e.g. int keys become str)
        meta = {"iterator": data_state, "checksums": {**checksums(state), _DATA_CHECKSUM: _json_checksum(data_state)}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self._last_saved = step
        logger.info(
            "Checkpoint of step %d %s to %s", step, "dispatched" if self.async_save else "written", self.save_dir
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Reads a checkpoint (the latest by default) laid out as ``target``: an abstract
        ``TrainState`` (shapes, dtypes, shardings), or a trainer, whose ``abstract_state()``
        gives it. The model and mesh may differ from the ones that saved it. Returns
        ``(state, data_state)``.

        Raises:
            FileNotFoundError: ``save_dir`` is missing or holds no such checkpoint.
            ValueError: the checkpoint does not match the model and optimizer (names, shapes,
                dtypes), or a file in it cannot be read.
        """
        if not epath.Path(self.save_dir).exists():
            raise FileNotFoundError(f"Checkpoint directory {self.save_dir!r} does not exist.")
        available = list(self.manager.all_steps())
        step = self.manager.latest_step() if step is None else step
        if step is None or step not in available:
            raise FileNotFoundError(
                f"No complete checkpoint{'' if step is None else f' of step {step}'} in {self.save_dir!r} "
                f"(complete steps: {sorted(available)})."
            )
        if hasattr(target, "abstract_state"):
            target = target.abstract_state()
        # A failed read abandons orbax's event loop with reads still in flight; silence their
        # late "Event loop is closed" callbacks, so the error raised here is the last word.
        _ignore_abandoned_event_loop_errors()
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as error:
            raise self._unreadable(step, error) from error
        _check_matches(metadata, target, where=f"checkpoint of step {step} in {self.save_dir!r}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as error:
            raise self._unreadable(step, error) from error
        state, meta = restored["state"], dict(restored["data"] or {})
        expected = meta.get("checksums", {})
        found = {**checksums(state), _DATA_CHECKSUM: _json_checksum(meta.get("iterator", {}))}
        if expected.get(_DATA_CHECKSUM) != found[_DATA_CHECKSUM]:
            if _DATA_CHECKSUM not in expected:
                raise ValueError(
                    f"Checkpoint of step {step} in {self.save_dir!r} was written by an older kithara, which did not "
                    "checksum the data iterator position, so this version cannot resume it exactly. Resume it with "
                    "the kithara that wrote it, or start a new run in another save_dir."
                )
            why = "differs from what was saved"
            raise ValueError(
                f"Checkpoint of step {step} in {self.save_dir!r} is corrupt: its data item (data/metadata: the "
                f"data iterator position {meta.get('iterator')}) {why}; resuming from it would read other "
                "batches. Delete that step's directory to resume from an earlier one."
            )
        bad = sorted(name for name in found if name in expected and expected[name] != found[name])
        if bad or set(expected) != set(found):
            raise ValueError(
                f"Checkpoint of step {step} in {self.save_dir!r} is corrupt: the data read back differs from "
                f"what was saved ({', '.join(bad[:5]) or 'the checksum list'}). Delete that step's directory "
                "to resume from an earlier one."
            )
        return state, dict(meta.get("iterator", {}))

    def _unreadable(self, step: int, error: Exception) -> ValueError:
        detail = str(error).split(" [tensorstore_spec=")[0][:500]
        return ValueError(
            f"Checkpoint of step {step} in {self.save_dir!r} could not be read (a corrupt or truncated file?): "
            f"{type(error).__name__}: {detail}. Delete that step's directory to resume from an earlier one."
        )

    # Callback hooks ---------------------------------------------------------------------

    def on_train_begin(self, info: StepInfo) -> None:
        if not self.read_only:  # before step 1, not at the first save a save_interval later
            check_writable(self.save_dir)
        if not self.resume and info.restored_step is None and (latest := self.latest_step()) is not None:
            raise ValueError(
                f"save_dir {self.save_dir!r} already holds checkpoints (latest step {latest}) and resume=False: "
                "this run's saves would mix with them. Use a new save_dir, delete the old one, or resume=True."
            )
        self._total_steps = info.total_steps
        self._last_saved = info.start_step if info.restored_step is not None else None
        self.preempted = False
        self._sigterm.clear()
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: finishing the current step, then saving and stopping.")
        self._sigterm.set()

    def _preemption_requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # jax.distributed's preemption service catches SIGTERM and picks one step for all
            # processes; a local flag could stop them at different steps and hang the save.
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError as error:  # the service is not running
                if not self._warned_no_preemption_service:
                    self._warned_no_preemption_service = True
                    logger.warning(
                        "SIGTERM will not save a final checkpoint: JAX's preemption service is not running "
                        "(%s). It starts with jax.distributed.initialize().",
                        error,
                    )
                return False
        return self._sigterm.is_set()

    def needs_sync(self, step: int) -> bool:
        due = step % self.save_interval == 0 or step == self._total_steps
        if self._preemption_requested(step):
            self.preempted = True
            due = True
        if due:
            self._due.add(step)
        return due

    def on_step_end(self, info: StepInfo) -> None:
        if info.step not in self._due:
            return
        self._due.discard(info.step)
        self._save_info(info)
        if self.preempted:
            info.request_stop("preempted")

    def on_train_end(self, info: StepInfo) -> None:
        try:
            if info.error is None and info.state is not None and info.step and info.step != self._last_saved:
                self._save_info(info)
            if self._manager is not None:
                self._manager.wait_until_finished()
        finally:
            self._due.clear()
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None

    def _save_info(self, info: StepInfo) -> None:
        state = info.state
        if state is None:
            raise RuntimeError(f"No training state to save at step {info.step}.")
        self.save(info.step, state, info.data_state())

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None


def check_writable(save_dir: str) -> None:
    """Raises a ValueError naming ``save_dir`` and the reason when checkpoints cannot be
    written there (a file in the way, a directory this process cannot create or write),
    creating the directory otherwise. URLs (``gs://...``) are left to their storage client."""
    if "://" in save_dir:
        return
    path = Path(save_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    reason = None
    if not existing.is_dir():
        reason = "it is a file, not a directory" if existing == path else f"{existing} is a file, not a directory"
    else:
        probe = path / f".kithara-write-test-{jax.process_index()}-{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            reason = f"it is not writable by this process ({error.strerror or error})"
    if reason is not None:
        raise ValueError(
            f"The checkpoint directory {save_dir!r} cannot be used: {reason}. Point save_dir (or "
            "args.output_dir) at a directory this process can create and write."
        )


def _json_checksum(value: Any) -> list[int]:
    """Two 32-bit words of a JSON value's hash, like the arrays' pair of checksums."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")]


def _ignore_abandoned_event_loop_errors() -> None:
    """Installs (once) a ``sys.unraisablehook`` that drops ``RuntimeError('Event loop is
    closed')``: what tensorstore reads still in flight when orbax closed its event loop after
    a failed restore report on completion (dozens of tracebacks after the real error).
    Everything else goes to the previous hook."""
    if getattr(sys.unraisablehook, "_kithara_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._kithara_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_abandoned_read_filter)


def _abandoned_read_filter(record: logging.LogRecord) -> bool:
    """Drops asyncio's "Task exception was never retrieved" report of a tensorstore read
    (its error names a ``tensorstore_spec``) or of the closed loop: the sibling reads of a
    failed restore, which fail the same way after the real error has been raised."""
    if not record.getMessage().startswith("Task exception was never retrieved") or not record.exc_info:
        return True
    error = record.exc_info[1]
    return not ("tensorstore_spec" in str(error) or str(error) == "Event loop is closed")


def _leaf_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _check_matches(metadata: Any, target: Any, *, where: str) -> None:
    """Raises a ValueError naming the first variables whose name, shape or dtype differ."""
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
        raise ValueError(f"The {where} has no readable array metadata (corrupt or not a kithara checkpoint).")
    saved = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"{name}: missing from the checkpoint" for name in wanted if name not in saved]
    problems += [f"{name}: in the checkpoint but not in this model/optimizer" for name in saved if name not in wanted]
    for name in wanted.keys() & saved.keys():
        have, want = saved[name], wanted[name]
        if tuple(have.shape) != tuple(want.shape) or jax.numpy.dtype(have.dtype) != want.dtype:
            problems.append(
                f"{name}: saved {have.dtype}{list(have.shape)}, this model needs {want.dtype}{list(want.shape)}"
            )
    if problems:
        shown = "\n  ".join(sorted(problems)[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"The {where} does not match this model and optimizer (different architecture, LoRA "
            f"setting or optimizer?):\n  {shown}{more}\nPoint save_dir elsewhere or pass resume=False."
        )


def checksums(tree: Any) -> dict[str, list[int]]:
    """Two 32-bit sums per array (of its words, and of its words times their positions),
    computed on device and independent of sharding: they catch a file that was changed or
    damaged after the save, which the array store itself would read back silently."""
    named = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    sums = jax.device_get(_device_checksums(named))
    return {name: [int(a), int(b)] for name, (a, b) in sums.items()}


@jax.jit
def _device_checksums(named: dict[str, jax.Array]) -> dict[str, jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        if jax.typeof(x).memory_space == jax.memory.Space.Host:  # offloaded state (kithara.trainer.offload)
            x = jax.device_put(x, jax.memory.Space.Device)
        # Shape-preserving ops only: flattening an array sharded on a non-leading axis would
        # make XLA gather the whole array onto every device.
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)  # 8-byte items gain a trailing 2
        position = jnp.ones(words.shape, jnp.uint32)  # 1 + row-major index, mod 2**32
        stride = 1
        for axis in reversed(range(words.ndim)):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
            stride *= words.shape[axis]
        return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * position, dtype=jnp.uint32)])

    return {name: one(x) for name, x in named.items()}
