"""The machine's peak matmul throughput, measured now: the denominator of every MFU figure.

A large jitted float32 matmul (the precision every benchmark trains in, at JAX's default
matmul precision, as the training steps use) on device 0, timed several times.
``peak_flops`` is the best repetition (the machine's limit, least disturbed by other
work); the median is kept to show how noisy the machine was. On an accelerator the
matrices are 8192 x 8192 (a 2048 one finishes in tens of microseconds there, so launch
latency would dominate); on CPU 2048 x 2048.
"""

from __future__ import annotations

import statistics
import time


def default_size(platform: str) -> int:
    return 2048 if platform == "cpu" else 8192


def measure_peak(size: int | None = None, repeats: int = 7) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    size = size or default_size(jax.default_backend())
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
