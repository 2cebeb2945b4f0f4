"""Peak matmul throughput of a mesh, for model-FLOPs utilisation."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Dense bf16 peak per chip, from vendor data sheets (no sparsity).
PEAK_FLOPS_PER_DEVICE = {
    "TPU v6 lite": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "B200": 2250e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def mesh_peak_flops(mesh: Mesh, peak_flops_per_device: float | None = None) -> float:
    """Peak FLOP/s of all devices of ``mesh``: the override, the data-sheet figure for
    known accelerators, or else (CPUs) a matmul measured now on the whole mesh."""
    if peak_flops_per_device is not None:
        return peak_flops_per_device * mesh.devices.size
    kind = mesh.devices.flat[0].device_kind
    for name, flops in PEAK_FLOPS_PER_DEVICE.items():
        if name.lower() in kind.lower():
            return flops * mesh.devices.size
    return measured_matmul_flops(mesh)


def measured_matmul_flops(mesh: Mesh, size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of float32 matmuls run on every device of ``mesh`` at once."""
    return _measure(tuple(mesh.devices.flat), size, repeats)


@functools.cache
def _measure(devices: tuple[jax.Device, ...], size: int, repeats: int) -> float:
    mesh = Mesh(np.asarray(devices), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    a = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32), sharding)
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return 2.0 * len(devices) * size**3 * repeats / seconds
