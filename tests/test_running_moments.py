"""RunningMoments: Welford / Chan moments against numpy, exact merges, TRL's update, 2 processes."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from test_distributed import free_port, worker_env

from kithara.utils import Moments, RunningMoments, batch_moments, merge

TESTS = Path(__file__).resolve().parent


def stream(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(5.0, 2.0, int(n)) for n in rng.integers(1, 9, size=12)]


def test_matches_numpy_on_a_stream():
    running = RunningMoments()
    seen = []
    for values in stream():
        mean, std = running.update(values)
        seen.extend(values)
        assert mean == pytest.approx(values.mean(), rel=1e-12)
        if len(values) > 1:
            assert std == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert running.mean == pytest.approx(np.mean(seen), rel=1e-12)
        assert running.var == pytest.approx(np.var(seen), rel=1e-12)
        assert running.count == len(seen)
    assert running.std == pytest.approx(np.std(seen, ddof=1), rel=1e-12)


def test_split_stream_merged_equals_one_stream():
    batches = stream(1)
    whole, first, second = RunningMoments(), RunningMoments(), RunningMoments()
    for values in batches:
        whole.update(values)
    for values in batches[:5]:
        first.update(values)
    for values in batches[5:]:
        second.update(values)
    first.merge(second)
    assert first.count == whole.count
    np.testing.assert_allclose([first.mean, first.var], [whole.mean, whole.var], rtol=1e-13)
    # Merging is exact in arithmetic: the same values in one batch give the same moments.
    one = RunningMoments()
    one.update(np.concatenate(batches))
    np.testing.assert_allclose([one.mean, one.var], [whole.mean, whole.var], rtol=1e-13)


def test_matches_trls_update_formula():
    """TRL's RunningMoments.update (0.19-0.24), transcribed: it starts at count 1e-24, var 1."""
    mean, var, count = 0.0, 1.0, 1e-24
    ours = RunningMoments()
    for values in stream(2):
        xs_mean, xs_var, xs_count = values.mean(), values.var(), values.size
        delta = xs_mean - mean
        tot = count + xs_count
        old_sum = var * count + delta**2 * count * xs_count / tot
        mean += delta * xs_count / tot
        var = (old_sum + xs_var * xs_count) / tot
        count = tot
        trl_batch = (xs_mean, np.sqrt(xs_var * xs_count / (xs_count - 1)) if xs_count > 1 else np.nan)
        got = ours.update(values)
        np.testing.assert_allclose(got, trl_batch, rtol=1e-12)
        np.testing.assert_allclose([ours.mean, ours.var], [mean, var], rtol=1e-12)


def test_device_moments_and_merge_in_jnp():
    values = np.asarray([1.0, 2.0, 4.0, 8.0, 100.0], np.float32)
    mask = np.asarray([True, True, True, True, False])
    m = batch_moments(jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose([m.count, m.mean, m.m2], [4, 3.75, np.var(values[:4]) * 4], rtol=1e-6)
    merged = merge(Moments(jnp.float32(2), jnp.float32(1.5), jnp.float32(0.5)), batch_moments(jnp.asarray([4.0, 8.0])))
    np.testing.assert_allclose([merged.count, merged.mean, merged.m2], [4, 3.75, np.var(values[:4]) * 4], rtol=1e-6)
    empty = batch_moments(jnp.asarray([1.0]), jnp.asarray([False]))
    kept = merge(m, empty)
    np.testing.assert_allclose([kept.count, kept.mean, kept.m2], [m.count, m.mean, m.m2], rtol=0)


def test_state_round_trips_exactly_through_json():
    running = RunningMoments()
    for values in stream(3):
        running.update(values)
    back = RunningMoments.from_state_dict(json.loads(json.dumps(running.state_dict())))
    assert back.state_dict() == running.state_dict()
    with pytest.raises(ValueError, match="lacks"):
        RunningMoments.from_state_dict({"mean": 1.0})
    with pytest.raises(ValueError, match="no values"):
        RunningMoments().update(np.zeros(0))


def test_two_processes_hold_the_moments_of_all_values(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out.json"
    env = {**worker_env(), "XLA_FLAGS": xla_flags(1)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "running_moments_worker.py"), coordinator, str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()[-3000:]
    result = json.loads(out.read_text())
    everything, reference = [], RunningMoments()
    for k in range(3):
        batch = []
        for process in range(2):  # the worker's draws, process by process
            rng = np.random.default_rng(process)
            draws = [rng.normal(2.0, 3.0, s + process) for s in (3, 5, 1)]
            batch.extend(draws[k])
        everything.extend(batch)
        expected = reference.update(np.asarray(batch), across_processes=False)
        np.testing.assert_allclose(result["batches"][k], expected, rtol=1e-12)
    state = result["state"]
    assert state["count"] == len(everything)
    np.testing.assert_allclose(state["mean"], np.mean(everything), rtol=1e-12)
    np.testing.assert_allclose(state["m2"] / state["count"], np.var(everything), rtol=1e-12)
