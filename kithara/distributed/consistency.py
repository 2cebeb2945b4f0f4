"""Checking that every process of a job was set up the same way."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_MISSING = "<not set>"


def check_same_on_all_processes(description: Mapping[str, Any], what: str) -> None:
    """Raises on every process when the processes describe ``what`` differently.

    Each process passes a flat ``{name: JSON-able value}`` description of its set-up (mesh
    shape, batch size, steps, config values...). The descriptions are all-gathered (two
    small collectives) and compared with process 0's; a difference is reported naming the
    process and the entries, on every process alike, so none of them goes on alone into a
    collective the others will never join. With one process it does nothing.

    Args:
        description: this process's values; keys name them in the error.
        what: what is described, for the message (``"trainer set-up"``, ``"run config"``).

    Raises:
        ValueError: some process's description differs from process 0's.

    Example:
        >>> check_same_on_all_processes({"mesh": {"fsdp": 8}, "steps": 100}, "trainer set-up")
    """
    if jax.process_count() == 1:
        return
    descriptions = _all_gather_json(dict(description))
    problems = differences(descriptions)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"The {len(descriptions)} processes disagree on the {what}:\n  {shown}{more}\n"
            "Every process must run the same program with the same configuration."
        )


def differences(descriptions: list[dict[str, Any]]) -> list[str]:
    """One line per entry where a process's description differs from process 0's."""
    problems = []
    reference = descriptions[0]
    for process, other in enumerate(descriptions[1:], start=1):
        for key in sorted(reference.keys() | other.keys()):
            theirs, ours = other.get(key, _MISSING), reference.get(key, _MISSING)
            if theirs != ours:
                problems.append(f"process {process} has {key}={theirs!r} where process 0 has {ours!r}")
    return problems


def _all_gather_json(value: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's ``value``, in process order (JSON round-trip, so tuples become lists)."""
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value, sort_keys=True, default=str).encode(), np.uint8)
    # process_allgather needs one shape everywhere: agree on the longest text, then pad to it.
    lengths = np.asarray(multihost_utils.process_allgather(np.int64(encoded.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]
