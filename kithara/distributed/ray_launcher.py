"""Running one training function on N Ray workers that form one JAX runtime."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kithara.distributed.runtime import DistributedTimeouts, initialize

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLACEMENT_STRATEGIES = ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK")


class _JaxWorker:
    """One process of the job: a Ray actor that joins the JAX runtime, then runs the function."""

    def coordinator_address(self) -> str:
        """This worker's node address and a port free on it, for the coordination service."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def run(
        self,
        fn: Callable[..., Any],
        coordinator_address: str,
        num_processes: int,
        process_id: int,
        timeouts: DistributedTimeouts,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> Any:
        initialize(coordinator_address, num_processes, process_id, timeouts=timeouts)
        return fn(*args, **kwargs)


def run_on_ray(
    fn: Callable[..., T],
    num_workers: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    resources_per_worker: Mapping[str, float] | None = None,
    placement_strategy: str = "STRICT_SPREAD",
    env_vars: Mapping[str, str] | None = None,
    timeouts: DistributedTimeouts | None = None,
    placement_timeout: float = 300.0,
) -> list[T]:
    """Runs ``fn(*args, **kwargs)`` on ``num_workers`` Ray workers that together form one
    multi-process JAX job, and returns each worker's result (in process order).

    Each worker is a fresh Ray actor process. Worker 0 picks a free port on its node for
    JAX's coordination service; every worker then calls ``kithara.distributed.initialize``
    with that address, the worker count and its own index before ``fn`` runs, so ``fn``
    sees all devices of all workers in ``jax.devices()``. ``fn`` is the whole training
    program (build the model, data and trainer, train); it must be importable or picklable
    by Ray, and must not touch JAX devices on the driver.

    If a worker fails, the error is raised here and all workers are stopped. Ray must be
    installed (``pip install 'kithara[ray]'``); ``ray.init()`` is called if the driver has
    not connected to a cluster yet (``RAY_ADDRESS`` picks an existing one).

    Args:
        fn: the program each worker runs.
        num_workers: processes in the job; normally one per host.
        args / kwargs: passed to ``fn`` on every worker.
        resources_per_worker: Ray resources each worker reserves, e.g. ``{"TPU": 4}`` or
            ``{"GPU": 8, "CPU": 32}``; ``{"CPU": 1}`` by default.
        placement_strategy: Ray placement-group strategy. ``"STRICT_SPREAD"`` (default)
            puts each worker on a different node, as JAX expects one process per host;
            ``"PACK"`` lets several share a node (a local test cluster).
        env_vars: environment variables of the worker processes, set before they import
            anything (``XLA_FLAGS``, ``JAX_PLATFORMS``...).
        timeouts: the JAX runtime's timeouts on every worker.
        placement_timeout: seconds to wait for the cluster to offer the resources.

    Returns:
        ``[fn's result on worker 0, ..., on worker num_workers - 1]``.

    Example:
        >>> def train(config_path):
        ...     ...  # build model, loaders and Trainer exactly as on one host, then train
        >>> kithara.distributed.run_on_ray(train, num_workers=4, args=("exp.yaml",),
        ...                                resources_per_worker={"TPU": 4})
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}.")
    resources = dict(resources_per_worker or {"CPU": 1})
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError as error:
        raise ImportError("run_on_ray needs Ray: pip install 'kithara[ray]'.") from error
    if not ray.is_initialized():
        ray.init()
    group = placement_group([resources] * num_workers, strategy=placement_strategy)
    try:
        ray.get(group.ready(), timeout=placement_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"Ray could not place {num_workers} workers of {resources} each with strategy {placement_strategy!r} "
            f"within {placement_timeout:.0f} s; the cluster offers {ray.available_resources()}."
        ) from None
    worker_class = ray.remote(_JaxWorker)
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    workers: list[Any] = [  # ray's stubs do not type actor methods' .remote
        worker_class.options(
            num_cpus=resources.get("CPU", 0),
            num_gpus=resources.get("GPU", 0),
            resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
            runtime_env=runtime_env,
            max_restarts=0,
        ).remote()
        for rank in range(num_workers)
    ]
    try:
        coordinator = ray.get(workers[0].coordinator_address.remote())
        logger.info("Starting %d Ray workers; JAX coordinator at %s", num_workers, coordinator)
        timeouts = timeouts or DistributedTimeouts()
        calls = [
            worker.run.remote(fn, coordinator, num_workers, rank, timeouts, tuple(args), dict(kwargs or {}))
            for rank, worker in enumerate(workers)
        ]
        # Wait for whichever finishes first, so a failure surfaces at once rather than after
        # the lower-ranked workers (which may be stuck waiting for the failed one).
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(calls)
    finally:
        for worker in workers:
            ray.kill(worker)
        remove_placement_group(group)
