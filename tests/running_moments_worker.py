"""One process of a 2-process job for tests/test_running_moments.py: each process folds its
own values into a RunningMoments; process 0 writes what it holds."""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("KERAS_BACKEND", "jax")


def main(coordinator: str, process_id: int, out: str) -> None:
    import numpy as np

    import kithara
    from kithara.utils import RunningMoments

    kithara.distributed.initialize(coordinator, 2, process_id)
    rng = np.random.default_rng(process_id)
    running = RunningMoments()
    batches = []
    for size in (3, 5, 1):  # unequal batches, and unequal between the processes
        values = rng.normal(2.0, 3.0, size + process_id)
        batches.append(running.update(values))
    if process_id == 0:
        with open(out, "w") as f:
            json.dump({"state": running.state_dict(), "batches": batches}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
