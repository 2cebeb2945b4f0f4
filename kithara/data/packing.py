"""Sequence packing: several examples per row, kept apart by segment ids and positions."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups item indices into bins of total length at most ``capacity``.

    Items are placed longest first (ties by index), each into the fullest bin that still
    has room for it, else into a new bin. Bins come back in the order they were opened,
    items in the order they were placed. ``O(n log n)`` plus the distinct free sizes.

    Example:
        >>> best_fit_decreasing([4, 2, 3, 1], capacity=4)
        [[0], [2, 3], [1]]
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}.")
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(f"Item {i} has length {lengths[i]}; lengths must be in [1, {capacity}] (truncate first).")
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct free space of open bins
    bins_by_free: dict[int, list[int]] = {}  # free space -> heap of bin indices (earliest first)
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[item]
        at = bisect.bisect_left(free_sizes, size)
        if at < len(free_sizes):
            free = free_sizes[at]
            target = heapq.heappop(bins_by_free[free])
            if not bins_by_free[free]:
                del bins_by_free[free]
                free_sizes.pop(at)
        else:
            free, target = capacity, len(bins)
            bins.append([])
        bins[target].append(item)
        left = free - size
        if left > 0:
            if left not in bins_by_free:
                bins_by_free[left] = []
                bisect.insort(free_sizes, left)
            heapq.heappush(bins_by_free[left], target)
    return bins


def pack_row(examples: Sequence[Example], length: int, prefix: str = "") -> dict[str, np.ndarray]:
    """One row of ``length`` positions holding ``examples`` back to back.

    ``segment_ids`` number the examples 1, 2, ... (0 is padding) and ``positions`` restart
    at 0 in each, so a segment-aware model attends within an example only and sees the same
    positions as if the example were alone.
    """
    row = empty_row(length, prefix, packed=True)
    start = 0
    for segment, example in enumerate(examples, 1):
        n = len(example[f"{prefix}token_ids"])
        if start + n > length:
            raise ValueError(f"Examples of total length {start + n} do not fit a row of {length}.")
        for key in ("token_ids", "labels", "label_mask"):
            row[prefix + key][start : start + n] = example[prefix + key]
        row[f"{prefix}segment_ids"][start : start + n] = segment
        row[f"{prefix}positions"][start : start + n] = np.arange(n)
        start += n
    row[f"{prefix}padding_mask"] = row[f"{prefix}segment_ids"] > 0
    return row


def pad_row(example: Example, length: int, prefix: str = "") -> dict[str, np.ndarray]:
    """One example right-padded to ``length`` positions."""
    row = empty_row(length, prefix, packed=False)
    n = len(example[f"{prefix}token_ids"])
    if n > length:
        raise ValueError(f"An example of length {n} does not fit a row of {length}.")
    for key in ("token_ids", "labels", "label_mask"):
        row[prefix + key][:n] = example[prefix + key]
    row[f"{prefix}padding_mask"][:n] = True
    return row


def empty_row(length: int, prefix: str = "", *, packed: bool) -> dict[str, np.ndarray]:
    """A fully masked row (its label mask is all false, so it adds nothing to a loss)."""
    row = {
        f"{prefix}token_ids": np.zeros(length, np.int32),
        f"{prefix}padding_mask": np.zeros(length, bool),
        f"{prefix}labels": np.zeros(length, np.int32),
        f"{prefix}label_mask": np.zeros(length, bool),
    }
    if packed:
        row[f"{prefix}segment_ids"] = np.zeros(length, np.int32)
        row[f"{prefix}positions"] = np.zeros(length, np.int32)
    return row
