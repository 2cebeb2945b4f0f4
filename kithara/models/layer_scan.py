"""Scan over identical decoder layers (placeholder: being written)."""

from __future__ import annotations

from typing import Any

import jax


def run(run: Any, block: Any, hidden: jax.Array) -> Any:
    """The block unscanned (placeholder)."""
    return run.run_one(lambda h: block.run(h), hidden)
