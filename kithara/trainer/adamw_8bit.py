"""8-bit Adam: bitsandbytes' block-wise 8-bit Adam (``bnb.optim.Adam8bit`` / ``AdamW8bit``,
non-paged) as an optax transformation.

Each moment of a parameter with at least ``min_8bit_size`` elements is stored as one uint8
code per element (the parameter's shape, so it shards like the parameter) and one float32
scale (``absmax``) per block of ``block_size`` consecutive elements of the flattened tensor.
The first moment uses bitsandbytes' signed dynamic map, the second its unsigned one
(``bitsandbytes.functional.create_dynamic_map``, 256 values each, reproduced here bit for
bit). Each step dequantizes, does bitsandbytes' float32 Adam update and requantizes every
value to the nearest code (ties to the lower one). Smaller parameters keep float32 moments,
as bitsandbytes does.

bitsandbytes 0.50 rounds in three ways. Its reference quantizer (the PyTorch ``default``
backend: ``torch.bucketize`` on the midpoints between codes) rounds as here; its CPU
optimizer requantizing with it agrees with this one over ten steps in every code, and in the
parameters to float32 rounding (tests/test_adamw_8bit.py). Its CPU kernel for
``quantize_blockwise`` first rounds each scaled value to one of 65536 evenly spaced points in
[-1, 1] (3e-5 apart), so it picks another code next to midpoints, and below ~1e-4 of the
block's largest value, where codes lie closer together than those points. Its CUDA kernel
rounds to the nearest code too, but moves a first-moment code whose sign flipped to its
neighbour, and applies weight decay after the update, ``(p + update) * (1 - lr * wd)`` where
its CPU path (and this one) has ``p * (1 - lr * wd) + update``: a difference of order
``lr**2 * wd``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

BLOCK_SIZE = 256  # bitsandbytes' block for its 8-bit optimizers
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 state


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU bit for bit: each
    point counted from the nearer end with one float32 fused multiply-add. The float64
    product of two float32 numbers is exact, so only the sum rounds (to float64, then float32)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps)
    low = i < steps // 2
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (steps - 1 - i)
    return np.where(low, from_start, from_end).astype(np.float32)


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (``create_dynamic_map(signed)``, 7 exponent bits,
    8 bits in all): 256 sorted float32 values in [-1, 1] (signed) or [0, 1], with a linear
    fraction inside each power of ten from 1e-7 to 1."""
    values = [np.asarray([0.0, 1.0], np.float32)]
    for i in range(7):
        edges = _linspace_float32(0.1, 1.0, 2 ** (i if signed else i + 1) + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += [scaled, -scaled] if signed else [scaled]
    code = np.sort(np.concatenate(values))
    if code.shape != (256,):
        raise AssertionError(f"the dynamic map has {code.shape[0]} values, not 256")
    return code


SIGNED_MAP = dynamic_map(signed=True)  # the first moment's
UNSIGNED_MAP = dynamic_map(signed=False)  # the second moment's


class QuantizedMoment(NamedTuple):
    codes: jax.Array  # uint8, the parameter's shape: an index into the moment's map per element
    absmax: jax.Array  # float32, absmax_shape(parameter shape): each block's largest |value|


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # int32 steps taken (optax's name; shadows tuple.count)
    mu: Any  # per parameter: a QuantizedMoment, or a float32 array below min_8bit_size
    nu: Any


def absmax_shape(shape: tuple[int, ...], block_size: int = BLOCK_SIZE) -> tuple[int, ...]:
    """The shape of a tensor's block scales. The blocks are bitsandbytes' (``block_size``
    consecutive elements of the flattened tensor); when the trailing axes from some axis ``k``
    on hold whole blocks, the scales are laid out ``shape[:k] + (blocks per row,)`` (``k`` as
    large as possible) so they shard with the parameter's leading axes; otherwise flat,
    ``(ceil(size / block_size),)``, with the last block padded."""
    for k in range(len(shape) - 1, -1, -1):
        trailing = math.prod(shape[k:])
        if trailing % block_size == 0:
            return (*shape[:k], trailing // block_size)
    return (-(-math.prod(shape) // block_size),)


def _blocks(x: jax.Array, block_size: int, fill: int | float = 0) -> jax.Array:
    """``x`` as ``absmax_shape + (block_size,)``, padded with ``fill`` if the blocks do not divide it."""
    shape = absmax_shape(x.shape, block_size)
    padding = math.prod(shape) * block_size - x.size
    if padding:
        x = jnp.pad(x.reshape(-1), (0, padding), constant_values=fill)
    return x.reshape(*shape, block_size)


def _unblock(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    size = math.prod(shape)
    return blocks.reshape(shape) if blocks.size == size else blocks.reshape(-1)[:size].reshape(shape)


def _quantize_blocks(blocks: jax.Array, code: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(uint8 codes, absmax) of float32 ``[..., block_size]`` blocks."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # bitsandbytes multiplies by the reciprocal; an all-zero block quantizes to the code of 0.
    inverse = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(blocks * inverse[..., None], -1.0, 1.0)
    return _nearest(scaled, code).astype(jnp.uint8), absmax


def _nearest(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the value of the sorted 256-value ``code`` nearest to each ``x``, a tie going
    to the lower one: the number of midpoints between neighbouring codes that lie below ``x``
    (``torch.bucketize`` on the midpoints, as bitsandbytes' reference quantizer), found by a
    branchless 8-step binary search that XLA fuses into one elementwise loop (``jnp.searchsorted``
    gives the same indices, 3-4x slower on CPU)."""
    midpoints = jnp.asarray((code[:-1] + code[1:]) / np.float32(2))
    index = jnp.zeros(x.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):  # index is a multiple of 2*step: probes stay in [0, 254]
        probe = midpoints.at[index + (step - 1)].get(mode="clip")
        index = jnp.where(probe < x, index + step, index)
    return index


def _dequantized_blocks(moment: QuantizedMoment, code: np.ndarray, block_size: int) -> jax.Array:
    """``code[codes] * absmax`` as float32 blocks; padding holds the code of 0, so it reads 0."""
    codes = _blocks(moment.codes, block_size, fill=int(np.flatnonzero(code == 0)[0]))
    return jnp.asarray(code).at[codes.astype(jnp.int32)].get(mode="clip") * moment.absmax[..., None]


def quantize(x: jax.Array, code: np.ndarray, block_size: int = BLOCK_SIZE) -> QuantizedMoment:
    """Block-wise quantization to the nearest value of ``code`` (ties to the lower one): each
    block is divided by its largest magnitude, as bitsandbytes' ``quantize_blockwise``."""
    codes, absmax = _quantize_blocks(_blocks(x.astype(jnp.float32), block_size), code)
    return QuantizedMoment(_unblock(codes, x.shape), absmax)


def dequantize(moment: QuantizedMoment, code: np.ndarray, block_size: int = BLOCK_SIZE) -> jax.Array:
    """``code[codes] * absmax`` of each element's block, in float32."""
    return _unblock(_dequantized_blocks(moment, code, block_size), moment.codes.shape)


def _bias_correction(decay: float, count: jax.Array) -> jax.Array:
    """``1 - decay**count`` to float32 precision: ``-expm1(count * log(decay))``, where optax's
    float32 ``1 - decay**count`` loses digits (1 - 0.999 is off by 1e-5 relative)."""
    log_decay = math.log(decay) if decay > 0 else -math.inf
    return -jnp.expm1(count.astype(jnp.float32) * np.float32(log_decay))


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = BLOCK_SIZE,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
    """Adam's rescaling with 8-bit block-wise moments, as bitsandbytes' ``Adam8bit``.

    The update is bitsandbytes' ``(m / (1 - b1**t)) / (sqrt(v) / sqrt(1 - b2**t) + eps)``
    (epsilon added after the bias correction, as optax does). Chain it with
    ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate`` for bitsandbytes'
    ``AdamW8bit``, as ``kithara.optimizers.adamw(lr, state_dtype="int8")`` does.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to the bias-corrected root of the second moment.
        block_size: elements per quantization block (bitsandbytes: 256).
        min_8bit_size: parameters with fewer elements keep float32 moments (bitsandbytes: 4096).

    Example:
        >>> tx = optax.chain(scale_by_adam_8bit(), optax.scale_by_learning_rate(1e-3))
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    if block_size < 1 or min_8bit_size < 0:
        raise ValueError(f"block_size must be >= 1 and min_8bit_size >= 0, got {block_size} and {min_8bit_size}.")

    def quantized(param: jax.Array) -> bool:
        return param.size >= min_8bit_size

    def init(params: optax.Params) -> ScaleByAdam8bitState:
        def zeros(param: jax.Array) -> QuantizedMoment | jax.Array:
            if not quantized(param):
                return jnp.zeros(param.shape, jnp.float32)
            # bitsandbytes' initial state: code 0 with a zero scale, i.e. all moments 0.
            absmax = jnp.zeros(absmax_shape(param.shape, block_size), jnp.float32)
            return QuantizedMoment(jnp.zeros(param.shape, jnp.uint8), absmax)

        mu = jax.tree.map(zeros, params)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, jax.tree.map(zeros, params))

    def update(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params
        count = optax.safe_increment(state.count)
        correction1 = _bias_correction(b1, count)
        root_correction2 = jnp.sqrt(_bias_correction(b2, count))

        def step(g: jax.Array, m: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            """bitsandbytes' float32 Adam, in its order of operations and with its float32 constants.
            torch's CPU kernels round ``m * b1`` and add ``g * (1 - b1)`` to it in one fused
            multiply-add (``v``: ``((1 - b2) * g) * g``); XLA's CPU backend also fuses one product
            of each sum, but which one depends on the code around it, so a moment can differ
            from bitsandbytes' in its last bit (tests/test_adamw_8bit.py)."""
            m = g * np.float32(1.0 - b1) + m * np.float32(b1)
            v = np.float32(1.0 - b2) * g * g + v * np.float32(b2)
            return (m / correction1) / (jnp.sqrt(v) / root_correction2 + np.float32(eps)), m, v

        def one(grad: jax.Array, mu: QuantizedMoment | jax.Array, nu: QuantizedMoment | jax.Array) -> tuple:
            if not (isinstance(mu, QuantizedMoment) and isinstance(nu, QuantizedMoment)):  # float32 moments
                direction, m, v = step(grad.astype(jnp.float32), jnp.asarray(mu), jnp.asarray(nu))
                return direction.astype(grad.dtype), m, v
            # All in [..., block_size] blocks: the same program (and the same fused multiply-adds
            # XLA makes of it) whether or not the parameter is sharded.
            g = _blocks(grad.astype(jnp.float32), block_size)
            m, v = _dequantized_blocks(mu, SIGNED_MAP, block_size), _dequantized_blocks(nu, UNSIGNED_MAP, block_size)
            direction, m, v = step(g, m, v)
            m_codes, m_absmax = _quantize_blocks(m, SIGNED_MAP)
            v_codes, v_absmax = _quantize_blocks(v, UNSIGNED_MAP)
            new_mu = QuantizedMoment(_unblock(m_codes, grad.shape), m_absmax)
            new_nu = QuantizedMoment(_unblock(v_codes, grad.shape), v_absmax)
            return _unblock(direction, grad.shape).astype(grad.dtype), new_mu, new_nu

        leaves, treedef = jax.tree.flatten(updates)
        is_moment = lambda x: isinstance(x, QuantizedMoment)  # noqa: E731
        mus, nus = (jax.tree.leaves(tree, is_leaf=is_moment) for tree in (state.mu, state.nu))
        results = [one(*leaf) for leaf in zip(leaves, mus, nus, strict=True)]
        directions, new_mus, new_nus = ([r[i] for r in results] for i in range(3))
        new_state = ScaleByAdam8bitState(
            count, jax.tree.unflatten(treedef, new_mus), jax.tree.unflatten(treedef, new_nus)
        )
        return jax.tree.unflatten(treedef, directions), new_state

    return optax.GradientTransformation(init, update)


def absmax_spec(param_spec: PartitionSpec, param_shape: tuple[int, ...], block_size: int, mesh: Mesh) -> PartitionSpec:
    """Where a parameter's block scales (``absmax_shape``) live: with the parameter's leading
    axes, and split along the blocks' axis too when the parameter is split only on the first
    axis those blocks span and each device's share holds whole blocks; else replicated there."""
    scales = absmax_shape(param_shape, block_size)
    k = len(scales) - 1  # the parameter axis the blocks' axis starts at
    if math.prod(scales) * block_size != math.prod(param_shape):  # padded flat blocks
        return PartitionSpec()
    entries = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    first, rest = entries[k], entries[k + 1 :]
    axes = (first,) if isinstance(first, str) else tuple(first or ())
    devices = math.prod(mesh.shape[a] for a in axes)
    along_blocks = first if axes and not any(rest) and scales[-1] % devices == 0 else None
    return PartitionSpec(*entries[:k], along_blocks)
