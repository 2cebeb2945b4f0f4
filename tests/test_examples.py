"""The objective examples run end to end at their (tiny) size and show what they claim."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # each example asks for its own CPU devices
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_sft_chat_template_example_learns_the_replies():
    out = run_example("sft_chat_template.py")
    before, after = map(float, re.search(r"eval loss \(assistant replies\): ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert after < before / 4, out
    assert "correct replies: 5/5" in out


@pytest.mark.slow
def test_dpo_after_sft_example_raises_reward_accuracy_margin_and_preference():
    out = run_example("dpo_after_sft.py")
    acc = re.search(r"reward accuracy ([0-9.]+) -> ([0-9.]+); reward margin ([-0-9.]+) -> ([-0-9.]+)", out)
    acc0, acc1, margin0, margin1 = map(float, acc.groups())
    assert acc1 > acc0 and margin1 > margin0, out
    pref = re.search(r"held-out preference for chosen .*: ([-0-9.]+) -> ([-0-9.]+)", out)
    assert float(pref.group(2)) > float(pref.group(1)), out


@pytest.mark.slow
def test_rejection_sampling_example_accuracy_rises():
    out = run_example("iterative_sft_rejection_sampling.py")
    accuracy = [float(a) for a in re.findall(r"held-out accuracy ([0-9.]+)", out)]
    assert len(accuracy) == 5 and accuracy[-1] > accuracy[0] + 0.3, out
    assert "step compilations: 1" in out


@pytest.mark.slow
def test_rl_addition_example_grpo_reward_rises_well_above_its_start(tmp_path):
    """The small version of examples/rl_addition.py: from the same brief SFT start, GRPO's
    exact-match reward (mean of the last 8 of 40 steps) ends well above its first 8 steps'."""
    out = run_example("rl_addition.py", "--quick", "--logdir", str(tmp_path / "runs"))
    start = float(re.search(r"SFT start: .* held-out exact match ([0-9.]+)", out).group(1))
    assert 0.05 < start < 0.6, out  # a non-zero start, far from perfect
    first, last = map(float, re.search(r"GRPO: exact-match reward ([0-9.]+) .*-> ([0-9.]+)", out).groups())
    assert last > 1.5 * first and last > first + 0.05, out
    assert any((tmp_path / "runs" / "grpo").iterdir()), "no TensorBoard events"
