"""Rematerialisation policies for decoder blocks (placeholder: being written)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def checkpointed(fn: Callable[[jax.Array], Any], policy: str) -> Callable[[jax.Array], Any]:
    """``fn`` under ``jax.checkpoint`` with the named policy (``"none"``: ``fn`` itself)."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn)
