"""How parameters and batches map onto a device mesh: the one place sharding is declared.

The mesh always has three named axes:

- ``data``: batch is split, parameters are replicated (pure data parallelism);
- ``fsdp``: batch is split *and* parameters are split (ZeRO-3 style);
- ``tensor``: attention heads and MLP columns are split (Megatron-style tensor parallelism).

A strategy only decides the sizes of those axes; a single table of logical axes per variable
(``LOGICAL_RULES``) decides where each parameter dimension goes, so ``"dp"``, ``"fsdp"`` and
``"fsdp_tp"`` share one declaration. Users can prepend their own ``(regex, PartitionSpec)``
rules, matched with ``re.search`` against the variable path (first match wins).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("dp", "fsdp", "fsdp_tp")

# Logical dimension names -> mesh axis. "embed" is the model width, split by FSDP; heads,
# MLP columns and the vocabulary are split by tensor parallelism.
LOGICAL_TO_MESH: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "rank": None,
}

# (regex on variable path, logical axes per dimension). Covers the keras-hub decoder
# families kithara supports (llama3, mistral, qwen2/3 use `self_attention/...`; gemma 1-3
# use `attention/...` with heads first). Unmatched variables fall back to FSDP on their
# largest divisible dimension.
LOGICAL_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"token_embedding/embeddings$", ("vocab", "embed")),
    (r"token_embedding/reverse_embeddings$", ("embed", "vocab")),
    (r"self_attention/(query|key|value)/kernel$", ("embed", "heads", "head_dim")),
    (r"self_attention/(query|key|value)/bias$", ("heads", "head_dim")),
    (r"self_attention/attention_output/kernel$", ("heads", "head_dim", "embed")),
    (r"(^|/)attention/(query|key|value)/kernel$", ("heads", "embed", "head_dim")),
    (r"(^|/)attention/attention_output/kernel$", ("heads", "head_dim", "embed")),
    (r"(feedforward_(intermediate|gate)_dense|ffw_gating(_2)?)/kernel$", ("embed", "mlp")),
    (r"(feedforward_output_dense|ffw_linear)/kernel$", ("mlp", "embed")),
    # Quantized kernels (kithara.models.quantization) are stored as [inputs, outputs] matrices
    # (contracted axes first, flattened): codes and blockwise scales split like the kernel's
    # leading input and output axes.
    (r"self_attention/(query|key|value)/kernel_(quantized|scale|scale_quantized)$", ("embed", "heads")),
    (r"(^|/)attention/(query|key|value)/kernel_(quantized|scale|scale_quantized)$", ("embed", "heads")),
    (r"attention/attention_output/kernel_(quantized|scale|scale_quantized)$", ("heads", "embed")),
    (
        r"(feedforward_(intermediate|gate)_dense|ffw_gating(_2)?)/kernel_(quantized|scale|scale_quantized)$",
        ("embed", "mlp"),
    ),
    (r"(feedforward_output_dense|ffw_linear)/kernel_(quantized|scale|scale_quantized)$", ("mlp", "embed")),
    (r"(scale|bias|gamma|beta)$", ()),  # norms and biases: small, replicated
)

# Blockwise scales of a quantized kernel are split like its codes or not at all (they are small):
# split along another axis, each dequantization would have to reshuffle them.
_FOLLOWS_ITS_CODES = re.compile(r"kernel_scale(_quantized)?$")

UNSHARDED_WARNING_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class ShardingStrategy:
    """How a model is laid out on devices.

    Args:
        name: ``"dp"`` (replicated parameters, batch over all devices), ``"fsdp"``
            (parameters and batch split over all devices) or ``"fsdp_tp"`` (FSDP over
            ``num_devices / tensor_parallel`` devices times tensor parallelism).
        tensor_parallel: size of the ``tensor`` axis; only with ``"fsdp_tp"``.
        rules: extra ``(regex, PartitionSpec)`` pairs tried before the built-in table.
            The spec names mesh axes (``"data"``, ``"fsdp"``, ``"tensor"``).
        devices: the devices to use; all of ``jax.devices()`` by default.

    Example:
        >>> strategy = ShardingStrategy("fsdp_tp", tensor_parallel=2)
        >>> strategy = ShardingStrategy("fsdp", rules=[(r"embeddings$", PartitionSpec()) ])
    """

    name: str = "fsdp"
    tensor_parallel: int = 1
    rules: Sequence[tuple[str, PartitionSpec]] = ()
    devices: Sequence[jax.Device] | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"Unknown sharding strategy {self.name!r}; choose one of {STRATEGIES}.")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}.")
        if self.tensor_parallel > 1 and self.name != "fsdp_tp":
            raise ValueError(f"tensor_parallel={self.tensor_parallel} needs strategy 'fsdp_tp', not {self.name!r}.")
        for pattern, spec in self.rules:
            re.compile(pattern)
            if not isinstance(spec, PartitionSpec):
                raise TypeError(f"Sharding rule {pattern!r} must map to a PartitionSpec, got {spec!r}.")

    def make_mesh(self) -> Mesh:
        """Builds the ``(data, fsdp, tensor)`` mesh for this strategy."""
        devices = list(self.devices) if self.devices is not None else jax.devices()
        n = len(devices)
        if n % self.tensor_parallel:
            raise ValueError(f"tensor_parallel={self.tensor_parallel} does not divide {n} devices.")
        shape = {
            "dp": (n, 1, 1),
            "fsdp": (1, n, 1),
            "fsdp_tp": (1, n // self.tensor_parallel, self.tensor_parallel),
        }[self.name]
        device_array = np.asarray(devices).reshape(shape)
        return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def as_strategy(sharding: str | ShardingStrategy | None) -> ShardingStrategy:
    """Accepts a strategy name, a ``ShardingStrategy`` or ``None`` (FSDP)."""
    if sharding is None:
        return ShardingStrategy()
    if isinstance(sharding, str):
        return ShardingStrategy(sharding)
    if isinstance(sharding, ShardingStrategy):
        return sharding
    raise TypeError(f"sharding must be a strategy name or ShardingStrategy, got {type(sharding).__name__}.")


def _logical_axes(path: str, ndim: int) -> list[str | None] | None:
    """Mesh axes from the logical table; ``None`` when the table says "replicate"."""
    for pattern, logical in LOGICAL_RULES:
        if re.search(pattern, path) and len(logical) <= ndim:
            if not logical:
                return None
            return [LOGICAL_TO_MESH[name] if name else None for name in logical] + [None] * (ndim - len(logical))
    return [None] * ndim


def param_spec(strategy: ShardingStrategy, mesh: Mesh, path: str, shape: tuple[int, ...]) -> PartitionSpec:
    """The PartitionSpec of one variable: user rules, then the logical table.

    A mesh axis that does not divide its dimension is dropped. If no dimension ends up on
    ``fsdp``, the largest free dimension that divides evenly takes it, so FSDP also covers
    variables the table does not name (LoRA factors, new layer types).
    """
    for pattern, spec in strategy.rules:
        if re.search(pattern, path):
            return spec
    axes = _logical_axes(path, len(shape))
    if axes is None:
        return PartitionSpec()
    # Drop axes of size 1 (nothing to split) and axes that do not divide their dimension.
    axes = [
        a if a and mesh.shape[a] > 1 and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape, strict=True)
    ]
    if "fsdp" not in axes and mesh.shape["fsdp"] > 1 and not _FOLLOWS_ITS_CODES.search(path):
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if axes[i] is None and shape[i] % mesh.shape["fsdp"] == 0:
                axes[i] = "fsdp"
                break
    return PartitionSpec(*axes)


def param_shardings(
    strategy: ShardingStrategy, mesh: Mesh, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, NamedSharding]:
    """Shardings for a ``{path: shape}`` mapping; warns about large unsharded variables under FSDP."""
    shardings = {}
    for path, shape in shapes.items():
        spec = param_spec(strategy, mesh, path, tuple(shape))
        if mesh.shape["fsdp"] > 1 and "fsdp" not in _flat_axes(spec) and math.prod(shape) >= UNSHARDED_WARNING_ELEMENTS:
            logger.warning(
                "Variable %s %s is not sharded over the fsdp axis (size %d): no dimension divides "
                "evenly; it is replicated on every device. Pad the dimension or add a rule.",
                path,
                tuple(shape),
                mesh.shape["fsdp"],
            )
        shardings[path] = NamedSharding(mesh, spec)
    return shardings


def _flat_axes(spec: PartitionSpec) -> set[str]:
    axes: set[str] = set()
    for entry in spec:
        if isinstance(entry, tuple):
            axes.update(entry)
        elif entry is not None:
            axes.add(entry)
    return axes


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a ``[*leading, batch, ...]`` array: batch over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_arrays(arrays: Mapping[str, np.ndarray], mesh: Mesh, leading_dims: int = 0) -> dict[str, jax.Array]:
    """Full host arrays that every process holds identically (not a per-process slice, as
    ``shard_batch`` takes) as global arrays split over the batch axes."""
    sharding = batch_sharding(mesh, leading_dims)
    return {k: jax.make_array_from_callback(v.shape, sharding, v.__getitem__) for k, v in arrays.items()}


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, leading_dims: int = 0) -> dict[str, jax.Array]:
    """Turns this process's slice of a batch into global arrays sharded over the batch axes.

    Every process passes the rows it read itself; the global batch is their concatenation in
    process order (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh, leading_dims)
    if jax.process_count() == 1:  # one batched transfer: the local batch is the global one
        return jax.device_put({k: np.asarray(v) for k, v in local_batch.items()}, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
