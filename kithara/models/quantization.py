"""A frozen base stored quantized (QLoRA): NF4 or int8 projection kernels with blockwise scales.

``quantize_backbone`` turns the decoder blocks' projection layers (``query`` ... ``down``) of a
keras-hub backbone into ``QuantizedDense`` / ``QuantizedEinsumDense``: the float kernel is
dropped and the layer holds, as ordinary non-trainable keras variables (so they are sharded,
checkpointed, scanned and offloaded like any other):

- ``kernel_quantized``: the codes of the kernel laid out as a matrix ``[inputs, outputs]`` (the
  contracted axes first, flattened), NF4 packed two per byte along the inputs (``uint8``
  ``[inputs / 2, outputs]``) or ``int8`` ``[inputs, outputs]``;
- ``kernel_scale``: one float32 scale per block of ``block_size`` consecutive inputs of each
  output (``[inputs / block_size, outputs]``), or per output channel (``[1, outputs]``); with
  double quantization ``kernel_scale_quantized`` (int8, same shape) with ``kernel_scale_scale``
  and ``kernel_scale_mean`` (float32 ``[1, outputs]``) instead.

The blocks are bitsandbytes': 64 consecutive inputs of one output of the Hugging Face
``[out, in]`` weight, so NF4 codes and scales equal ``bitsandbytes.functional.quantize_4bit``'s.
The numerics are google's ``qwix`` (``qwix.quantize`` / ``qwix.dequantize``). Inside the
jitted step each layer dequantizes its own kernel right before its matmul, under
``jax.checkpoint`` with nothing saved: the backward pass keeps the codes (already resident),
never a full-precision copy of a kernel, and recomputes the dequantization. LoRA adapters
(``enable_lora``) run beside it as ``x A B`` in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import qwix

from kithara.models.families import PROJECTIONS, layer_layout

METHODS = ("nf4", "int8")
_DEFAULT_BLOCK = {"nf4": 64, "int8": "channel"}
_CHUNK_ELEMENTS = 1 << 22  # columns quantized at a time on load: bounds qwix's [n, 16] NF4 search


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """How the frozen base's projection kernels are stored.

    Args:
        method: ``"nf4"`` (4-bit NormalFloat, QLoRA's) or ``"int8"`` (symmetric 8-bit).
        block_size: inputs per scale: an even int dividing every projection's input size, or
            ``"channel"`` for one scale per output channel; ``None`` takes the method's default
            (NF4: 64, as bitsandbytes; int8: ``"channel"``, as bitsandbytes' LLM.int8 rows).
        double_quant: store the scales in int8 too (one float32 scale and mean per output
            column), bitsandbytes' ``bnb_4bit_use_double_quant``: about 0.37 bits per weight less.
        targets: the projections to quantize (``query`` ... ``down``, or ``("all",)``);
            embeddings, the LM head and norms always stay in float, as with bitsandbytes.

    Example:
        >>> QuantizationConfig("nf4", double_quant=True)
    """

    method: str = "nf4"
    block_size: int | str | None = None
    double_quant: bool = False
    targets: Sequence[str] = ("all",)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown quantization method {self.method!r}; choose one of {METHODS}.")
        block = _DEFAULT_BLOCK[self.method] if self.block_size is None else self.block_size
        if block != "channel" and (isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2):
            raise ValueError(f"block_size must be an even int >= 2 or 'channel', got {self.block_size!r}.")
        if self.double_quant and block == "channel":
            raise ValueError("double_quant needs blockwise scales: set block_size to an int (64, say).")
        targets = tuple(self.targets)
        if targets == ("all",):
            targets = PROJECTIONS
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown or not targets:
            raise ValueError(f"Unknown quantization targets {unknown or targets}; choose from {PROJECTIONS}.")
        object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "targets", targets)

    @property
    def block(self) -> int | None:
        """Inputs per scale; ``None`` for one scale per output channel."""
        return self.block_size if isinstance(self.block_size, int) else None

    @classmethod
    def coerce(cls, value: str | QuantizationConfig | Any) -> QuantizationConfig:
        """A config from a method name, a config, or a ``transformers.BitsAndBytesConfig``."""
        if isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str):
            return cls(value)
        if hasattr(value, "load_in_4bit") or isinstance(value, Mapping):
            return cls.from_bnb(value)
        raise TypeError(
            f"quantization must be 'nf4', 'int8', a kithara QuantizationConfig or a BitsAndBytesConfig, got {value!r}."
        )

    @classmethod
    def from_bnb(cls, config: Any) -> QuantizationConfig:
        """The same storage as a ``transformers.BitsAndBytesConfig`` (or its dict): ``load_in_4bit``
        with ``bnb_4bit_quant_type="nf4"`` (and ``bnb_4bit_use_double_quant``) -> NF4, block 64;
        ``load_in_8bit`` -> int8 per output channel (weights only: activations stay in the compute
        dtype, so LLM.int8's outlier threshold has nothing to split). Settings kithara cannot
        reproduce (FP4, skipped modules, CPU offload) are refused."""
        get = config.get if isinstance(config, Mapping) else functools.partial(getattr, config)
        four, eight = bool(get("load_in_4bit", False)), bool(get("load_in_8bit", False))
        if four == eight:
            raise ValueError("A BitsAndBytesConfig must set exactly one of load_in_4bit and load_in_8bit.")
        refused = {
            "bnb_4bit_quant_type": get("bnb_4bit_quant_type", "nf4") if four else "nf4",
            "llm_int8_skip_modules": get("llm_int8_skip_modules", None),
            "llm_int8_enable_fp32_cpu_offload": get("llm_int8_enable_fp32_cpu_offload", False),
        }
        bad = {k: v for k, v in refused.items() if v not in ("nf4", None, False)}
        if bad:
            raise ValueError(f"BitsAndBytesConfig sets {bad}, which kithara's quantization does not support.")
        if four:
            return cls("nf4", double_quant=bool(get("bnb_4bit_use_double_quant", False)))
        return cls("int8")


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How one layer's kernel maps to the ``[inputs, outputs]`` matrix its codes are stored as."""

    path: str  # the float kernel's path, as Hugging Face conversion tables name it
    shape: tuple[int, ...]  # the kernel's keras shape
    perm: tuple[int, ...]  # kernel axes, contracted (input) ones first
    equation: str  # the layer's einsum with the kernel in ``perm`` order
    inputs: int
    outputs: int

    @property
    def size(self) -> int:
        return self.inputs * self.outputs


class KernelStub:
    """What a quantized layer shows as its kernel to code that names or sizes kernels (keras'
    ``enable_lora``, the Hugging Face conversion tables): path, shape and dtype, no values."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: str) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self.trainable = False


class _Quantized:
    """The call of a projection whose kernel is stored quantized."""

    _layout: KernelLayout
    _quantization: QuantizationConfig

    @property
    def kernel(self) -> KernelStub:
        return self._kernel  # type: ignore[attr-defined]

    def call(self, inputs: Any, training: Any = None) -> Any:
        layout, config = self._layout, self._quantization
        storage = {name: _read(getattr(self, name)) for name in _storage_names(config)}
        x = _frozen_matmul(layout, config, inputs, storage)
        if self.lora_enabled:  # type: ignore[attr-defined]
            # keras' own quantized layers' LoRA: A has the kernel's shape but rank for its last
            # axis (the output's last), so the layer's equation applies to it unchanged.
            x_subs, k_subs, out_subs = _equation(self)
            a = _read(self.lora_kernel_a)  # type: ignore[attr-defined]
            lora_x = jnp.einsum(f"{x_subs},{k_subs}->{out_subs}", inputs, a)
            lora_x = keras.ops.matmul(lora_x, self.lora_kernel_b)  # type: ignore[attr-defined]
            x = x + (self.lora_alpha / self.lora_rank) * lora_x.astype(x.dtype)  # type: ignore[attr-defined]
        if self.bias is not None:  # type: ignore[attr-defined]
            x = keras.ops.add(x, self.bias)  # type: ignore[attr-defined]
        if self.activation is not None:  # type: ignore[attr-defined]
            x = self.activation(x)  # type: ignore[attr-defined]
        return x


class QuantizedDense(_Quantized, keras.layers.Dense):
    """A ``keras.layers.Dense`` whose frozen kernel is stored quantized (see the module doc)."""


class QuantizedEinsumDense(_Quantized, keras.layers.EinsumDense):
    """A ``keras.layers.EinsumDense`` whose frozen kernel is stored quantized (see the module doc)."""


def _read(variable: Any) -> Any:
    """A variable's value inside the layer call (autocast to the compute dtype for floats)."""
    return keras.ops.convert_to_tensor(variable)


def _equation(layer: Any) -> tuple[str, str, str]:
    """(inputs, kernel, output) subscripts of the layer's einsum."""
    if isinstance(layer, keras.layers.EinsumDense):
        lhs, out = layer.equation.split("->")
        x, k = lhs.split(",")
        return x, k, out
    return "...i", "io", "...o"


def layout_of(layer: Any, path: str, shape: tuple[int, ...]) -> KernelLayout:
    x, k, out = _equation(layer)
    contracted = [i for i, c in enumerate(k) if c in x and c not in out]
    free = [i for i in range(len(k)) if i not in contracted]
    perm = (*contracted, *free)
    equation = f"{x},{''.join(k[i] for i in perm)}->{out}"
    return KernelLayout(
        path, shape, perm, equation, math.prod(shape[i] for i in contracted), math.prod(shape[i] for i in free)
    )


def _storage_names(config: QuantizationConfig) -> tuple[str, ...]:
    if config.double_quant:
        return ("kernel_quantized", "kernel_scale_quantized", "kernel_scale_scale", "kernel_scale_mean")
    return ("kernel_quantized", "kernel_scale")


def _storage_shapes(layout: KernelLayout, config: QuantizationConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    inputs, outputs = layout.inputs, layout.outputs
    blocks = 1 if config.block is None else inputs // config.block
    codes: tuple[tuple[int, ...], str] = (
        ((inputs // 2, outputs), "uint8") if config.method == "nf4" else ((inputs, outputs), "int8")
    )
    shapes = {"kernel_quantized": codes}
    if config.double_quant:
        shapes.update(
            kernel_scale_quantized=((blocks, outputs), "int8"),
            kernel_scale_scale=((1, outputs), "float32"),
            kernel_scale_mean=((1, outputs), "float32"),
        )
    else:
        shapes["kernel_scale"] = ((blocks, outputs), "float32")
    return shapes


def _check_divisible(layout: KernelLayout, config: QuantizationConfig) -> None:
    need = config.block or 2
    if layout.inputs % need:
        raise ValueError(
            f"{layout.path}: its {layout.inputs} inputs do not split into blocks of {need}; pick a block_size "
            f"that divides the input size of every quantized projection (or 'channel' for int8)."
        )


def _tiled(config: QuantizationConfig) -> dict[int, int]:
    return {} if config.block is None else {0: config.block}


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_matrix(matrix: jax.Array, config: QuantizationConfig) -> dict[str, jax.Array]:
    """The stored arrays of one float32 ``[inputs, outputs]`` matrix."""
    qtype = "nf4" if config.method == "nf4" else jnp.int8
    q = qwix.quantize(matrix, qtype, channelwise_axes=(1,), tiled_axes=_tiled(config))
    codes = q.qvalue.astype(jnp.uint8 if config.method == "nf4" else jnp.int8)
    if config.method == "nf4":
        codes = (codes[0::2] << 4) | codes[1::2]
    out = {"kernel_quantized": codes}
    scale = q.scale.astype(jnp.float32)
    if config.double_quant:
        mean = scale.mean(axis=0, keepdims=True)
        sq = qwix.quantize(scale - mean, jnp.int8, channelwise_axes=(1,))
        out.update(kernel_scale_quantized=sq.qvalue, kernel_scale_scale=sq.scale, kernel_scale_mean=mean)
    else:
        out["kernel_scale"] = scale
    return out


def quantize_matrix(matrix: np.ndarray, config: QuantizationConfig) -> dict[str, np.ndarray]:
    """``_quantize_matrix`` a bounded number of columns at a time (qwix's NF4 search holds 16
    floats per element): host memory stays about one float32 tensor."""
    step = max(1, _CHUNK_ELEMENTS // matrix.shape[0])
    parts = [
        jax.device_get(_quantize_matrix(jnp.asarray(matrix[:, i : i + step], jnp.float32), config))
        for i in range(0, matrix.shape[1], step)
    ]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def dequantize_matrix(storage: Mapping[str, Any], layout: KernelLayout, config: QuantizationConfig) -> jax.Array:
    """The float32 ``[inputs, outputs]`` matrix of the stored arrays (jnp or numpy)."""
    codes = jnp.asarray(storage["kernel_quantized"])
    if config.double_quant:
        sq = qwix.QArray(jnp.asarray(storage["kernel_scale_quantized"]), jnp.asarray(storage["kernel_scale_scale"]))
        scale = qwix.dequantize(sq) + jnp.asarray(storage["kernel_scale_mean"])
    else:
        scale = jnp.asarray(storage["kernel_scale"])
    if config.method == "nf4":
        codes = jnp.stack([codes >> 4, codes & 15], axis=1).reshape(layout.inputs, layout.outputs)
        q = qwix.QArray(codes.astype(jnp.uint4), scale.astype(jnp.float32), qtype="nf4")
    else:
        q = qwix.QArray(codes, scale.astype(jnp.float32))
    return qwix.dequantize(q)


def _frozen_matmul(layout: KernelLayout, config: QuantizationConfig, x: jax.Array, storage: dict[str, Any]) -> Any:
    """``einsum(x, kernel)`` from the stored kernel, which is dequantized here and again in the
    backward pass (nothing of it is saved: only ``x`` and the codes, which stay resident)."""

    def run(x: jax.Array, storage: dict[str, Any]) -> jax.Array:
        kernel = dequantize_matrix(jax.lax.stop_gradient(storage), layout, config).astype(x.dtype)
        return jnp.einsum(layout.equation, x, kernel.reshape([layout.shape[i] for i in layout.perm]))

    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(x, storage)


def target_layers(backbone: keras.Model, config: QuantizationConfig) -> Iterator[Any]:
    """The float projection layers of the decoder blocks that ``config`` quantizes."""
    layers = list(backbone._flatten_layers(include_self=False))
    names = layer_layout({layer.name for layer in layers})
    wanted = {names[t] for t in config.targets}
    for layer in layers:
        projection = isinstance(layer, keras.layers.Dense | keras.layers.EinsumDense)
        if layer.name in wanted and projection and not isinstance(layer, _Quantized):
            yield layer


def quantize_backbone(
    backbone: keras.Model, config: QuantizationConfig, *, values: Mapping[str, np.ndarray] | None = None
) -> int:
    """Stores ``backbone``'s target projections quantized; returns how many.

    Each kernel's float value is read from the layer (``values=None``) and quantized; a backbone
    built inside ``keras_variables.unallocated()`` instead gets zero codes, to be filled with
    ``set_kernel`` tensor by tensor (``hf.load_causal_lm`` does), so the float model never
    exists in host memory at once. Refuses layers that already have LoRA adapters (quantize
    first, then add adapters) or a kernel constraint.
    """
    from kithara.models.keras_variables import is_allocated

    count = 0
    for layer in list(target_layers(backbone, config)):
        if getattr(layer, "lora_enabled", False):
            raise ValueError(f"{layer.path} already has LoRA adapters: quantize the base before enabling LoRA.")
        float_kernel = layer._kernel
        path, shape, dtype = float_kernel.path, tuple(float_kernel.shape), float_kernel.dtype
        layout = layout_of(layer, path, shape)
        _check_divisible(layout, config)
        value = np.asarray(float_kernel.value, np.float32) if is_allocated(float_kernel) else None
        layer._tracker.unlock()
        layer._untrack_variable(float_kernel)  # (not `del`: keras runs gc.collect() on each, 0.3 s a layer)
        layer.__class__ = QuantizedEinsumDense if isinstance(layer, keras.layers.EinsumDense) else QuantizedDense
        layer._layout, layer._quantization = layout, config
        layer._kernel = KernelStub(path, shape, dtype)
        for name, (storage_shape, storage_dtype) in _storage_shapes(layout, config).items():
            variable = layer.add_weight(
                name=name,
                shape=storage_shape,
                initializer="zeros",
                dtype=storage_dtype,
                trainable=False,
                autocast=False,  # the scales stay float32 under a mixed precision policy
            )
            setattr(layer, name, variable)
        layer._tracker.lock()
        if value is not None:
            set_kernel(layer, value)
        count += 1
    return count


def set_kernel(layer: Any, value: np.ndarray) -> None:
    """Quantizes a float kernel (keras layout) into ``layer``'s storage."""
    layout: KernelLayout = layer._layout
    if tuple(value.shape) != layout.shape:
        raise ValueError(f"{layout.path}: a kernel of shape {tuple(value.shape)}, expected {layout.shape}.")
    matrix = np.asarray(value, np.float32).transpose(layout.perm).reshape(layout.inputs, layout.outputs)
    for name, array in quantize_matrix(matrix, layer._quantization).items():
        getattr(layer, name).assign(array)


def quantized_layers(backbone: keras.Model) -> dict[str, Any]:
    """``{float kernel path: layer}`` of the quantized projections."""
    layers = backbone._flatten_layers(include_self=False)
    return {layer._layout.path: layer for layer in layers if isinstance(layer, _Quantized)}


def storage_variables(backbone: keras.Model) -> list[Any]:
    """The keras variables that hold quantized kernels (codes and scales)."""
    return [
        getattr(layer, name)
        for layer in quantized_layers(backbone).values()
        for name in _storage_names(layer._quantization)
    ]


def host_kernel(layer: Any, read: Any = np.asarray) -> np.ndarray:
    """The dequantized float32 kernel of a quantized layer, in its keras shape, on host
    (``read`` gathers one stored array to host, e.g. ``hf.export.host_value``)."""
    layout: KernelLayout = layer._layout
    storage = {name: read(getattr(layer, name).value) for name in _storage_names(layer._quantization)}
    with jax.default_device(jax.devices("cpu")[0]):
        matrix = np.asarray(dequantize_matrix(storage, layout, layer._quantization))
    permuted = matrix.reshape([layout.shape[i] for i in layout.perm])
    return permuted.transpose(np.argsort(layout.perm))


def config_of(backbone: keras.Model) -> QuantizationConfig | None:
    """The quantization of ``backbone``'s projections, if any."""
    layers = quantized_layers(backbone)
    return next(iter(layers.values()))._quantization if layers else None


def storage_bytes(backbone: keras.Model) -> dict[str, int]:
    """Bytes of the quantized storage, and of the same kernels at 2 bytes per weight (bf16)."""
    layers = quantized_layers(backbone).values()
    stored = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in storage_variables(backbone))
    return {"stored": int(stored), "bfloat16": int(sum(2 * layer._layout.size for layer in layers))}
