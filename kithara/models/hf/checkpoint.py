"""Loading a local Hugging Face checkpoint (config.json + safetensors) into keras-hub, exactly."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import keras
import keras_hub
import numpy as np

from kithara.models import quantization as quantization_lib
from kithara.models.hf.config import apply_to_layers, backbone_args, check_activation
from kithara.models.hf.weight_map import weight_map
from kithara.models.keras_variables import is_allocated, unallocated

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def is_hf_checkpoint(path: str | Path) -> bool:
    """True for a directory holding a Hugging Face ``config.json`` (not a keras-hub preset)."""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "metadata.json").exists():
        return False
    return "model_type" in read_config(path)


def read_config(path: str | Path) -> dict[str, Any]:
    with open(Path(path) / "config.json") as f:
        config: dict[str, Any] = json.load(f)
    if "text_config" in config and config.get("model_type") != "gemma3_text":
        raise ValueError(
            f"{path}/config.json describes a multimodal model ({config.get('model_type')}); kithara loads "
            "text-only causal LMs. Export the language model alone (e.g. Gemma3ForCausalLM) and load that."
        )
    return config


def shard_path(directory: Path, name: str) -> Path:
    """``directory / name`` for a weights file named by ``model.safetensors.index.json``,
    refusing names that lead out of ``directory``: absolute paths, ``..`` and symlinks to
    files elsewhere. One exception: the Hugging Face hub cache links each file of
    ``snapshots/<revision>/`` to ``../../blobs/``, and those links are followed."""
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise ValueError(
            f"{directory / _INDEX} names the weights file {name!r}, outside the checkpoint directory; "
            "shards must be files inside it (fix the index's weight_map)."
        )
    path = directory / name
    allowed = [directory.resolve()]
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        allowed.append((directory.parent.parent / "blobs").resolve())
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in allowed):
        raise ValueError(
            f"{path} links to {target}, outside the checkpoint directory {directory}; kithara reads weights "
            "only from files inside it. Copy the file into the directory instead of linking it."
        )
    return path


class SafetensorReader(contextlib.ExitStack):
    """Reads named tensors from ``model.safetensors`` or the shards an index lists."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import safetensors

        self._safe_open = safetensors.safe_open
        self.path = Path(path)
        if (self.path / _INDEX).is_file():
            with open(self.path / _INDEX) as f:
                self.files: dict[str, str] = json.load(f)["weight_map"]
            for name in set(self.files.values()):  # refuse a bad index before reading anything
                shard_path(self.path, name)
        elif (self.path / _SINGLE).is_file():
            with self._open_file(_SINGLE) as f:
                self.files = dict.fromkeys(f.keys(), _SINGLE)
        else:
            raise FileNotFoundError(f"{self.path} has neither {_SINGLE} nor {_INDEX}: no safetensors weights to load.")
        self._open: dict[str, Any] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def _open_file(self, name: str) -> Any:
        path = shard_path(self.path, name)
        try:
            return self._safe_open(str(path), framework="np")
        except Exception as error:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error

    def get(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise ValueError(f"{self.path} has no tensor {key!r}, which its config.json implies.")
        name = self.files[key]
        if name not in self._open:
            self._open[name] = self.enter_context(self._open_file(name))
        try:
            return np.asarray(self._open[name].get_tensor(key))
        except Exception as error:
            raise ValueError(f"{self.path / name}: tensor {key!r} cannot be read ({error}).") from error


def load_causal_lm(
    path: str | Path,
    *,
    dtype: Any,
    load_preprocessor: bool = False,
    quantization: quantization_lib.QuantizationConfig | None = None,
) -> tuple[keras_hub.models.CausalLM, dict[str, Any]]:
    """Builds the keras-hub causal LM of a Hugging Face checkpoint and fills its weights.

    With ``quantization`` the backbone is built without allocating its variables, its
    projections are made quantized, and each tensor is quantized as it is read: host memory
    holds the quantized model plus about one float tensor, never the float model.

    Returns the model and the checkpoint's ``config.json`` (kept for export).
    """
    config = read_config(path)
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith(("ForSequenceClassification", "ForTokenClassification")):
        raise ValueError(
            f"{path} holds a {architecture} (a classifier or reward model), not a causal LM; load it with "
            "kithara.ScalarHeadModel.from_preset."
        )
    check_activation(config)
    backbone_class, causal_lm_class, kwargs = backbone_args(config)
    if quantization is None:
        backbone = getattr(keras_hub.models, backbone_class)(dtype=dtype, **kwargs)
    else:
        with unallocated():
            backbone = getattr(keras_hub.models, backbone_class)(dtype=dtype, **kwargs)
        quantization_lib.quantize_backbone(backbone, quantization)
    task = getattr(keras_hub.models, causal_lm_class)
    preprocessor = task.preprocessor_cls.from_preset(str(path)) if load_preprocessor else None
    causal_lm = task(backbone=backbone, preprocessor=preprocessor)
    load_weights(backbone, path, config)
    unfilled = [v.path for v in backbone.weights if not is_allocated(v)]
    if unfilled:
        raise ValueError(f"{path}: no tensor fills {unfilled[:3]} ({len(unfilled)} variables) of the quantized model.")
    return causal_lm, config


def load_weights(
    backbone: keras.Model,
    path: str | Path,
    config: dict[str, Any],
    *,
    skip: Collection[str] = (),
    extra: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Fills ``backbone`` from the safetensors at ``path`` without rounding, and applies the
    config values keras-hub hard-codes in layers (see ``config.apply_to_layers``).

    ``skip`` names Hugging Face tensors left out even where the backbone has a variable for
    them (a classifier's absent LM head); ``extra`` names tensors outside the backbone (a
    classifier's ``score`` layer), returned as they are when the checkpoint has them.
    """
    by_path = {v.path: v for v in backbone.weights}
    quantized = quantization_lib.quantized_layers(backbone)
    with SafetensorReader(path) as reader:
        names = set(reader.names())
        found = {key: reader.get(key) for key in extra if key in names}
        used = set(found)
        for entry in weight_map(backbone, config):
            if entry.hf_key in skip:
                continue
            try:
                value = entry.to_keras(reader.get(entry.hf_key))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            if entry.variable_path in quantized:
                quantization_lib.set_kernel(quantized[entry.variable_path], value)
            else:
                variable = by_path[entry.variable_path]
                variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))
            used.add(entry.hf_key)
        unused = sorted(k for k in names if k not in used and not k.endswith("rotary_emb.inv_freq"))
        if unused and unused != ["lm_head.weight"]:  # a tied model may still store its head
            raise ValueError(
                f"{path} holds {len(unused)} tensors its config.json does not account for (e.g. {unused[:3]}): "
                "the weights and config disagree (more layers than num_hidden_layers, or another architecture)."
            )
    apply_to_layers(backbone, config)
    return found
