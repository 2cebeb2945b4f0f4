"""Numeric precision policies: variable dtype and compute dtype."""

from __future__ import annotations

PRECISIONS = {
    # name: keras dtype policy (variable dtype, compute dtype)
    "float32": "float32",  # fp32 weights and compute
    "bfloat16": "bfloat16",  # bf16 weights and compute: half the memory, least exact
    "mixed_bfloat16": "mixed_bfloat16",  # fp32 weights, bf16 compute
    # fp32 weights, fp16 compute: the trainer adds dynamic loss scaling (kithara.trainer.loss_scale),
    # since float16's 5 exponent bits flush small gradients to zero and overflow past 65504.
    "mixed_float16": "mixed_float16",
}

# The precisions whose compute dtype is float16: training them needs loss scaling.
FLOAT16_POLICIES = ("mixed_float16",)


def keras_policy(precision: str) -> str:
    """Maps a kithara precision name to the keras dtype policy given to the backbone."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}.")
    return PRECISIONS[precision]
