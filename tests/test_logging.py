"""Logs and progress a user sees: step logs under a plain ``basicConfig`` and with no logging
set-up at all, ``set_verbosity``, and plain progress lines while training when stdout is a
pipe (a log file, CI), each in a fresh interpreter as a user's script runs."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import xla_flags

import kithara
from kithara.callbacks.progress import ProgressBar

WORKTREE = str(Path(__file__).resolve().parents[1])

TRAIN = """
import numpy as np
import kithara

def train(steps, callbacks=(), **kwargs):
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=32, num_layers=1, hidden_dim=16, num_heads=2, num_kv_heads=1, intermediate_dim=32
    )
    rng = np.random.default_rng(0)
    rows = [
        {"token_ids": t, "padding_mask": np.ones(8, bool), "labels": t, "label_mask": np.ones(8, np.int32)}
        for t in rng.integers(3, 32, size=(16, 8), dtype=np.int32)
    ]
    loader = kithara.Dataloader(rows, 1, seed=0)
    trainer = kithara.Trainer(
        model, kithara.optimizers.adamw(1e-3), loader, steps=steps, callbacks=list(callbacks), **kwargs
    )
    return trainer.train()
"""


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body).replace("TRAIN_HELPER", TRAIN))
    return [sys.executable, str(path)]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": WORKTREE, "JAX_PLATFORMS": "cpu", "KERAS_BACKEND": "jax"}
    env["XLA_FLAGS"] = xla_flags()  # one CPU device: the conftest's eight only slow this down
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # rich's terminal overrides
        env.pop(name, None)
    return env


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(_script(tmp_path, body), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_basic_config_info_after_import_shows_step_logs(tmp_path):
    # Importing kithara (orbax, through absl) used to leave a root handler behind, which made
    # this basicConfig a no-op: the root stayed at WARNING and no step log was ever shown.
    result = _run(
        tmp_path,
        """
        import logging
        TRAIN_HELPER
        logging.basicConfig(level=logging.INFO, format="USER %(levelname)s %(name)s: %(message)s")
        train(3, progress_bar=False)
        """,
    )
    lines = result.stderr.splitlines()
    for step in (1, 2, 3):
        assert any(re.match(rf"USER INFO kithara\.trainer\.trainer: step {step}: .*loss=", ln) for ln in lines), (
            result.stderr[-3000:]
        )
    assert result.stderr.count("kithara.trainer.trainer: step 1:") == 1  # not twice (the fallback stood down)


def test_unconfigured_script_shows_kithara_info_once_and_set_verbosity_hides_it(tmp_path):
    result = _run(
        tmp_path,
        """
        import logging
        import kithara
        logging.getLogger("kithara.trainer.trainer").info("step 1: loss 1.0")
        logging.getLogger("orbax").info("not kithara's")
        kithara.set_verbosity("WARNING")
        logging.getLogger("kithara.trainer.trainer").info("step 2: hidden")
        logging.getLogger("kithara.trainer.trainer").warning("still shown")
        """,
    )
    assert re.search(r"^\d\d:\d\d:\d\d INFO kithara\.trainer\.trainer: step 1: loss 1\.0$", result.stderr, re.M)
    assert result.stderr.count("step 1: loss 1.0") == 1, result.stderr
    assert "not kithara's" not in result.stderr and "hidden" not in result.stderr
    assert "still shown" in result.stderr


def test_user_configuration_made_before_import_is_kept(tmp_path):
    result = _run(
        tmp_path,
        """
        import logging
        logging.basicConfig(level=logging.WARNING, format="USER %(message)s")
        import kithara
        logging.getLogger("kithara.trainer.trainer").info("hidden: the user asked for WARNING")
        logging.getLogger("kithara.trainer.trainer").warning("shown once")
        """,
    )
    assert "hidden" not in result.stderr
    assert result.stderr.count("shown once") == 1 and "USER shown once" in result.stderr


def test_set_verbosity_refuses_an_unknown_level():
    with pytest.raises(ValueError, match="not a logging level"):
        kithara.set_verbosity("LOUD")


def test_progress_bar_validates_every():
    with pytest.raises(ValueError, match="every must be >= 1"):
        ProgressBar(every=0)


@pytest.mark.slow
def test_progress_lines_appear_while_training_when_stdout_is_a_pipe(tmp_path):
    # Off a terminal, rich draws its live bar only when it stops: a run writing to a log
    # file showed nothing until training ended. Training here cannot end until the test
    # has read a progress line, so a bar drawn only at the end fails the run.
    go = tmp_path / "go"
    cmd = _script(
        tmp_path,
        f"""
        import os, time
        TRAIN_HELPER

        class WaitForReader(kithara.Callback):
            def on_step_end(self, info):
                if info.step == 4:
                    deadline = time.monotonic() + 90
                    while not os.path.exists({str(go)!r}):
                        if time.monotonic() > deadline:
                            raise RuntimeError("no progress line was read during training")
                        time.sleep(0.05)

        train(8, callbacks=[WaitForReader()], logging_steps=100)
        print("TRAINING DONE", flush=True)
        """,
    )
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith("train step 1/8") and not go.exists():
            assert "TRAINING DONE" not in "\n".join(seen)
            go.write_text("")
    process.wait(timeout=60)
    output = "\n".join(seen)
    assert process.returncode == 0, output[-3000:]
    assert go.exists(), output[-3000:]
    steps = [
        int(m) for m in re.findall(r"^train step (\d+)/8 \(\d+%\)  loss \d+\.\d+  [\d,]+ tok/s  elapsed", output, re.M)
    ]
    assert steps == list(range(1, 9)), output[-3000:]  # every=None on 8 steps: every step
    assert "\x1b[" not in output  # no terminal control codes in a log file


def test_plain_progress_every_n_steps():
    import io

    from rich.console import Console

    from kithara.callbacks.base import StepInfo

    def info(step, **metrics):
        return StepInfo(step, 0, 10, 0, None, metrics, None, None, lambda: None, dict)

    out = io.StringIO()
    bar = ProgressBar(every=3, console=Console(file=out, force_terminal=False))
    bar.on_train_begin(info(0))
    for step in range(1, 11):
        bar.on_step_end(info(step, loss=1.0))
        time.sleep(0.001)
    bar.on_train_end(info(10))
    shown = [int(m) for m in re.findall(r"^train step (\d+)/10", out.getvalue(), re.M)]
    assert shown == [1, 3, 6, 9, 10]
    assert "eta" in out.getvalue().splitlines()[1] and "eta" not in out.getvalue().splitlines()[-1]
