"""Joining the processes of a multi-host job into one JAX runtime (``jax.distributed``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedTimeouts:
    """How long the JAX distributed runtime waits before it gives up (seconds).

    Args:
        initialization: how long a process retries connecting to the coordinator (and waits
            for all the others to connect) before ``initialize`` raises.
        heartbeat: a process that sends no heartbeat for this long is declared dead; the
            coordinator then tells every other process, which exits with an error instead
            of waiting forever in a collective.
        shutdown: how long a finishing process waits for the others to finish too.
    """

    initialization: int = 300
    heartbeat: int = 100
    shutdown: int = 300

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DistributedTimeouts.{field.name} must be a positive int (seconds), got {value!r}.")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cluster_detection_method: str | None = None,
    timeouts: DistributedTimeouts | None = None,
) -> bool:
    """Joins this process to a multi-process JAX job; a no-op when there is only one process.

    Call it first, before anything touches devices (building a model, ``jax.devices()``);
    it does not start them itself, so CPU device settings may follow it. Every process of
    the job runs the same program and calls it.

    - Explicit: pass ``coordinator_address`` (``host:port`` of process 0, reachable from
      every process), ``num_processes`` and this process's ``process_id`` (GPU nodes, a
      hand-made launcher, or ``run_on_ray``).
    - Detected: pass nothing. On Cloud TPU VM slices, SLURM and Open MPI, JAX's own cluster
      detection finds the coordinator, the process count and this process's id. Where no
      cluster is detected (a laptop, one TPU VM, one GPU node), nothing is done and the
      job runs as one process.

    ``num_processes=1`` is always a no-op. Calling it again with the same settings (or none)
    after the runtime is up does nothing; with different ones it raises.

    Args:
        coordinator_address: ``host:port`` where process 0 runs the coordination service.
        num_processes: processes in the job.
        process_id: this process, ``0 <= process_id < num_processes``.
        local_device_ids: restrict this process to these local accelerators (one process per
            GPU); all local devices by default.
        cluster_detection_method: force one of JAX's detectors (``"slurm"``, ``"ompi"``,
            ``"mpi4py"``, ``"gcetpu"``, ``"gketpu"``), or ``"deactivate"``.
        timeouts: initialization, heartbeat and shutdown timeouts.

    Returns:
        True when this process is part of a multi-process runtime, False when it runs alone.

    Raises:
        ValueError: inconsistent or missing arguments (for example ``num_processes=4`` without
            a coordinator, or a ``process_id`` out of range).
        RuntimeError: JAX already started its devices in this process, or the runtime was
            already initialised with different settings.

    Example:
        >>> # on each of 2 GPU nodes, with PROCESS_ID 0 or 1:
        >>> kithara.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=PROCESS_ID)
    """
    timeouts = timeouts or DistributedTimeouts()
    explicit = (coordinator_address, num_processes, process_id)
    _check_arguments(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return _already_initialized(coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return False
    if all(value is None for value in explicit) and cluster_detection_method is None:
        detected = detected_cluster()
        if detected is None:
            logger.debug("No multi-host environment detected: running as a single process.")
            return False
        logger.info("Detected a %s environment: joining the processes it describes.", detected)
    if _backends_started():
        raise RuntimeError(
            "kithara.distributed.initialize() must run before anything touches JAX devices, but this process "
            "already started them (jax.devices(), building a model, a jitted call...). Call it first thing in "
            "the program."
        )
    # A process that never connects (killed, failed to start) leaves the others waiting the whole
    # initialization timeout, after which JAX aborts the process (DEADLINE_EXCEEDED) without a
    # Python exception to add to: so say before waiting which setting bounds the wait.
    logger.info(
        "Waiting up to %d s for %s to connect to the coordinator%s (distributed.initialization_timeout, "
        "DistributedTimeouts.initialization); a process that does not start makes the others abort with "
        "DEADLINE_EXCEEDED after that long.",
        timeouts.initialization,
        f"{num_processes} processes" if num_processes else "all processes",
        f" at {coordinator_address}" if coordinator_address else "",
    )
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
        cluster_detection_method=cluster_detection_method,
        initialization_timeout=timeouts.initialization,
        heartbeat_timeout_seconds=timeouts.heartbeat,
        shutdown_timeout_seconds=timeouts.shutdown,
    )
    # Read from the runtime's own record rather than jax.process_count(), which would start the
    # devices: settings such as jax_num_cpu_devices may still be changed after this call.
    from jax._src.distributed import global_state

    logger.info("Process %d of %d joined the JAX runtime.", global_state.process_id, global_state.num_processes)
    return (global_state.num_processes or 1) > 1


def detected_cluster() -> str | None:
    """The name of the multi-host environment JAX's cluster detection recognises here
    (``"SlurmCluster"``, ``"GceTpuCluster"``, ...), or None when it finds none, or finds one
    that holds a single process."""
    # JAX exposes no public "is there a cluster?" query; its own detectors are the reference,
    # so kithara asks them rather than keeping a second list of environment variables.
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        try:
            count = env.get_process_count()
        except Exception:  # a detector that cannot count here still names the environment
            count = None
        if count == 1:
            return None
        return env.__name__
    return None


def _check_arguments(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    if num_processes is not None and (
        not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1
    ):
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}.")
    if process_id is not None and (not isinstance(process_id, int) or isinstance(process_id, bool)):
        raise ValueError(f"process_id must be an int, got {process_id!r}.")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id {process_id} is out of range for num_processes={num_processes} (0..{num_processes - 1})."
        )
    if num_processes == 1:
        return
    if (num_processes is None) != (process_id is None):
        raise ValueError(
            f"Set num_processes and process_id together (got num_processes={num_processes}, process_id={process_id}), "
            "or neither to let JAX detect them from the cluster environment."
        )
    if num_processes is not None and coordinator_address is None:
        raise ValueError(
            f"num_processes={num_processes} needs a coordinator_address: 'host:port' of process 0, reachable "
            "from every process (for example '10.0.0.1:1234')."
        )
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"coordinator_address {coordinator_address!r} must look like 'host:port' (for example '10.0.0.1:1234')."
            )


def _already_initialized(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Accepts a repeated call that asks for what is already running."""
    from jax._src.distributed import global_state

    running = {
        "coordinator_address": global_state.coordinator_address,
        "num_processes": global_state.num_processes,
        "process_id": global_state.process_id,
    }
    asked = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    differs = {k: (asked[k], running[k]) for k in asked if asked[k] is not None and asked[k] != running[k]}
    if differs:
        shown = ", ".join(f"{k}={want!r} (running: {have!r})" for k, (want, have) in differs.items())
        raise RuntimeError(f"The JAX distributed runtime is already initialised differently: {shown}.")
    return (global_state.num_processes or 1) > 1


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
