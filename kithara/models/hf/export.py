"""Writing a keras-hub causal LM as a Hugging Face checkpoint directory.

Tensors are gathered to host one variable at a time and written in safetensors shards of
at most ``max_shard_size`` bytes, so no host ever holds the whole model at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from kithara.models import quantization
from kithara.models.hf.weight_map import weight_map

if TYPE_CHECKING:
    from typing import TypeAlias

    from kithara.models.keras_hub_model import KerasHubModel
    from kithara.models.scalar_head import ScalarHeadModel

    # Anything with a keras-hub ``backbone`` (LoRA adapters, if any, on it).
    BackboneModel: TypeAlias = KerasHubModel | ScalarHeadModel

logger = logging.getLogger(__name__)

_DTYPES = {"float32": np.float32, "bfloat16": None, "float16": np.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_COPY_CHUNK = 16 * 2**20  # bytes per read when copying a written checkpoint to a URL


def parse_size(size: int | str) -> int:
    """``5_000_000``, ``"5GB"``, ``"500MiB"`` -> bytes."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}.")
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or 1000000.")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def host_value(value: jax.Array) -> np.ndarray:
    """The full value of one (possibly sharded, possibly multi-host) array on this host."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def _merged_kernels(model: BackboneModel) -> dict[str, tuple[str, str, float]]:
    """kernel path -> (lora_kernel_a path, lora_kernel_b path, alpha / rank) for adapted layers."""
    merged = {}
    for layer in model.backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            merged[layer._kernel.path] = (
                layer.lora_kernel_a.path,
                layer.lora_kernel_b.path,
                layer.lora_alpha / layer.lora_rank,
            )
    return merged


def hf_tensors(
    model: BackboneModel, config: Mapping[str, Any], dtype: Any, *, skip: tuple[str, ...] = ()
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, tensor)`` of the backbone in Hugging Face layout, one at a time, LoRA
    adapters merged; tensors named in ``skip`` are left out."""
    by_path = {v.path: v for v in model.backbone.weights}
    quantized = quantization.quantized_layers(model.backbone)
    lora = _merged_kernels(model)
    for entry in weight_map(model.backbone, config):
        if entry.hf_key in skip:
            continue
        if entry.variable_path in quantized:  # written dequantized, at full precision
            value = quantization.host_kernel(quantized[entry.variable_path], host_value)
        else:
            value = host_value(by_path[entry.variable_path].value).astype(np.float32)
        if entry.variable_path in lora:
            a_path, b_path, scale = lora[entry.variable_path]
            a, b = host_value(by_path[a_path].value), host_value(by_path[b_path].value)
            value = value + scale * (a.astype(np.float32) @ b.astype(np.float32))
        yield entry.hf_key, entry.to_hf(value).astype(dtype)


def save_in_hf_format(
    model: BackboneModel,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str = "float32",
    tokenizer: Any = None,
    config: Mapping[str, Any] | None = None,
    tensors: Callable[[Mapping[str, Any], Any], Iterator[tuple[str, np.ndarray]]] | None = None,
) -> None:
    """Writes ``model`` (adapters merged) as a Hugging Face checkpoint in directory ``path``.

    See ``KerasHubModel.save_in_hf_format``. ``tensors(config, dtype)`` yields the tensors to
    write (default: the causal LM's, ``hf_tensors``).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if "://" in os.fspath(path):  # gs:// and other URLs: write locally, then copy the files there
        with tempfile.TemporaryDirectory(prefix="kithara-hf-") as local:
            save_in_hf_format(
                model,
                local,
                max_shard_size=max_shard_size,
                dtype=dtype,
                tokenizer=tokenizer,
                config=config,
                tensors=tensors,
            )
            if jax.process_index() == 0:
                _upload(Path(local), os.fspath(path))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"kithara save_in_hf_format upload {os.fspath(path)}")
        return
    np_dtype = _DTYPES[dtype] or _bfloat16()
    limit = parse_size(max_shard_size)
    if config is None:
        config = getattr(model, "hf_config", None)
    if config is None:
        from kithara.models.hf.config import hf_config_from_backbone

        config = hf_config_from_backbone(model.backbone)
    config = {**config, "torch_dtype": dtype}
    config.pop("dtype", None)
    writer = jax.process_index() == 0
    out = Path(path)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    current: dict[str, np.ndarray] = {}
    names: list[list[str]] = [[]]
    size = total = 0
    # Shards are written as they fill; their final names (model-0000i-of-0000n) are only
    # known at the end, so they are written under temporary names and renamed then.
    written: list[Path] = []
    named_tensors = tensors(config, np_dtype) if tensors is not None else hf_tensors(model, config, np_dtype)
    for name, tensor in named_tensors:
        if size and size + tensor.nbytes > limit:
            written.append(_write_shard(out, len(written), current, writer))
            current, size = {}, 0
            names.append([])
        if writer:  # the others only take part in the gathers
            current[name] = tensor
        names[-1].append(name)
        size += tensor.nbytes
        total += tensor.nbytes
    written.append(_write_shard(out, len(written), current, writer))
    if writer:
        _finish(out, written, names, total, config, tokenizer, getattr(model, "hf_generation_config", None))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"kithara save_in_hf_format {out}")  # files complete for everyone


def _finish(
    out: Path,
    written: list[Path],
    names: list[list[str]],
    total: int,
    config: Mapping[str, Any],
    tokenizer: Any,
    source_generation: Mapping[str, Any] | None = None,
) -> None:
    """Names the shards, writes the index, config, generation config (the source checkpoint's,
    when the model was loaded from one, else its special token ids) and tokenizer."""
    for stale in out.glob("model*.safetensors*"):
        if stale not in written:
            stale.unlink()
    weight_map_json: dict[str, str] = {}
    if len(written) == 1:
        written[0].rename(out / "model.safetensors")
    else:
        for i, (tmp, shard_names) in enumerate(zip(written, names, strict=True)):
            final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            tmp.rename(out / final)
            weight_map_json.update(dict.fromkeys(shard_names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map_json}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
    generation.update(source_generation or {})
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    logger.info("Wrote %s: %d tensors in %d safetensors file(s).", out, sum(map(len, names)), len(written))


def _upload(local: Path, remote: str) -> None:
    """Copies the checkpoint directory ``local`` to ``remote`` (a URL epath opens, such as
    ``gs://``), streaming each file, and deletes weight files of an earlier export there."""
    from etils import epath

    dest = epath.Path(remote)
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    names = {p.relative_to(local).as_posix() for p in files}
    for stale in dest.glob("model*.safetensors*"):
        if stale.name not in names:
            stale.unlink()
    for file in files:
        target = dest / file.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
    logger.info("Copied %d file(s) to %s.", len(files), remote)


def _write_shard(out: Path, i: int, tensors: dict[str, np.ndarray], writer: bool) -> Path:
    from safetensors.numpy import save_file

    tmp = out / f"model.safetensors.part{i}"
    if writer:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return tmp


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Writes a kithara ``Tokenizer`` (or a transformers tokenizer) as Hugging Face files."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if hasattr(backend, "save_pretrained"):
        backend.save_pretrained(str(out))
        return
    from keras_hub.src.utils.transformers.export.hf_exporter import export_tokenizer

    try:
        export_tokenizer(backend, str(out))
    except ValueError as e:
        raise ValueError(
            f"Cannot write {type(backend).__name__} as Hugging Face tokenizer files ({e}). "
            "Save the model without tokenizer= and copy the original tokenizer files next to it."
        ) from e


def _bfloat16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16
