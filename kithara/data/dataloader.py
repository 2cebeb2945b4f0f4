"""Dataloader: each process encodes its own rows, then pads or packs them into fixed-shape batches."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from kithara.data import packing
from kithara.data.formats import Dataset, Example, TokenizedDataset
from kithara.data.sources import RowError

logger = logging.getLogger(__name__)


class Dataloader:
    """Batches for a device mesh, read and tokenized by the process that uses them.

    Rows are assigned to processes once: a permutation of all row indices (from ``seed``,
    identical everywhere) is dealt round-robin, so process ``p`` of ``P`` owns rows
    ``perm[p::P]`` and reads, validates and tokenizes only those, when the loader is built.
    Each epoch reshuffles the process's rows (``seed + epoch``) and batches them into
    ``[local_batch, length]`` numpy arrays; the trainer makes one global ``jax.Array`` of
    them. Every process yields the same number of batches (collectives need that), padding
    with fully masked rows where it is short.

    A batch holds ``token_ids``, ``padding_mask``, ``labels`` and ``label_mask`` (prefixed
    ``chosen_`` / ``rejected_`` for preference data) and, when packing, ``segment_ids`` and
    ``positions``. Rows are ``max_length`` long, or the smallest of ``length_buckets`` that
    fits the longest row of the batch, so the step compiles once per bucket.

    Args:
        dataset: a ``kithara.data`` dataset, or a list of pre-tokenized examples (dicts of
            ``token_ids``, ``labels``, ``label_mask`` and optionally ``padding_mask``).
        per_device_batch_size: rows per device per batch.
        shuffle: shuffle the row assignment and every epoch.
        seed: shuffle seed.
        drop_remainder: drop the last incomplete batch (training); otherwise pad it with
            fully masked rows (evaluation then sees every row once).
        packing: pack several examples per row (best-fit decreasing).
        length_buckets: row lengths to choose from per batch; ``None`` pads to ``max_length``.
        skip_bad_rows: log and count malformed rows instead of raising.
        prefetch: batches prepared ahead in a background thread (0 turns it off).
        num_devices: devices the batch is spread over; ``jax.device_count()`` by default.
        process_index / process_count: this process and the number of processes
            (``jax.process_index()`` / ``jax.process_count()`` by default; set both to
            simulate one process of a multi-host job).

    Example:
        >>> ds = kithara.data.PromptCompletionDataset("train.jsonl", tokenizer, max_length=512)
        >>> loader = kithara.Dataloader(ds, per_device_batch_size=4, seed=0, packing=True)
        >>> for batch in loader.epoch(0): ...
    """

    def __init__(
        self,
        dataset: Dataset | Sequence[Mapping[str, Any]],
        per_device_batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        packing: bool = False,
        length_buckets: Sequence[int] | None = None,
        skip_bad_rows: bool = False,
        prefetch: int = 2,
        num_devices: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        if not isinstance(per_device_batch_size, int) or per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be a positive int, got {per_device_batch_size!r}.")
        if (process_index is None) != (process_count is None):
            raise ValueError("Set both process_index and process_count, or neither.")
        self._simulated = process_count is not None
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count}).")
        if not isinstance(dataset, Dataset):
            dataset = _pretokenized(dataset)
        if packing and not dataset.supports_packing:
            raise ValueError(f"{type(dataset).__name__} cannot be packed (its rows are pairs); set packing=False.")
        self.dataset = dataset
        self.max_length = dataset.max_length
        self.buckets = _buckets(length_buckets, self.max_length)
        num_devices = num_devices or jax.device_count()
        self.per_device_batch_size = per_device_batch_size
        self.global_batch_size = per_device_batch_size * num_devices
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"Global batch {self.global_batch_size} does not split over {self.process_count} processes."
            )
        self.local_batch_size = self.global_batch_size // self.process_count
        self.shuffle, self.seed, self.packing = shuffle, seed, packing
        self.drop_remainder, self.prefetch = drop_remainder, prefetch

        self.row_indices = self._assigned_rows()
        self.examples, self.stats = self._encode(skip_bad_rows)
        self.extras = (
            {k: np.zeros_like(v) for k, v in self.examples[0].items() if np.ndim(v) == 0} if self.examples else {}
        )
        if packing and self.extras:
            raise ValueError(
                f"Examples with per-example fields {sorted(self.extras)} cannot be packed; set packing=False."
            )
        self.rows = self._layout()
        self.content_digests = self._content_digests()
        total_rows = self._process_max(len(self.rows))
        if total_rows == 0:
            raise ValueError(f"No examples left to train on: {self.stats}.")
        per_batch = self.local_batch_size
        self.num_batches = total_rows // per_batch if drop_remainder else math.ceil(total_rows / per_batch)
        if self.num_batches == 0:
            raise ValueError(
                f"{len(self.rows)} rows on this process, fewer than one batch of {per_batch} "
                f"(per_device_batch_size x {num_devices} devices / {self.process_count} processes)."
            )
        logger.info("process %d data: %s, %d rows, %d batches per epoch", self.process_index, self.stats,
                    len(self.rows), self.num_batches)  # fmt: skip

    # Set-up -----------------------------------------------------------------------------

    def _assigned_rows(self) -> np.ndarray:
        """This process's row indices: a seeded permutation of all rows, dealt round-robin."""
        n = len(self.dataset)
        if n == 0:
            raise ValueError(f"The {type(self.dataset).__name__} has no rows.")
        order = np.random.default_rng(self.seed).permutation(n) if self.shuffle else np.arange(n)
        return order[self.process_index :: self.process_count]

    def _encode(self, skip_bad_rows: bool) -> tuple[list[Example], dict[str, int]]:
        # Read in file order (Parquet row groups and gs:// reads stay sequential); the epochs
        # shuffle the rows anyway.
        examples: list[Example] = []
        dropped = skipped = 0
        error: RowError | None = None
        # Rows the dataset itself skips (identical answers, nothing to learn), by reason.
        counter = getattr(self.dataset, "skipped", None)
        reasons_before = dict(counter) if counter is not None else {}
        for index in np.sort(self.row_indices):
            try:
                example = self.dataset[int(index)]
            except RowError as bad:
                if not skip_bad_rows:
                    error = bad
                    break
                skipped += 1
                logger.warning("Skipping a bad row (skip_bad_rows=True): %s", bad)
                continue
            if example is None:
                dropped += 1
            elif examples and example.keys() != examples[0].keys():
                error = RowError(self.dataset.source.describe(int(index)),
                                 f"has fields {sorted(example)}, other rows {sorted(examples[0])}.")  # fmt: skip
                break
            else:
                examples.append(example)
        # Every process must stop together, or the others would wait for it in a collective.
        if self._process_max(int(error is not None)):
            raise error or RowError(f"process {self.process_index}", "another process hit a bad row; see its log.")
        nothing_to_learn = sum(n - reasons_before.get(reason, 0) for reason, n in (counter or {}).items())
        no_loss = dropped - nothing_to_learn
        stats = {"rows": len(self.row_indices), "examples": len(examples), "dropped_no_loss_tokens": no_loss}
        if nothing_to_learn:  # each reason was logged (and counted in dataset.skipped) by the dataset
            stats["skipped_nothing_to_learn"] = nothing_to_learn
        if skip_bad_rows:
            stats["skipped_bad_rows"] = skipped
        if no_loss or skipped:
            logger.warning("process %d: dropped %d rows left without loss tokens after truncation to %d, "
                           "skipped %d bad rows", self.process_index, no_loss, self.max_length, skipped)  # fmt: skip
        return examples, stats

    def _layout(self) -> list[list[int]]:
        """Example indices of each row: one per row, or best-fit-decreasing packs."""
        if not self.packing:
            return [[i] for i in range(len(self.examples))]
        lengths = [len(e["token_ids"]) for e in self.examples]
        return packing.best_fit_decreasing(lengths, self.max_length)

    def _content_digests(self) -> list[str | None]:
        """Per process, a hash of the examples it encoded (token ids, labels, masks), in row
        order: another dataset of the same size and lengths gets other digests. About a
        second per 100k rows of 300 tokens, next to the encoding. A simulated process knows
        only its own (None for the others)."""
        own = _examples_digest(self.examples)
        if self._simulated:
            return [own if p == self.process_index else None for p in range(self.process_count)]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(own), np.uint8))
            return [bytes(row).hex() for row in np.asarray(gathered)]
        return [own]

    def _process_max(self, value: int) -> int:
        if self._simulated or jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.int64(value))))

    # Batches ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.num_batches

    @property
    def sequence_length(self) -> int:
        return self.max_length

    @property
    def settings(self) -> dict[str, Any]:
        """What the batch sequence depends on (JSON-able, the same on every process of a job): a
        restored iterator state must have been saved with the same."""
        return {
            "dataset": type(self.dataset).__name__,
            "rows": len(self.dataset),
            "content": self.content_digests,
            "max_length": self.max_length,
            "truncation_mode": self.dataset.truncation_mode,
            "packing": self.packing,
            "length_buckets": list(self.buckets),
            "shuffle": self.shuffle,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "process_count": self.process_count,
            "batches_per_epoch": self.num_batches,
        }

    @property
    def fingerprint(self) -> str:
        """Identifies the batch sequence (a hash of ``settings``)."""
        return hashlib.sha256(repr(sorted(self.settings.items())).encode()).hexdigest()[:16]

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches ``start`` to ``stop`` of ``epoch``, prepared ahead in a
        background thread."""
        stop = self.num_batches if stop is None else min(stop, self.num_batches)
        plan = self._epoch_plan(epoch)[start:stop]
        lengths = self._batch_lengths(plan)
        batches = grain.MapDataset.source(list(zip(plan, lengths, strict=True))).map(self._make_batch)
        if self.prefetch:
            options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)
            yield from batches.to_iter_dataset(options)
        else:
            yield from (batches[i] for i in range(len(batches)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)

    def iterator(self, state: Mapping[str, Any] | None = None, *, batches_per_epoch: int | None = None) -> DataIterator:
        """An endless, checkpointable iterator over epochs (see ``DataIterator``)."""
        iterator = DataIterator(self, batches_per_epoch=batches_per_epoch)
        if state is not None:
            iterator.set_state(state)
        return iterator

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        """Row indices of each batch of ``epoch`` (-1 for a fully masked filler row)."""
        order = np.arange(len(self.rows))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        order = order[: self.num_batches * self.local_batch_size]
        padded = np.full(self.num_batches * self.local_batch_size, -1)
        padded[: len(order)] = order
        return padded.reshape(self.num_batches, self.local_batch_size).tolist()

    def _batch_lengths(self, plan: list[list[int]]) -> list[int]:
        """Row length of each batch: the smallest bucket that fits, agreed by all processes."""
        if len(self.buckets) == 1:
            return [self.buckets[0]] * len(plan)
        needed = np.array([max([self._row_length(r) for r in rows] + [1]) for rows in plan], np.int64)
        if not self._simulated and jax.process_count() > 1 and len(needed):
            from jax.experimental import multihost_utils

            needed = np.max(multihost_utils.process_allgather(needed), axis=0)
        return [self.buckets[np.searchsorted(self.buckets, n)] for n in needed]

    def _row_length(self, row: int) -> int:
        if row < 0:
            return 1
        prefixes = self.dataset.sequences
        return max(sum(len(self.examples[i][f"{p}token_ids"]) for i in self.rows[row]) for p in prefixes)

    def _make_batch(self, item: tuple[list[int], int]) -> dict[str, np.ndarray]:
        rows, length = item
        built = [self._make_row(r, length) for r in rows]
        return {key: np.stack([row[key] for row in built]) for key in built[0]}

    def _make_row(self, row: int, length: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix in self.dataset.sequences:
            if row < 0:
                out.update(packing.empty_row(length, prefix, packed=self.packing))
            elif self.packing:
                out.update(packing.pack_row([self.examples[i] for i in self.rows[row]], length, prefix))
            else:
                out.update(packing.pad_row(self.examples[self.rows[row][0]], length, prefix))
        for key, zero in self.extras.items():
            out[key] = zero if row < 0 else self.examples[self.rows[row][0]][key]
        return out


class DataIterator:
    """Batches over epochs, with a state to checkpoint: after ``set_state`` the next batches
    are exactly those an uninterrupted run would have produced.

    ``get_state()`` is a small JSON-able dict (epoch, batch within it, and the loader's
    fingerprint and settings, so a state from different data or settings is refused,
    naming each difference).
    """

    def __init__(self, loader: Dataloader, *, batches_per_epoch: int | None = None) -> None:
        self.loader = loader
        self.batches_per_epoch = min(batches_per_epoch or len(loader), len(loader))
        self.epoch, self.index = 0, 0
        self._batches: Iterator[dict[str, np.ndarray]] | None = None

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = self.loader.epoch(self.epoch, self.index, self.batches_per_epoch)
        batch = next(self._batches)
        self.index += 1
        return batch

    def seek(self, epoch: int, batch: int) -> None:
        """Positions the iterator before batch ``batch`` of ``epoch``."""
        self.set_state({"epoch": epoch, "batch": batch, "fingerprint": self.loader.fingerprint})

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.index, "batches_per_epoch": self.batches_per_epoch,
                "fingerprint": self.loader.fingerprint, "data": self.loader.settings}  # fmt: skip

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved, now = state.get("data"), self.loader.settings
        if isinstance(saved, Mapping):
            differences = [f"{key}: checkpoint {saved.get(key)!r}, this loader {value!r}"
                           for key, value in now.items() if not _same_setting(key, saved.get(key), value)]  # fmt: skip
        elif state.get("fingerprint") != self.loader.fingerprint:  # saved before the settings were recorded
            differences = [f"fingerprint: checkpoint {state.get('fingerprint')!r}, this loader "
                           f"{self.loader.fingerprint!r}"]  # fmt: skip
        else:
            differences = []
        if differences:
            raise ValueError(
                f"This data iterator state was saved for different data or loader settings ({'; '.join(differences)}); "
                "it cannot resume exactly. Resume with the same data and loader settings, or start a new run "
                "in another checkpoint directory."
            )
        if state.get("batches_per_epoch", self.batches_per_epoch) != self.batches_per_epoch:
            raise ValueError(
                f"This data iterator state has {state['batches_per_epoch']} batches per epoch, this iterator "
                f"{self.batches_per_epoch} (the same data, read in other step sizes: a different "
                "gradient_accumulation_steps?); it cannot resume exactly."
            )
        epoch, index = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"Invalid data iterator state {dict(state)}.")
        self.epoch, self.index, self._batches = epoch, index, None


def _same_setting(key: str, saved: Any, now: Any) -> bool:
    if key == "content":  # per-process digests; a simulated process knows only its own (None)
        return (isinstance(saved, list) and len(saved) == len(now)
                and all(a is None or b is None or a == b for a, b in zip(saved, now, strict=True)))  # fmt: skip
    return bool(saved == now)


def _examples_digest(examples: Sequence[Example]) -> str:
    """A hash of encoded examples, in order: every field's values, lengths and dtype."""
    digest = hashlib.sha1()
    keys = list(examples[0]) if examples else []  # the Dataloader checks every example has them
    sizes = []
    for example in examples:
        for key in keys:
            array = np.ascontiguousarray(example[key])
            sizes.append(array.size)
            digest.update(repr(array.tolist()).encode() if array.dtype.hasobject else array.data)
    digest.update(repr([(key, np.asarray(examples[0][key]).dtype.str) for key in keys]).encode())
    digest.update(np.asarray(sizes, np.int64).data)
    return digest.hexdigest()[:16]


def pad_length(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Right-pads every ``[batch, L]`` array of a batch to ``length`` with zeros (masked);
    per-example ``[batch]`` fields are left alone."""
    return {
        k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, length - v.shape[-1])]) if v.ndim >= 2 else v
        for k, v in batch.items()
    }


def _pretokenized(examples: Sequence[Mapping[str, Any]]) -> TokenizedDataset:
    if not isinstance(examples, Sequence):
        raise ValueError(
            f"Expected a kithara.data dataset (e.g. PromptCompletionDataset(data, tokenizer, ...), which also reads "
            f"Hugging Face datasets) or a list of pre-tokenized examples, got {type(examples).__name__}."
        )
    if len(examples) == 0:
        raise ValueError("The dataset is empty.")
    first = examples[0]
    if not isinstance(first, Mapping) or "token_ids" not in first:
        raise ValueError(
            "A list dataset must hold pre-tokenized examples (token_ids, labels, label_mask); wrap raw rows in a "
            "kithara.data dataset class such as PromptCompletionDataset."
        )
    return TokenizedDataset(list(examples), max_length=max(len(e["token_ids"]) for e in examples))


def _buckets(length_buckets: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    if length_buckets is None:
        return (max_length,)
    buckets = sorted({int(b) for b in length_buckets})
    if not buckets or buckets[0] < 1 or buckets[-1] > max_length:
        raise ValueError(f"length_buckets must be positive and at most max_length={max_length}, got {length_buckets}.")
    if buckets[-1] != max_length:
        buckets.append(max_length)
    return tuple(buckets)
