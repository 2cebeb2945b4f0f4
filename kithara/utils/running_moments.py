"""Running mean and variance of a stream of values: Welford / Chan's parallel update, exact
across processes, as TRL's ``RunningMoments`` (BCO's reward shift ``delta``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Moments:
    """Count, mean and ``m2`` (sum of squared deviations from the mean) of some values;
    floats on the host, or scalar arrays inside a jitted step."""

    count: Any
    mean: Any
    m2: Any


EMPTY = Moments(0.0, 0.0, 0.0)


def batch_moments(values: Any, mask: Any = None) -> Moments:
    """The moments of ``values`` (where ``mask`` is true): jnp arrays in, jnp scalars out."""
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.ones(values.shape, bool) if mask is None else jnp.asarray(mask, bool)
    count = mask.sum().astype(jnp.float32)
    mean = jnp.where(mask, values, 0.0).sum() / jnp.maximum(count, 1.0)
    m2 = jnp.where(mask, (values - mean) ** 2, 0.0).sum()
    return Moments(count, mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s combination of the moments of two disjoint sets of values; works on
    floats and on (traced) arrays, and gives ``a`` (or ``b``) back when the other is empty."""
    count = a.count + b.count
    safe = jnp.maximum(count, 1.0) if isinstance(count, jax.Array) else max(count, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * b.count / safe
    m2 = a.m2 + b.m2 + delta**2 * a.count * b.count / safe
    return Moments(count, mean, m2)


class RunningMoments:
    """Running mean, variance and count of a stream of values (host side, float64).

    ``update(values)`` folds a batch in with Chan's parallel formula and returns the
    batch's mean and (unbiased) standard deviation, as TRL's ``RunningMoments.update``
    does. With several JAX processes each passes its own values: their ``(count, mean, m2)``
    are gathered and combined exactly, so every process holds the moments of all values.

    TRL starts from ``count=1e-24, var=1`` to avoid dividing by zero; this starts from an
    empty stream (count 0), which differs from TRL's by about 1e-24 relative.

    Args:
        moments: the state to start from (default: empty).

    Example:
        >>> running = RunningMoments()
        >>> running.update(np.array([1.0, 2.0, 3.0]))
        (2.0, 1.0)
        >>> running.mean, running.var, running.count
        (2.0, 0.6666666666666666, 3.0)
    """

    def __init__(self, moments: Moments = EMPTY) -> None:
        self.moments = Moments(float(moments.count), float(moments.mean), float(moments.m2))

    @property
    def count(self) -> float:
        return float(self.moments.count)

    @property
    def mean(self) -> float:
        return float(self.moments.mean)

    @property
    def var(self) -> float:
        """Population variance (TRL's ``var``); 1.0 for an empty stream, TRL's start."""
        return self.moments.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation (TRL's ``std``); 1.0 with fewer than two values."""
        return math.sqrt(self.moments.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: Any, *, across_processes: bool = True) -> tuple[float, float]:
        """Folds ``values`` in; returns the batch's mean and unbiased std (of every process's
        values when ``across_processes`` and there are several processes)."""
        values = np.asarray(values, np.float64).reshape(-1)
        mean = float(values.mean()) if values.size else 0.0
        local = Moments(float(values.size), mean, float(((values - mean) ** 2).sum()))
        batch = all_process_moments(local) if across_processes else local
        if batch.count == 0:
            raise ValueError("RunningMoments.update got no values (on any process).")
        self.moments = merge(self.moments, batch)
        std = math.sqrt(batch.m2 / (batch.count - 1)) if batch.count > 1 else float("nan")
        return float(batch.mean), std

    def merge(self, other: RunningMoments | Moments) -> None:
        """Folds in the moments of another, disjoint stream."""
        theirs = other.moments if isinstance(other, RunningMoments) else other
        self.moments = merge(self.moments, Moments(*(float(x) for x in dataclasses.astuple(theirs))))

    def state_dict(self) -> dict[str, float]:
        """JSON-able state (float64 values round-trip exactly through JSON)."""
        return {"count": self.moments.count, "mean": self.moments.mean, "m2": self.moments.m2}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunningMoments:
        missing = [k for k in ("count", "mean", "m2") if k not in state]
        if missing:
            raise ValueError(f"RunningMoments state lacks {missing}; expected the dict state_dict() returns.")
        return cls(Moments(float(state["count"]), float(state["mean"]), float(state["m2"])))

    def __repr__(self) -> str:
        return f"RunningMoments(count={self.count}, mean={self.mean}, var={self.var})"


def all_process_moments(local: Moments) -> Moments:
    """The moments of every process's values: each process's ``(count, mean, m2)`` is
    gathered and the lot combined with Chan's formula, in process order (the same result
    on every process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    # Sent as bytes: without jax_enable_x64 a float64 array would travel as float32.
    row = np.asarray([local.count, local.mean, local.m2], np.float64).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(row), np.uint8).reshape(-1, 24).view(np.float64)
    total = EMPTY
    for count, mean, m2 in gathered.tolist():
        total = merge(total, Moments(count, mean, m2))
    return total
