"""Dataloader: deterministic, per-process batches from a random-access dataset (grain)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

REQUIRED_FIELDS = ("token_ids", "padding_mask", "labels", "label_mask")


class Dataloader:
    """Batches of fixed-length examples, each process reading only its own rows.

    Every example is a dict of equal-length 1-D arrays: ``token_ids``, ``padding_mask``,
    ``labels`` (the next token at each position) and ``label_mask`` (which labels count in
    the loss). The global batch is ``per_device_batch_size * num_devices`` rows; each
    epoch is shuffled with ``seed + epoch`` (identically on every process), then process
    ``p`` of ``P`` takes rows ``p, p + P, ...`` and batches them.

    Args:
        dataset: a sequence of examples, or a ``grain.MapDataset``.
        per_device_batch_size: rows per device per batch.
        shuffle: reshuffle every epoch.
        seed: shuffle seed.
        drop_remainder: drop the last incomplete batch (training); otherwise pad it with
            rows whose masks are all false (evaluation sees every example once).
        num_devices: devices the batch is spread over; ``jax.device_count()`` by default.

    Example:
        >>> loader = Dataloader(examples, per_device_batch_size=4, seed=0)
        >>> for batch in loader.epoch(0): ...
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]] | grain.MapDataset,
        per_device_batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_devices: int | None = None,
    ) -> None:
        if not isinstance(per_device_batch_size, int) or per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be a positive int, got {per_device_batch_size!r}.")
        num_devices = num_devices or jax.device_count()
        self.global_batch_size = per_device_batch_size * num_devices
        if self.global_batch_size % jax.process_count():
            raise ValueError(
                f"Global batch {self.global_batch_size} does not split over {jax.process_count()} processes."
            )
        self.local_batch_size = self.global_batch_size // jax.process_count()
        self.dataset = dataset if isinstance(dataset, grain.MapDataset) else grain.MapDataset.source(dataset)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        if len(self.dataset) == 0:
            raise ValueError("The dataset is empty.")
        if drop_remainder and len(self.dataset) < self.global_batch_size:
            raise ValueError(
                f"The dataset has {len(self.dataset)} examples, fewer than one global batch of "
                f"{self.global_batch_size} (per_device_batch_size x {num_devices} devices)."
            )
        _check_example(self.dataset[0], index=0)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset) / self.global_batch_size
        return math.floor(n) if self.drop_remainder else math.ceil(n)

    @property
    def sequence_length(self) -> int:
        return len(self.dataset[0]["token_ids"])

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """This process's local batches (``[local_batch, length]`` arrays) of one epoch.

        Every process yields exactly ``len(self)`` batches (collectives need that): when the
        rows do not split evenly, a process short of rows gets all-masked padding batches.
        """
        ds = self.dataset
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed + epoch)
        ds = ds[: min(len(ds), len(self) * self.global_batch_size)]
        ds = ds[jax.process_index() :: jax.process_count()]
        count = 0
        for batch in ds.batch(self.local_batch_size, drop_remainder=self.drop_remainder):
            count += 1
            yield _pad_rows(batch, self.local_batch_size)
        empty = {k: np.zeros((0, *np.shape(v)), np.asarray(v).dtype) for k, v in self.dataset[0].items()}
        for _ in range(count, len(self)):
            yield _pad_rows(empty, self.local_batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)


def _check_example(example: Mapping[str, Any], index: int) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in example]
    if missing:
        raise ValueError(f"Example {index} lacks fields {missing}; every example needs {list(REQUIRED_FIELDS)}.")
    lengths = {f: np.shape(example[f]) for f in REQUIRED_FIELDS}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"Example {index}: fields must be 1-D arrays of one length, got shapes {lengths}.")


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] < rows:
            pad = np.zeros((rows - value.shape[0], *value.shape[1:]), value.dtype)
            value = np.concatenate([value, pad])
        out[key] = value
    return out
