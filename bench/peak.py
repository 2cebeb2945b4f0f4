"""The machine's peak matmul throughput, measured now: the denominator of every MFU figure.

A large jitted float32 matmul (the precision every benchmark trains in) on device 0, timed
several times. ``peak_flops`` is the best repetition (the machine's limit, least disturbed
by other work); the median is kept to show how noisy the machine was.
"""

from __future__ import annotations

import statistics
import time


def measure_peak(size: int = 2048, repeats: int = 7) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2.0 * size**3
    return {
        "matmul_size": size,
        "peak_flops": flops / min(times),
        "median_flops": flops / statistics.median(times),
    }
