"""Numeric precision policies: variable dtype and compute dtype."""

from __future__ import annotations

PRECISIONS = {
    # name: keras dtype policy (variable dtype, compute dtype)
    "float32": "float32",  # fp32 weights and compute
    "bfloat16": "bfloat16",  # bf16 weights and compute: half the memory, least exact
    "mixed_bfloat16": "mixed_bfloat16",  # fp32 weights, bf16 compute
}


def keras_policy(precision: str) -> str:
    """Maps a kithara precision name to the keras dtype policy given to the backbone."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}.")
    return PRECISIONS[precision]
