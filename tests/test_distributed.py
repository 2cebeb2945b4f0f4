"""Multi-host training on one machine: two processes of 4 CPU devices each form one
8-device mesh (gloo collectives), started as subprocesses, through the CLI, or on Ray."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pattern_examples, xla_flags
from distributed_worker import STEPS_PER_RUN, fail_on_process_1, make_trainer, train

import kithara
from kithara.distributed import consistency, runtime

TESTS = Path(__file__).resolve().parent
WORKTREE = str(TESTS.parent)
HEARTBEAT_SECONDS = 5
FAILURE_BOUND_SECONDS = 60  # process 1 dead -> process 0 exits; measured 4-5 s with a 5 s heartbeat


class GlobalBatches(kithara.Dataloader):
    """The global batches of a ``processes``-process job, read by one process: each process's
    local batch (its own rows, see Dataloader), concatenated in process order, which is how
    ``shard_batch`` assembles the global array. Its fingerprint is the job's, so a data
    position saved by the job resumes here. (A plain one-process Dataloader deals the rows
    to batches differently, so its losses differ from the job's.)"""

    def __init__(self, examples, processes):
        self.parts = [
            kithara.Dataloader(examples, 1, seed=0, process_index=p, process_count=processes) for p in range(processes)
        ]
        vars(self).update(vars(self.parts[0]))
        self.local_batch_size = self.global_batch_size

    def epoch(self, epoch, start=0, stop=None):
        for batches in zip(*(part.epoch(epoch, start, stop) for part in self.parts), strict=True):
            yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def losses(history):
    return np.asarray([h["loss"] for h in history])


@pytest.fixture(scope="module")
def reference():
    """Losses of 5 steps in this single process on 8 devices, on the two-process job's batches,
    and the evaluation after step 3."""
    trainer = make_trainer(STEPS_PER_RUN + 2, loader=GlobalBatches(pattern_examples(64), 2), evaluate=True)
    return losses(trainer.train()), trainer.eval_history


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(*paths):
    """This environment for a worker process, importing this worktree's kithara (and ``paths``)."""
    python_path = os.pathsep.join([WORKTREE, *paths, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": python_path}


def start_workers(tmp_path, die_after_step=0):
    env = {**worker_env(), "XLA_FLAGS": xla_flags(4)}
    coordinator = f"127.0.0.1:{free_port()}"
    args = [str(tmp_path / "ckpt"), str(tmp_path / "out.json"), str(die_after_step), str(HEARTBEAT_SECONDS)]
    return [
        subprocess.Popen(
            [sys.executable, str(TESTS / "distributed_worker.py"), coordinator, str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]


def finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout)[0].decode()[-3000:] for p in procs]
    finally:  # never leave a worker waiting for its dead peer
        for p in procs:
            p.kill()


def test_two_processes_train_like_one_and_their_checkpoint_continues_on_one(tmp_path, reference):
    reference, reference_eval = reference
    procs = start_workers(tmp_path)
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["devices"] == 8 and result["processes"] == 2
    np.testing.assert_allclose(result["losses"], reference[:STEPS_PER_RUN], rtol=0, atol=1e-5)
    # Evaluation sums over every row, whichever process read it: the same metrics as one process.
    (evaluated,) = result["eval"]
    assert evaluated.keys() == reference_eval[0].keys() and evaluated["step"] == STEPS_PER_RUN
    # Relative: the rows are summed in another order, and perplexity is exp(loss).
    names = list(reference_eval[0])
    np.testing.assert_allclose([evaluated[k] for k in names], [reference_eval[0][k] for k in names], rtol=1e-6)
    # Both processes wrote their shards of the last step.
    assert sorted(p.name for p in (tmp_path / "ckpt" / "3" / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]

    checkpointer = kithara.Checkpointer(str(tmp_path / "ckpt"))
    resumed = make_trainer(STEPS_PER_RUN + 2, checkpointer, loader=GlobalBatches(pattern_examples(64), 2))
    history = resumed.train()
    assert resumed.restored_step == STEPS_PER_RUN and [h["step"] for h in history] == [4, 5]
    np.testing.assert_allclose(losses(history), reference[STEPS_PER_RUN:], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_dead_process_stops_the_others_and_keeps_the_checkpoint(tmp_path, reference):
    """Process 1 is killed (SIGKILL) right after the checkpoint of step 2; process 0, in the
    next step's collectives, must exit with an error within a bound, not hang."""
    procs = start_workers(tmp_path, die_after_step=2)
    deadline = time.monotonic() + 300
    while procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    died = time.monotonic()
    try:
        procs[0].wait(timeout=FAILURE_BOUND_SECONDS)
        detected = time.monotonic() - died
    finally:
        outs = finish(procs, timeout=5)
    assert procs[1].returncode == -signal.SIGKILL, outs
    assert procs[0].returncode != 0, outs
    print(f"process 0 exited {detected:.1f} s after process 1 died (code {procs[0].returncode})")

    checkpointer = kithara.Checkpointer(str(tmp_path / "ckpt"))
    assert checkpointer.latest_step() == 2
    resumed = make_trainer(3, checkpointer, loader=GlobalBatches(pattern_examples(64), 2))
    history = resumed.train()
    assert resumed.restored_step == 2
    np.testing.assert_allclose(losses(history), reference[0][2:3], rtol=0, atol=1e-5)


@pytest.mark.slow
# ray.init starts its daemons with fork+exec from this (multithreaded) JAX process; nothing
# runs in the child before exec, so JAX's fork warning does not apply.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_ray_launcher_runs_the_same_job_on_two_workers(tmp_path, reference):
    ray = pytest.importorskip("ray")
    env = worker_env(str(TESTS))
    env_vars = {
        "XLA_FLAGS": xla_flags(4),
        **{k: env[k] for k in ("KERAS_BACKEND", "PYTHONPATH")},
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start = time.monotonic()
        results = kithara.distributed.run_on_ray(
            train,
            2,
            args=(str(tmp_path / "ckpt"),),
            placement_strategy="PACK",  # one machine here; one worker per host on a real cluster
            env_vars=env_vars,
            timeouts=kithara.distributed.DistributedTimeouts(heartbeat=HEARTBEAT_SECONDS),
        )
        print(f"run_on_ray: {time.monotonic() - start:.1f} s")
        # A failing worker: its error reaches the driver, and its peer, stuck in a collective,
        # is stopped rather than left running.
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="process 1 failed on purpose"):
            kithara.distributed.run_on_ray(fail_on_process_1, 2, placement_strategy="PACK", env_vars=env_vars)
        print(f"run_on_ray with a failing worker: raised after {time.monotonic() - start:.1f} s")
        # Workers stopped and their placement group removed: the cluster's CPUs come back.
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU") == 2
    finally:
        ray.shutdown()
    assert [r["processes"] for r in results] == [2, 2] and [r["devices"] for r in results] == [8, 8]
    np.testing.assert_allclose(results[0]["losses"], reference[0][:STEPS_PER_RUN], rtol=0, atol=1e-5)
    assert results[0]["losses"] == results[1]["losses"]  # metrics are global, the same everywhere
    assert kithara.Checkpointer(str(tmp_path / "ckpt")).latest_step() == STEPS_PER_RUN


def test_run_on_ray_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        kithara.distributed.run_on_ray(print, 0)
    with pytest.raises(ValueError, match="placement_strategy must be one of"):
        kithara.distributed.run_on_ray(print, 2, placement_strategy="ANYWHERE")


def test_cli_processes_with_different_configs_stop_with_a_clear_error(tmp_path):
    """Two `kithara train` processes joined by the distributed section, one with another
    args.max_steps: both refuse to start, naming the process and the setting."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = worker_env()
    env["XLA_FLAGS"] = xla_flags()  # the CLI's cpu_devices=4 sets the device count
    procs = []
    for i in range(2):
        sets = [
            f"distributed.coordinator_address={coordinator}",
            "distributed.num_processes=2",
            f"distributed.process_id={i}",
            "cpu_devices=4",
            f"args.max_steps={10 + i}",
            f"args.output_dir={tmp_path}/out",
        ]
        cmd = [sys.executable, "-m", "kithara", "train", str(Path(kithara.__file__).parent / "configs" / "demo.yaml")]
        cmd += [arg for s in sets for arg in ("--set", s)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path))
    outs = finish(procs, timeout=120)
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        assert "process 1 has args.max_steps=11 where process 0 has 10" in " ".join(out.split()), out


# Single-process behaviour and argument checks ----------------------------------------------


def test_initialize_is_a_no_op_on_one_process():
    assert kithara.distributed.initialize() is False  # no cluster environment here
    assert kithara.distributed.initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False
    kithara.distributed.check_same_on_all_processes({"steps": 3}, "trainer set-up")  # nothing to compare


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_processes=2, process_id=2, coordinator_address="h:1"), "process_id 2 is out of range"),
        (dict(num_processes=2, process_id=-1, coordinator_address="h:1"), "process_id -1 is out of range"),
        (dict(num_processes=2, process_id=0), "num_processes=2 needs a coordinator_address"),
        (dict(num_processes=2, coordinator_address="h:1"), "Set num_processes and process_id together"),
        (dict(num_processes=0, process_id=0), "num_processes must be a positive int"),
        (dict(num_processes=2, process_id=0, coordinator_address="h"), "must look like 'host:port'"),
        (dict(num_processes=2, process_id=0, coordinator_address="h:port"), "must look like 'host:port'"),
    ],
)
def test_initialize_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kithara.distributed.initialize(**kwargs)


def test_initialize_after_devices_started_says_to_call_it_first(monkeypatch):
    # This pytest process already uses its 8 devices; joining a job now is too late.
    monkeypatch.setattr(runtime, "detected_cluster", lambda: "SlurmCluster")
    with pytest.raises(RuntimeError, match="must run before anything touches JAX devices"):
        kithara.distributed.initialize()
    with pytest.raises(ValueError, match="heartbeat must be a positive int"):
        kithara.distributed.DistributedTimeouts(heartbeat=0)


def test_initialize_again_accepts_the_same_settings_only(monkeypatch):
    """A second call (a library calling initialize() after the user did) is fine when it asks
    for the running settings or none, and refused when it asks for others."""
    import jax
    from jax._src.distributed import global_state

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    for name, value in (("coordinator_address", "10.0.0.1:1234"), ("num_processes", 2), ("process_id", 1)):
        monkeypatch.setattr(global_state, name, value)
    assert kithara.distributed.initialize() is True
    assert kithara.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=1) is True
    with pytest.raises(RuntimeError, match=r"process_id=0 \(running: 1\)"):
        kithara.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)


def test_detected_cluster_follows_jax_detectors(monkeypatch):
    assert kithara.distributed.detected_cluster() is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    for name, value in {**slurm, "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert kithara.distributed.detected_cluster() == "SlurmCluster"
    monkeypatch.setitem(os.environ, "SLURM_NTASKS", "1")  # a one-task job runs as one process
    assert kithara.distributed.detected_cluster() is None


def test_differences_name_the_process_and_the_setting():
    descriptions = [{"mesh": {"fsdp": 8}, "steps": 3}, {"mesh": {"fsdp": 8}, "steps": 3}, {"mesh": {"fsdp": 4}}]
    assert consistency.differences(descriptions) == [
        "process 2 has mesh={'fsdp': 4} where process 0 has {'fsdp': 8}",
        "process 2 has steps='<not set>' where process 0 has 3",
    ]
    assert consistency.differences(descriptions[:2]) == []


def test_trainer_describes_what_processes_must_share():
    """What each process of a job contributes to the Trainer's cross-process check: two set-ups
    differing in mesh size (and so batch size and layout) are told apart, by name."""
    import jax
    import optax
    from conftest import tiny_model

    def description(devices, steps, name="fsdp"):
        strategy = kithara.ShardingStrategy(name, devices=jax.devices()[:devices])
        loader = kithara.Dataloader(pattern_examples(64), 1, num_devices=devices)
        trainer = kithara.Trainer(
            tiny_model(sharding=strategy), optax.sgd(0.1), loader, steps=steps, progress_bar=False
        )
        return json.loads(json.dumps(trainer._setup_description()))

    def differing(other):
        return {line.split("=")[0].removeprefix("process 1 has ") for line in consistency.differences([eight, other])}

    eight = description(8, 3)
    assert differing(description(8, 3)) == set()
    assert differing(description(4, 4)) == {"mesh", "global_batch_size", "steps", "steps_per_epoch"}
    assert differing(description(8, 3, "dp")) == {"mesh", "variable_shardings"}
    problems = consistency.differences([eight, description(4, 3)])
    assert "process 1 has mesh={'data': 1, 'fsdp': 4, 'tensor': 1} where process 0 has" in problems[1], problems
