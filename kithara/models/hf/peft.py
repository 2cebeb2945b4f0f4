"""LoRA adapters in the PEFT format (adapter_model.safetensors + adapter_config.json).

keras-hub's adapters factor each kernel as ``a @ b`` with ``b`` acting on the kernel's
last axis only, so a query kernel (hidden, heads, head_dim) gets one rank-``r`` adapter
per head. Written as one PEFT matrix pair that is a block-structured adapter of rank
``heads * r`` (``r`` for 2-D kernels): exact, with ``lora_alpha`` set so that PEFT's
``alpha / r`` scaling equals kithara's.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from kithara.models import quantization
from kithara.models.hf.export import host_value
from kithara.models.hf.weight_map import Entry, weight_map

if TYPE_CHECKING:
    from kithara.models.hf.export import BackboneModel
    from kithara.models.keras_hub_model import KerasHubModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_factors(entry: Entry, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT ``(lora_A (R, in), lora_B (out, R))`` with ``lora_B @ lora_A`` equal, in Hugging
    Face layout, to the keras delta ``a @ b`` of the kernel that ``entry`` maps."""
    out_dim, in_dim = entry.hf_shape
    rank = a.shape[-1]
    index = entry.index().reshape(-1, entry.keras_shape[-1])  # (leading positions, last axis)
    rows, cols = index // in_dim, index % in_dim
    if np.any(cols != cols[:, :1]):
        raise ValueError(f"{entry.variable_path}: the kernel's last axis is not an output axis of {entry.hf_key}.")
    groups, group_of = np.unique(rows, axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    lora_a = np.zeros((len(groups) * rank, in_dim), np.float32)
    slots = group_of[:, None] * rank + np.arange(rank)
    lora_a[slots, cols[:, :1]] = a.reshape(-1, rank)
    lora_b = np.zeros((out_dim, len(groups) * rank), np.float32)
    block_slots = (np.arange(len(groups))[:, None] * rank + np.arange(rank))[:, None, :]
    lora_b[groups[:, :, None], block_slots] = b.T[None]
    return lora_a, lora_b


def save_peft_adapter(
    model: BackboneModel,
    path: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    task_type: str = "CAUSAL_LM",
    modules_to_save: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> None:
    """Writes the model's LoRA adapters alone, for ``peft.PeftModel.from_pretrained(base, path)``.

    ``modules_to_save`` maps a Hugging Face module name to its full tensors (by parameter
    name), written whole next to the adapters, as PEFT writes its ``modules_to_save`` (a
    classifier's trained ``score`` layer, with ``task_type="SEQ_CLS"``).
    """
    if model.lora is None:
        raise ValueError("The model has no LoRA adapters to save; build it with lora=LoraConfig(...).")
    config = config or getattr(model, "hf_config", None) or _config_from_backbone(model)
    by_path = {v.path: v for v in model.backbone.weights}
    adapted = {
        layer._kernel.path: layer
        for layer in model.backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    }
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for entry in weight_map(model.backbone, config):
        layer = adapted.get(entry.variable_path)
        if layer is None:
            continue
        a = host_value(by_path[layer.lora_kernel_a.path].value).astype(np.float32)
        b = host_value(by_path[layer.lora_kernel_b.path].value).astype(np.float32)
        lora_a, lora_b = peft_factors(entry, a, b)
        module = entry.hf_key.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
        name = module.rsplit(".", 1)[-1]
        ranks[name] = lora_a.shape[0]
        alphas[name] = layer.lora_alpha / layer.lora_rank * lora_a.shape[0]
    for module, params in (modules_to_save or {}).items():
        for name, value in params.items():
            tensors[f"base_model.model.{module}.{name}"] = value
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save_file

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = next(alphas[name] for name in ranks if ranks[name] == rank)
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    if modules_to_save:
        adapter_config["modules_to_save"] = sorted(modules_to_save)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def merge_peft_adapter(model: KerasHubModel, path: str | Path, *, config: Mapping[str, Any] | None = None) -> int:
    """Folds a PEFT LoRA adapter into the model's base weights; returns how many kernels changed."""
    adapter_dir = Path(path)
    if quantization.quantized_layers(model.backbone):
        raise ValueError(
            f"Cannot merge {adapter_dir} into a quantized base: its kernels would be rounded again. Merge into the "
            "float model (from_preset without quantization=), save it, then load that with quantization=; or load "
            "the adapter as trainable LoRA weights with load_peft_adapter."
        )
    tensors, adapter_config = _read_adapter(adapter_dir)
    config = config or model.hf_config or _config_from_backbone(model)
    by_path = {v.path: v for v in model.backbone.weights}
    kernels = {
        layer._kernel.path: layer._kernel
        for layer in model.backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    }
    used: set[str] = set()
    for entry in weight_map(model.backbone, config):
        module = entry.hf_key.removesuffix(".weight")
        a_key, b_key = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
        if a_key not in tensors:
            continue
        scale = _peft_scale(adapter_config, module, tensors[a_key].shape[0])
        delta = scale * (tensors[b_key].astype(np.float32) @ tensors[a_key].astype(np.float32))
        variable = kernels.get(entry.variable_path, by_path[entry.variable_path])
        merged = host_value(variable.value).astype(np.float32) + entry.to_keras(delta)
        variable.assign(jax.device_put(merged.astype(variable.dtype), variable.value.sharding))
        used.update((a_key, b_key))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{adapter_dir}: adapter tensors {unused[:3]} match no weight of this model.")
    return len(used) // 2


def load_peft_adapter(model: KerasHubModel, path: str | Path, *, config: Mapping[str, Any] | None = None) -> int:
    """Sets the model's LoRA adapters from a PEFT adapter directory, exactly; returns how
    many adapters were set.

    The model must have been built with adapters on the same projections. A 2-D kernel takes
    any PEFT adapter whose rank equals the model's; a (hidden, heads, head_dim) kernel only
    one of the block-structured form ``save_peft_adapter`` writes (rank ``heads * r``).
    Anything else raises; ``merge_peft_adapter`` folds such an adapter into the weights.
    """
    if model.lora is None:
        raise ValueError("The model has no LoRA adapters to load into; build it with lora=LoraConfig(...).")
    tensors, adapter_config = _read_adapter(Path(path))
    config = config or model.hf_config or _config_from_backbone(model)
    adapted = {
        layer._kernel.path: layer
        for layer in model.backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    }
    used: set[str] = set()
    for entry in weight_map(model.backbone, config):
        layer = adapted.get(entry.variable_path)
        if layer is None:
            continue
        module = entry.hf_key.removesuffix(".weight")
        a_key, b_key = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
        if a_key not in tensors:
            raise ValueError(f"{path}: no adapter for {module}, which the model adapts; match the LoRA targets.")
        lora_a, lora_b = tensors[a_key].astype(np.float32), tensors[b_key].astype(np.float32)
        a, b = _keras_factors(entry, lora_a, lora_b, layer.lora_rank, module)
        b = b * (_peft_scale(adapter_config, module, lora_a.shape[0]) / (layer.lora_alpha / layer.lora_rank))
        for variable, value in ((layer.lora_kernel_a, a), (layer.lora_kernel_b, b)):
            variable.assign(jax.device_put(value.astype(variable.dtype), variable.value.sharding))
        used.update((a_key, b_key))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: adapter tensors {unused[:3]} have no LoRA layer in this model; match the targets.")
    return len(used) // 2


def _keras_factors(
    entry: Entry, lora_a: np.ndarray, lora_b: np.ndarray, rank: int, module: str
) -> tuple[np.ndarray, np.ndarray]:
    """The keras ``(a, b)`` that ``peft_factors`` turns into exactly ``(lora_a, lora_b)``."""
    _, in_dim = entry.hf_shape
    index = entry.index().reshape(-1, entry.keras_shape[-1])
    rows, cols = index // in_dim, index % in_dim
    groups, group_of = np.unique(rows, axis=0, return_inverse=True)
    if lora_a.shape[0] != len(groups) * rank:
        raise ValueError(
            f"{module}: PEFT rank {lora_a.shape[0]} does not fit this model's rank {rank} "
            f"({len(groups)} block(s)); build the model with a matching rank, or use merge_peft_adapter."
        )
    slots = group_of.reshape(-1)[:, None] * rank + np.arange(rank)
    a = lora_a[slots, cols[:, :1]].reshape((*entry.keras_shape[:-1], rank))
    b = lora_b[groups[0][:, None], np.arange(rank)[None, :]].T
    again_a, again_b = peft_factors(entry, a, b)
    if not (np.array_equal(again_a, lora_a) and np.array_equal(again_b, lora_b)):
        raise ValueError(
            f"{module}: the PEFT adapter is not of the per-head form keras-hub's LoRA can hold; "
            "use merge_peft_adapter to fold it into the weights instead."
        )
    return a, b


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load_file

    if not (adapter_dir / ADAPTER_WEIGHTS).is_file() or not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir} needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} (a PEFT LoRA adapter).")
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapter_config.get("peft_type") != "LORA" or adapter_config.get("use_dora") or adapter_config.get("use_rslora"):
        raise ValueError(
            f"{adapter_dir}/{ADAPTER_CONFIG}: only plain LoRA adapters (no DoRA, no rsLoRA) are supported."
        )
    return load_file(str(adapter_dir / ADAPTER_WEIGHTS)), adapter_config


def _config_from_backbone(model: BackboneModel) -> dict[str, Any]:
    from kithara.models.hf.config import hf_config_from_backbone

    return hf_config_from_backbone(model.backbone)


def _peft_scale(adapter_config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module's ``B @ A``: alpha / r (alpha / sqrt(r) with rsLoRA).

    ``rank`` is the adapter's actual rank (its ``lora_A`` rows). ``alpha_pattern`` keys match
    module names as PEFT matches them: the whole name, or a suffix after a dot, as a regex.
    """
    alpha = adapter_config["lora_alpha"]
    for key, value in (adapter_config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)
