"""One process of a multi-process training job on CPU (4 devices per process), used by
tests/test_distributed.py: started as a subprocess (``python distributed_worker.py ...``)
or, through ``train``, on a Ray worker."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json
import signal

STEPS_PER_RUN = 3


def make_trainer(steps, checkpointer=None, callbacks=(), loader=None, evaluate=False):
    """The job every test runs: a tiny Llama with FSDP over all devices, 1 row per device;
    with ``evaluate``, evaluated after step 3 on 28 rows (the last batch partly padding)."""
    import optax
    from conftest import pattern_examples, tiny_model

    import kithara

    loader = loader or kithara.Dataloader(pattern_examples(64), 1, seed=0)
    eval_options = {}
    if evaluate:
        eval_loader = kithara.Dataloader(pattern_examples(28, seed=1), 1, shuffle=False, drop_remainder=False)
        eval_options = {"eval_dataloader": eval_loader, "eval_steps_interval": STEPS_PER_RUN}
    tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.01)
    return kithara.Trainer(
        tiny_model(sharding="fsdp"),
        tx,
        loader,
        steps=steps,
        checkpointer=checkpointer,
        callbacks=callbacks,
        progress_bar=False,
        **eval_options,
    )


def train(save_dir, steps=STEPS_PER_RUN, save_interval=2, async_save=True, die_after_step=None, evaluate=False):
    """Trains and checkpoints; returns the per-step losses and evaluations. Process 1 kills itself right after
    the checkpoint of ``die_after_step`` is complete, when that is set."""
    import jax

    import kithara

    # 4 devices per process whatever XLA_FLAGS says by now (importing conftest asks for 8);
    # possible because kithara.distributed.initialize leaves the devices unstarted.
    jax.config.update("jax_num_cpu_devices", 4)

    class DieAfter(kithara.Callback):
        def on_step_end(self, info):
            if info.step == die_after_step and jax.process_index() == 1:
                print(f"process 1: killing itself after step {info.step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    checkpointer = kithara.Checkpointer(save_dir, save_interval=save_interval, async_save=async_save)
    trainer = make_trainer(steps, checkpointer, callbacks=[DieAfter()] if die_after_step else [], evaluate=evaluate)
    history = trainer.train()
    checkpointer.close()
    return {
        "losses": [h["loss"] for h in history],
        "eval": trainer.eval_history,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def fail_on_process_1():
    """Process 1 raises; process 0 waits for it in a collective it will never join."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_index() == 1:
        raise RuntimeError("process 1 failed on purpose")
    multihost_utils.process_allgather(np.zeros(1))


def main(coordinator, process_id, save_dir, out, die_after_step, heartbeat):
    import kithara

    timeouts = kithara.distributed.DistributedTimeouts(heartbeat=heartbeat, shutdown=heartbeat)
    kithara.distributed.initialize(coordinator, 2, process_id, timeouts=timeouts)
    died = int(die_after_step) or None
    result = train(
        save_dir,
        steps=STEPS_PER_RUN + 2 if died else STEPS_PER_RUN,
        async_save=not died,
        die_after_step=died,
        evaluate=not died,
    )
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
