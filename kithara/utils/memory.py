"""empty_cache: drop what JAX and Python keep around between runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

import jax

logger = logging.getLogger(__name__)


def empty_cache() -> bool:
    """Frees what is held only by caches: ``jax.clear_caches()`` (compiled programs and their
    traces; the next call of a jitted function compiles again), then ``gc.collect()`` (device
    arrays kept alive only by reference cycles are freed with their Python objects), then
    glibc's ``malloc_trim(0)`` where the C library has it (host memory freed by Python or XLA is
    handed back to the operating system).

    It cannot free arrays something still refers to (a trainer's ``train_state``, a model's
    variables): drop those references first. Returns whether ``malloc_trim`` ran (``False`` on
    macOS or musl, where there is none). The counterpart of TRL's ``empty_cache`` (which calls
    ``torch.cuda.empty_cache`` and ``gc.collect``).

    Example:
        >>> del trainer
        >>> empty_cache()
        True
    """
    jax.clear_caches()
    gc.collect()
    return _malloc_trim()


def _malloc_trim() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
