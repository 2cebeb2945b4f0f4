"""Batched generation for the server: requests queue up, and one worker thread groups those
with the same sampling settings into one ``model.sample`` call.

``model.sample`` pads prompts, new-token counts and the batch to power-of-two buckets, so
the server compiles one program per bucket and sampling mode, never one per request shape.
Generation runs in the worker thread, off the server's event loop, which keeps answering
(health checks, streams, new requests) while the model runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Any

from kithara.serve.loading import ServedModel

logger = logging.getLogger(__name__)

_SEED_MASK = 0xFFFFFFFF  # jax.random.key takes 32-bit seeds; larger ones wrap
_RECENT_BATCHES = 256  # batch records kept for /stats


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (``temperature=0``: greedy).

    Rows of one ``model.sample`` call share them, so only requests with equal settings are
    batched together. A request with a ``seed`` runs alone: its samples then depend only on
    its own prompt, ``n`` and ``seed``, never on which requests arrived with it.
    """

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None

    def batch_key(self, job_id: int) -> tuple[Any, ...]:
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sample", self.temperature, self.top_p, self.top_k, self.min_p)


@dataclasses.dataclass(frozen=True)
class Generated:
    """One row's new tokens (the stop token excluded) and whether a stop token ended it."""

    token_ids: list[int]
    stopped: bool


@dataclasses.dataclass
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    n: int
    sampling: Sampling
    key: tuple[Any, ...]
    future: concurrent.futures.Future[list[Generated]]


class Engine:
    """Queues generation requests and serves them in batches from one worker thread.

    Args:
        served: the model, tokenizer and stop ids.
        max_batch_size: rows in one ``model.sample`` call at most.
        batch_wait_s: after the first request of a batch arrives, wait this long for more.

    Example:
        >>> engine = Engine(served, max_batch_size=8)
        >>> engine.start()
        >>> rows = engine.submit([1, 5, 9], max_tokens=16, n=2, sampling=Sampling(0.7)).result()
        >>> engine.stop()
    """

    def __init__(self, served: ServedModel, max_batch_size: int = 8, batch_wait_s: float = 0.005) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.served = served
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._jobs = 0
        self._lock = threading.Lock()
        self._base_seed = secrets.randbits(31)  # unseeded sampling differs from one server run to the next
        self._batches = 0
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT_BATCHES)
        self._max_requests_per_batch = 0

    # Lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kithara-serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Serves the requests submitted before this call, fails any submitted after, and ends the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    # Requests -----------------------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], max_tokens: int, n: int, sampling: Sampling
    ) -> concurrent.futures.Future[list[Generated]]:
        """Queues ``n`` completions of ``prompt_ids``; the future gives them in order."""
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"n must be in [1, {self.max_batch_size}] (max_batch_size), got {n}.")
        if not prompt_ids or max_tokens < 1:
            raise ValueError("Need a non-empty prompt and max_tokens >= 1.")
        if self._thread is None:
            raise RuntimeError("The engine is not running: call start() first.")
        with self._lock:
            self._jobs += 1
            job_id = self._jobs
        future: concurrent.futures.Future[list[Generated]] = concurrent.futures.Future()
        self._queue.put(_Job(list(prompt_ids), max_tokens, n, sampling, sampling.batch_key(job_id), future))
        return future

    def stats(self) -> dict[str, Any]:
        """Counters for ``/stats``: batches run, the most requests one batch held, the decode
        programs compiled so far, and the latest batches' sizes."""
        return {
            "requests": self._jobs,
            "batches": self._batches,
            "max_requests_per_batch": self._max_requests_per_batch,
            "compilations": self.served.model.generate_compilations,
            "recent_batches": list(self._recent),
        }

    # Worker -------------------------------------------------------------------------------

    def _loop(self) -> None:
        pending: list[_Job] = []
        running = True
        while running or pending:
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            running = self._collect(pending) and running
            batch, pending = self._take_batch(pending)
            self._run(batch)
        while not self._queue.empty():  # submitted after stop(): fail rather than hang
            job = self._queue.get_nowait()
            if job is not None:
                job.future.set_exception(RuntimeError("The server is shutting down."))

    def _collect(self, pending: list[_Job]) -> bool:
        """Adds requests arriving within ``batch_wait_s`` (and any already queued); False once stop() was called."""
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            pending.append(job)

    def _take_batch(self, pending: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The oldest request and those after it with its sampling settings, up to
        ``max_batch_size`` rows; and the rest, in arrival order."""
        key = pending[0].key
        batch: list[_Job] = []
        rest: list[_Job] = []
        rows = 0
        for job in pending:
            if job.key == key and rows + job.n <= self.max_batch_size:
                batch.append(job)
                rows += job.n
            else:
                rest.append(job)
        return batch, rest

    def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        sampling = live[0].sampling
        greedy = sampling.temperature == 0
        if greedy:
            seed = 0
        elif sampling.seed is not None:
            seed = sampling.seed & _SEED_MASK
        else:
            seed = (self._base_seed + self._batches) & _SEED_MASK
        prompts = [job.prompt_ids for job in live for _ in range(job.n)]
        started = time.monotonic()
        try:
            tokens, stopped = self.served.model.sample(
                prompts,
                max(job.max_tokens for job in live),
                temperature=sampling.temperature,
                top_k=None if greedy else sampling.top_k,
                top_p=None if greedy else sampling.top_p,
                min_p=None if greedy else sampling.min_p,
                stop_token_ids=self.served.stop_token_ids,
                seed=seed,
            )
        except Exception as error:  # one failed batch fails its requests, never the server
            logger.exception("Generation failed for a batch of %d requests.", len(live))
            for job in live:
                job.future.set_exception(error)
            return
        self._batches += 1
        self._max_requests_per_batch = max(self._max_requests_per_batch, len(live))
        self._recent.append(
            {"requests": len(live), "rows": len(prompts), "seconds": round(time.monotonic() - started, 4)}
        )
        row = 0
        for job in live:
            job.future.set_result([_trim(tokens[row + i], stopped[row + i], job.max_tokens) for i in range(job.n)])
            row += job.n


def _trim(tokens: list[int], stopped: bool, max_tokens: int) -> Generated:
    """A row of a batch that ran to the batch's longest ``max_tokens``, cut to its own; the
    stop token dropped. Tokens do not depend on how long the row may run, so this is what a
    call with the row's own ``max_tokens`` gives."""
    if len(tokens) > max_tokens:
        return Generated(tokens[:max_tokens], False)
    return Generated(tokens[:-1] if stopped else tokens, stopped)
