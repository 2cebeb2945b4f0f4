import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import pattern_examples, tiny_model, xla_flags

import kithara

WORKTREE = str(Path(__file__).resolve().parents[1])


def make_trainer(model, examples, steps, checkpointer=None, **kwargs):
    loader = kithara.Dataloader(
        examples, kwargs.pop("per_device", 1), seed=0, num_devices=kwargs.pop("num_devices", None)
    )
    tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 1e-3, 12), weight_decay=0.01)
    return kithara.Trainer(model, tx, loader, steps=steps, checkpointer=checkpointer, progress_bar=False, **kwargs)


def losses(history):
    return np.asarray([h["loss"] for h in history])


def test_resume_is_exact(examples, tmp_path):
    data = examples[:48]  # 6 steps per epoch: the resumed run crosses an epoch boundary
    reference = make_trainer(tiny_model(), data, steps=10)
    expected = losses(reference.train())

    ckpt = kithara.Checkpointer(str(tmp_path), save_interval=4, max_to_keep=2)
    first = make_trainer(tiny_model(), data, steps=7, checkpointer=ckpt)
    np.testing.assert_array_equal(losses(first.train()), expected[:7])
    assert ckpt.manager.all_steps() == [4, 7]  # every 4 steps and the last

    second = make_trainer(tiny_model(seed=1), data, steps=10, checkpointer=kithara.Checkpointer(str(tmp_path), 4, 2))
    history = second.train()
    assert second.restored_step == 7 and [h["step"] for h in history] == [8, 9, 10]
    np.testing.assert_array_equal(losses(history), expected[7:])
    for path, value in reference.model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(second.model.variables.trainable[path]), np.asarray(value))
    assert kithara.Checkpointer(str(tmp_path)).manager.all_steps() == [8, 10]  # max_to_keep=2

    fresh = make_trainer(tiny_model(), data, steps=2, checkpointer=kithara.Checkpointer(str(tmp_path), resume=False))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        fresh.train()
    fresh = make_trainer(
        tiny_model(), data, steps=2, checkpointer=kithara.Checkpointer(str(tmp_path / "new"), resume=False)
    )
    assert [h["step"] for h in fresh.train()] == [1, 2] and fresh.restored_step is None


def test_restore_onto_another_mesh(examples, tmp_path):
    ckpt = kithara.Checkpointer(str(tmp_path), save_interval=3)
    trained = make_trainer(tiny_model(sharding="fsdp"), examples, steps=3, checkpointer=ckpt)
    trained.train()
    one = kithara.ShardingStrategy("dp", devices=jax.devices()[:1])
    target = make_trainer(tiny_model(sharding=one, seed=5), examples, steps=3, per_device=8, num_devices=1)
    state, data_state = kithara.Checkpointer(str(tmp_path)).restore(target)
    assert int(state.step) == 3 and data_state["batch"] == 3
    for path, value in trained.model.variables.trainable.items():
        restored = state.model.trainable[path]
        assert restored.sharding == target.state_shardings.model.trainable[path]
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(value))
    mu = state.opt_state.inner_state[1][0].mu
    np.testing.assert_array_equal(
        np.asarray(mu["token_embedding/embeddings"]),
        np.asarray(trained.train_state.opt_state.inner_state[1][0].mu["token_embedding/embeddings"]),
    )
    # Same global batch on one device: training goes on from step 4.
    ckpt = kithara.Checkpointer(str(tmp_path), save_interval=3)
    go_on = make_trainer(tiny_model(sharding=one), examples, steps=5, per_device=8, num_devices=1, checkpointer=ckpt)
    assert [h["step"] for h in go_on.train()] == [4, 5] and ckpt.manager.all_steps() == [3, 5]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop after a read error
def test_bad_checkpoints_give_clear_errors(examples, tmp_path):
    make_trainer(tiny_model(), examples, steps=2, checkpointer=kithara.Checkpointer(str(tmp_path / "a"), 2)).train()
    wider = make_trainer(tiny_model(hidden_dim=48), examples, steps=4)
    with pytest.raises(ValueError, match=r"token_embedding/embeddings: saved float32\[64, 32\].*float32\[64, 48\]"):
        kithara.Checkpointer(str(tmp_path / "a")).restore(wider)
    wider.checkpointer = kithara.Checkpointer(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="does not match this model"):
        wider.train()
    same = make_trainer(tiny_model(), examples, steps=4)
    sgd = kithara.Trainer(tiny_model(), optax.sgd(0.1), kithara.Dataloader(examples, 1), progress_bar=False)
    with pytest.raises(ValueError, match=r"opt_state.*in the checkpoint but not in this model/optimizer"):
        kithara.Checkpointer(str(tmp_path / "a")).restore(sgd)
    other_data = make_trainer(
        tiny_model(), examples[:100], steps=4, checkpointer=kithara.Checkpointer(str(tmp_path / "a"))
    )
    with pytest.raises(ValueError, match="cannot resume exactly"):
        other_data.train()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kithara.Checkpointer(str(tmp_path / "missing")).restore(same)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint of step 9"):
        kithara.Checkpointer(str(tmp_path / "a")).restore(same, step=9)
    # Arrays that read back differently from what was saved are refused (checksums).
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    meta_file = tmp_path / "c" / "2" / "data" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["model.trainable.token_embedding/embeddings"][0] += 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"is corrupt.*token_embedding/embeddings"):
        kithara.Checkpointer(str(tmp_path / "c")).restore(same)
    # A changed byte inside an array file.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for f in (tmp_path / "b" / "2" / "state").rglob("*"):
        if f.parent.name == "d" and f.stat().st_size > 10_000:
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"could not be read|is corrupt"):
        kithara.Checkpointer(str(tmp_path / "b")).restore(same)
    # Corrupt every data file of the arrays (what a disk error or a bad copy would do).
    files = [f for f in (tmp_path / "a" / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="could not be read"):
        kithara.Checkpointer(str(tmp_path / "a")).restore(same)
    (tmp_path / "a" / "2" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(ValueError, match="step 2"):
        kithara.Checkpointer(str(tmp_path / "a")).restore(same)


def test_checkpointer_argument_validation():
    with pytest.raises(ValueError, match="save_interval"):
        kithara.Checkpointer("x", save_interval=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        kithara.Checkpointer("x", max_to_keep=0)


SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from conftest import pattern_examples, tiny_model
import optax
import kithara

save_dir, log, steps, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
slow_save_after = int(os.environ.get("SLOW_SAVE_AFTER", "0"))
if slow_save_after:
    # Stretch the finalizing rename of later saves so the test can kill the process mid-save.
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        name = os.path.basename(str(self.get_final()))
        if name.isdigit() and int(name) > slow_save_after:
            time.sleep(600)
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize


class Log(kithara.Callback):
    def on_step_end(self, info):
        with open(log, "a") as f:
            f.write(json.dumps({{"step": info.step, "loss": info.metrics["loss"]}}) + "\\n")


loader = kithara.Dataloader(pattern_examples(64), 1, seed=0)
tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 1e-3, 50))
trainer = kithara.Trainer(tiny_model(), tx, loader, steps=steps, progress_bar=False, callbacks=[Log()],
                          checkpointer=kithara.Checkpointer(save_dir, save_interval=interval, max_to_keep=5))
trainer.train()
"""


def launch(tmp_path, save_dir, steps, interval, **env):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    log = tmp_path / "steps.jsonl"
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags(8),
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": WORKTREE,
        **env,
    }
    cmd = [sys.executable, str(script), str(save_dir), str(log), str(steps), str(interval)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), log


def logged(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits(tmp_path):
    save_dir = tmp_path / "ckpt"
    proc, log = launch(tmp_path, save_dir, steps=100_000, interval=5)
    try:
        wait_for(lambda: (save_dir / "5" / "_CHECKPOINT_METADATA").exists() or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    last = logged(log)[-1]["step"]
    assert last >= 5
    assert kithara.Checkpointer(str(save_dir)).latest_step() == last  # the step in flight was saved


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    save_dir = tmp_path / "ckpt"
    proc, log = launch(tmp_path, save_dir, steps=12, interval=4, SLOW_SAVE_AFTER="4")
    try:
        wait_for(lambda: any(p.name.startswith("8.") for p in save_dir.glob("*")) or proc.poll() is not None)
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=30)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, out
    assert not (save_dir / "8").exists() and any(p.name.startswith("8.") for p in save_dir.glob("*"))
    assert kithara.Checkpointer(str(save_dir)).latest_step() == 4
    first_run = logged(log)
    log.unlink()
    proc, log = launch(tmp_path, save_dir, steps=12, interval=4)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out
    resumed = logged(log)
    assert [r["step"] for r in resumed] == list(range(5, 13))
    # Resumed from step 4, it repeats the killed run's steps 5.. exactly.
    again = {r["step"]: r["loss"] for r in first_run}
    assert all(r["loss"] == again[r["step"]] for r in resumed if r["step"] in again)
    assert kithara.Checkpointer(str(save_dir)).manager.all_steps() == [4, 8, 12]


def test_resume_with_a_keras_optimizer_is_exact(examples, tmp_path):
    import keras

    def run(steps, checkpointer=None):
        loader = kithara.Dataloader(examples[:32], 1, seed=0)
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
        trainer = kithara.Trainer(
            tiny_model(),
            keras.optimizers.Adam(schedule),
            loader,
            steps=steps,
            checkpointer=checkpointer,
            progress_bar=False,
        )
        return trainer, losses(trainer.train())

    _, expected = run(4)
    run(2, kithara.Checkpointer(str(tmp_path), save_interval=2))
    resumed, tail = run(4, kithara.Checkpointer(str(tmp_path), save_interval=2))
    assert resumed.restored_step == 2
    np.testing.assert_array_equal(tail, expected[2:])


def test_synchronous_saves_restore_without_pickle(examples, tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used in a checkpoint save or restore")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    data = examples[:48]
    ckpt = kithara.Checkpointer(str(tmp_path), save_interval=2, async_save=False)
    first = make_trainer(tiny_model(), data, steps=4, checkpointer=ckpt)
    expected = losses(first.train())
    assert ckpt.manager.all_steps() == [2, 4]
    ckpt = kithara.Checkpointer(str(tmp_path), save_interval=2, async_save=False)
    # Among the callbacks rather than checkpointer=: it restores as well.
    loader = kithara.Dataloader(data, 1, seed=0)
    tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 1e-3, 12), weight_decay=0.01)
    second = kithara.Trainer(tiny_model(seed=3), tx, loader, steps=4, callbacks=[ckpt], progress_bar=False)
    assert second.train() == [] and second.restored_step == 4
    for path, value in first.model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(second.model.variables.trainable[path]), np.asarray(value))
    assert np.isfinite(expected).all()


def test_a_relative_checkpoint_directory_works(examples, tmp_path, monkeypatch):
    """`--set args.output_dir=runs/x`: orbax needs an absolute path, the Checkpointer makes one."""
    monkeypatch.chdir(tmp_path)
    checkpointer = kithara.Checkpointer("runs/ckpt", save_interval=1)
    assert checkpointer.save_dir == str(tmp_path / "runs" / "ckpt")
    make_trainer(tiny_model(), examples, steps=1, checkpointer=checkpointer).train()
    assert kithara.Checkpointer("runs/ckpt").latest_step() == 1


class StepCounter(kithara.Callback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, info):
        self.steps.append(info.step)


def test_resume_refuses_other_data_or_settings_naming_each_difference(examples, tmp_path):
    data = examples[:64]  # 8 batches of 8 rows per epoch
    make_trainer(tiny_model(), data, steps=2, checkpointer=kithara.Checkpointer(str(tmp_path), 2)).train()

    def resume(rows, steps=4, **kwargs):
        counter = StepCounter()
        trainer = make_trainer(
            tiny_model(), rows, steps, kithara.Checkpointer(str(tmp_path), 2), callbacks=[counter], **kwargs
        )
        with pytest.raises(ValueError) as error:
            trainer.train()
        assert counter.steps == []  # refused before step 3 ran
        return " ".join(str(error.value).split())

    # Same row count and lengths, other rows: the content fingerprint differs.
    message = resume(examples[64:128])
    assert "content: checkpoint" in message and "rows:" not in message, message
    # Another size: named as such (old vs new), not blamed on steps or gradient accumulation.
    message = resume(examples[:32])
    assert "rows: checkpoint 64, this loader 32" in message, message
    assert "gradient accumulation" not in message and "gradient_accumulation_steps" not in message, message
    # Another gradient_accumulation_steps (same batches per epoch: 8 = 4 steps x 2).
    message = resume(data, gradient_accumulation_steps=2)
    assert "gradient_accumulation_steps: checkpoint 1, this run 2" in message, message


def test_changed_steps_on_resume_follow_the_learning_rate_schedule(examples, tmp_path):
    """A schedule the trainer builds over max_steps: another max_steps would change the learning
    rate of every remaining step, so it is refused. A constant rate (or the user's own optimizer,
    test_resume_is_exact) lets a run be extended."""
    data = examples[:64]

    def trainer(steps, save_dir, **fields):
        loader = kithara.Dataloader(data, 1, seed=0)
        ckpt = kithara.Checkpointer(str(save_dir), 2)
        return kithara.Trainer(tiny_model(), None, loader, steps=steps, checkpointer=ckpt, progress_bar=False, **fields)

    trainer(2, tmp_path / "linear", lr_scheduler_type="linear", learning_rate=1e-3).train()
    longer = trainer(4, tmp_path / "linear", lr_scheduler_type="linear", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"max_steps: checkpoint 2, this run 4") as error:
        longer.train()
    assert "learning-rate schedule" in str(error.value)
    trainer(2, tmp_path / "constant", learning_rate=1e-3).train()
    extended = trainer(4, tmp_path / "constant", learning_rate=1e-3)
    assert [h["step"] for h in extended.train()] == [3, 4] and extended.restored_step == 2


def test_an_edited_data_position_is_refused(examples, tmp_path):
    data = examples[:64]
    make_trainer(tiny_model(), data, steps=2, checkpointer=kithara.Checkpointer(str(tmp_path), 2)).train()
    meta_file = tmp_path / "2" / "data" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["iterator"]["batch"] == 2
    meta["iterator"]["batch"] = 3
    meta_file.write_text(json.dumps(meta))
    trainer = make_trainer(tiny_model(), data, steps=4, checkpointer=kithara.Checkpointer(str(tmp_path), 2))
    with pytest.raises(ValueError, match=r"step 2 .* is corrupt.*data item") as error:
        trainer.train()
    assert "iterator" in str(error.value)


def test_unusable_checkpoint_directory_fails_before_step_1(examples, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = {str(a_file): "is a file", str(a_file / "sub" / "ckpt"): f"{a_file} is a file"}
    if os.geteuid() != 0:  # root writes into read-only directories
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        cases[str(read_only / "ckpt")] = "not writable"
    for save_dir, reason in cases.items():
        counter = StepCounter()
        trainer = make_trainer(tiny_model(), examples[:64], 3, kithara.Checkpointer(save_dir, 2), callbacks=[counter])
        with pytest.raises(ValueError, match="checkpoint directory") as error:
            trainer.train()
        assert save_dir in str(error.value) and reason in str(error.value), error.value
        assert counter.steps == []
    # URLs are left to the storage client (no local probing of gs://...).
    from kithara.callbacks.checkpointer import check_writable

    check_writable("gs://some-bucket/run/checkpoints")


CORRUPT_RESUME = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import pattern_examples, tiny_model
import optax
import kithara

loader = kithara.Dataloader(pattern_examples(64), 1, seed=0)
trainer = kithara.Trainer(tiny_model(), optax.sgd(0.1), loader, steps=4, progress_bar=False,
                          checkpointer=kithara.Checkpointer(sys.argv[1], save_interval=2))
for attempt in range(8):  # orbax's abandoned reads race with its loop's closing: try several times
    try:
        trainer.train()
    except ValueError:
        time.sleep(0.2)
trainer.train()  # the error is raised out of the script: its message must be the last line
"""


@pytest.mark.slow
def test_a_corrupt_checkpoint_error_is_the_last_thing_printed(tmp_path):
    """orbax closes its event loop with reads still in flight when one fails; their callbacks
    used to print dozens of 'Event loop is closed' tracebacks after the real error."""
    loader = kithara.Dataloader(pattern_examples(64), 1, seed=0)
    ckpt = kithara.Checkpointer(str(tmp_path / "ckpt"), save_interval=2)
    trainer = kithara.Trainer(tiny_model(), optax.sgd(0.1), loader, steps=2, checkpointer=ckpt, progress_bar=False)
    trainer.train()
    files = [f for f in (tmp_path / "ckpt" / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(b"\0" * 7)
    script = tmp_path / "resume.py"
    script.write_text(CORRUPT_RESUME.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": WORKTREE, "PYTHONUNBUFFERED": "1", "KERAS_BACKEND": "jax"}
    cmd = [sys.executable, str(script), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 1, out[-3000:]
    assert "Event loop is closed" not in out, out[-3000:]
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert last.startswith("ValueError: Checkpoint of step 2") and "could not be read" in last, out[-3000:]


def test_asyncio_reports_of_abandoned_reads_are_dropped_and_others_kept():
    """The late sibling reads of a failed restore can also surface as asyncio's "Task
    exception was never retrieved" (seen once under load, after the real error); those are
    dropped, any other asyncio report is kept."""
    import asyncio
    import gc
    import logging

    from kithara.callbacks import checkpointer as checkpointer_lib

    checkpointer_lib._ignore_abandoned_event_loop_errors()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("asyncio").addHandler(handler)
    try:
        for message in ("OUT_OF_RANGE: Error reading ... [tensorstore_spec='{}']", "a real bug"):

            async def fail(text: str = message) -> None:
                raise ValueError(text)

            loop = asyncio.new_event_loop()
            task = loop.create_task(fail())
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            del task
            gc.collect()  # the unretrieved exception is reported when the task is collected
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    reported = [str(r.exc_info[1]) for r in records if r.exc_info]
    assert reported == ["a real bug"], reported
