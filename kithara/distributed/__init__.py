"""Multi-host training: join the processes of a job into one JAX runtime, check that they
agree, and launch them with Ray. See docs/distributed.md."""

from kithara.distributed.consistency import check_same_on_all_processes
from kithara.distributed.ray_launcher import run_on_ray
from kithara.distributed.runtime import DistributedTimeouts, detected_cluster, initialize

__all__ = ["DistributedTimeouts", "check_same_on_all_processes", "detected_cluster", "initialize", "run_on_ray"]
