"""Hugging Face ``*ForSequenceClassification`` / ``*ForTokenClassification`` checkpoints
<-> ``ScalarHeadModel``.

The backbone goes through the causal-LM machinery unchanged (config translation, weight
map, the safetensors reader and its checks); a classifier adds one ``score`` layer, a
``[num_labels, hidden]`` matrix (plus a ``[num_labels]`` bias in token classifiers unless
``token_classification_bias`` is false) that is the transpose of kithara's ``score/kernel``.
A classifier has no LM head: where the family allows it, the backbone is built with tied
embeddings so that no unused LM-head matrix is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import keras_hub
import numpy as np

from kithara.models.hf.checkpoint import is_hf_checkpoint, load_weights, read_config
from kithara.models.hf.config import CLASSES, backbone_args, check_activation, hf_config_from_backbone
from kithara.models.hf.export import hf_tensors, host_value

if TYPE_CHECKING:
    from kithara.models.scalar_head import ScalarHeadModel

logger = logging.getLogger(__name__)

SEQUENCE, TOKEN = "sequence_classification", "token_classification"
# model_type -> task -> the transformers class (the ones transformers 5 has: Gemma 3 text has
# no token classifier; the multimodal Gemma3ForSequenceClassification is not a text model).
ARCHITECTURES = {
    "llama": {SEQUENCE: "LlamaForSequenceClassification", TOKEN: "LlamaForTokenClassification"},
    "mistral": {SEQUENCE: "MistralForSequenceClassification", TOKEN: "MistralForTokenClassification"},
    "qwen2": {SEQUENCE: "Qwen2ForSequenceClassification", TOKEN: "Qwen2ForTokenClassification"},
    "qwen3": {SEQUENCE: "Qwen3ForSequenceClassification", TOKEN: "Qwen3ForTokenClassification"},
    "gemma": {SEQUENCE: "GemmaForSequenceClassification", TOKEN: "GemmaForTokenClassification"},
    "gemma2": {SEQUENCE: "Gemma2ForSequenceClassification", TOKEN: "Gemma2ForTokenClassification"},
    "gemma3_text": {SEQUENCE: "Gemma3TextForSequenceClassification"},
}
_TASK_OF = {arch: (model_type, task) for model_type, tasks in ARCHITECTURES.items() for task, arch in tasks.items()}
SUPPORTED = tuple(sorted(_TASK_OF))
SCORE_WEIGHT, SCORE_BIAS, LM_HEAD = "score.weight", "score.bias", "lm_head.weight"
# Families whose keras-hub backbone can drop the LM-head matrix (Mistral's always has one).
_TIEABLE = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LoadedClassifier:
    """A checkpoint's backbone (weights set), its config, and its head: ``kernel`` is
    ``[hidden, num_labels]`` (None for a causal LM: the head is new)."""

    backbone: keras_hub.models.Backbone
    config: dict[str, Any]
    task: str
    num_labels: int
    kernel: np.ndarray | None
    bias: np.ndarray | None


def checkpoint_task(config: Mapping[str, Any], where: str) -> str | None:
    """The task of a checkpoint's ``architectures``: None for a causal LM (a head is added)."""
    model_type = config.get("model_type")
    if model_type not in CLASSES:
        return None  # the backbone's builder refuses it, naming the supported model types
    causal = CLASSES[model_type][2]
    for arch in config.get("architectures") or [causal]:
        if arch == causal:
            return None
        if arch in _TASK_OF and _TASK_OF[arch][0] == model_type:
            return _TASK_OF[arch][1]
        raise ValueError(
            f"{where}/config.json: architecture {arch!r} (model_type {model_type!r}) is not supported by "
            f"ScalarHeadModel.from_preset. It loads {', '.join(SUPPORTED)}, and the causal LMs "
            f"{', '.join(sorted(c[2] for c in CLASSES.values()))} (with a new head)."
        )
    return None


def config_num_labels(config: Mapping[str, Any]) -> int:
    """``num_labels`` as transformers reads it: the size of ``id2label`` (default 2)."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def load_classifier(
    path: str | Path, *, dtype: Any, num_labels: int | None = None, task: str | None = None
) -> LoadedClassifier:
    """Builds the backbone of a local Hugging Face classification (or causal LM) checkpoint
    and reads its weights and its ``score`` layer."""
    where = str(path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {where!r} does not exist.")
    raw = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if "Gemma3ForSequenceClassification" in (raw.get("architectures") or ()):
        raise ValueError(
            f"{where}/config.json is the multimodal Gemma3ForSequenceClassification; kithara loads text models. "
            "Save the text classifier (Gemma3TextForSequenceClassification, model_type gemma3_text) and load that."
        )
    if not is_hf_checkpoint(path):
        raise ValueError(
            f"{where!r} is not a Hugging Face checkpoint directory (config.json with a model_type, plus "
            "safetensors). For a keras-hub preset, load KerasHubModel.from_preset and use "
            "ScalarHeadModel.from_causal_lm."
        )
    config = read_config(path)
    check_activation(config)
    found = checkpoint_task(config, where)
    if found is None:
        labels = 1 if num_labels is None else num_labels
    else:
        labels = config_num_labels(config)
        if num_labels is not None and num_labels != labels:
            raise ValueError(
                f"num_labels={num_labels} but {where}/config.json has {labels} labels (id2label); leave "
                "num_labels out to use the checkpoint's, or start from the causal LM for a new head."
            )
        if task is not None and task != found:
            raise ValueError(f"task={task!r} but {where} is a {config['architectures'][0]} ({found}); leave task out.")
    build = dict(config)
    if config["model_type"] in _TIEABLE:
        build["tie_word_embeddings"] = True  # one embedding matrix: the input one
    backbone_class, _, kwargs = backbone_args(build)
    backbone = getattr(keras_hub.models, backbone_class)(dtype=dtype, **kwargs)
    head = load_weights(backbone, path, config, skip=(LM_HEAD,), extra=(SCORE_WEIGHT, SCORE_BIAS))
    reverse = getattr(backbone.token_embedding, "reverse_embeddings", None)
    if reverse is not None:  # Mistral's LM-head matrix, which no score uses: zeros, not random values
        reverse.assign(np.zeros(reverse.shape, keras.backend.standardize_dtype(reverse.dtype)))
    if found is None:
        if head:
            raise ValueError(f"{where} holds {sorted(head)} but config.json says it is a causal LM.")
        logger.info(
            "%s is a causal LM (%s): its LM head is left out and a new %d-label score head is added.",
            where,
            (config.get("architectures") or ["?"])[0],
            labels,
        )
        return LoadedClassifier(backbone, config, task or SEQUENCE, labels, None, None)
    return LoadedClassifier(backbone, config, found, labels, *_head(head, config, found, labels, where))


def _head(
    head: Mapping[str, np.ndarray], config: Mapping[str, Any], task: str, labels: int, where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(kernel [hidden, labels], bias or None)`` from a classifier's ``score`` tensors, checked."""
    if SCORE_WEIGHT not in head:
        raise ValueError(
            f"{where} has no {SCORE_WEIGHT!r}, the classification head its config.json "
            f"({config['architectures'][0]}) implies; the weights file is incomplete or from another model."
        )
    weight = head[SCORE_WEIGHT]
    shape = (labels, config["hidden_size"])
    if tuple(weight.shape) != shape:
        raise ValueError(f"{where}: {SCORE_WEIGHT} has shape {tuple(weight.shape)}; config.json implies {shape}.")
    wants_bias = task == TOKEN and config.get("token_classification_bias", True)
    if wants_bias != (SCORE_BIAS in head):
        raise ValueError(
            f"{where}: {SCORE_BIAS!r} is {'missing' if wants_bias else 'present'}, but a {config['architectures'][0]} "
            f"with this config.json {'has' if wants_bias else 'has no'} bias (token_classification_bias)."
        )
    bias = head.get(SCORE_BIAS)
    if bias is not None and tuple(bias.shape) != (labels,):
        raise ValueError(f"{where}: {SCORE_BIAS} has shape {tuple(bias.shape)}; config.json implies ({labels},).")
    return weight.T, bias


def classifier_config(model: ScalarHeadModel, tokenizer: Any = None) -> dict[str, Any]:
    """The ``config.json`` of ``model`` as a transformers classifier: the source checkpoint's
    (or one made from the backbone) with ``architectures``, labels and ``pad_token_id`` set."""
    base = model.hf_config if model.hf_config is not None else hf_config_from_backbone(model.backbone)
    model_type = base["model_type"]
    if model.task not in ARCHITECTURES.get(model_type, {}):
        raise ValueError(
            f"transformers has no {model.task} class for model_type {model_type!r}; it has "
            f"{sorted(ARCHITECTURES.get(model_type, {}).values())}. Make the model with another task."
        )
    config = {k: v for k, v in base.items() if k not in ("num_labels", "problem_type")}
    labels = model.num_labels
    id2label = {str(k): v for k, v in (config.get("id2label") or {}).items()}
    if sorted(id2label) != sorted(str(i) for i in range(labels)):
        id2label = {str(i): f"LABEL_{i}" for i in range(labels)}
    config.update(
        architectures=[ARCHITECTURES[model_type][model.task]],
        id2label=id2label,
        label2id={v: int(k) for k, v in id2label.items()},
    )
    if model.task == TOKEN:
        config["token_classification_bias"] = model.head.bias is not None
    if tokenizer is not None:
        config["pad_token_id"] = _pad_id(tokenizer)
    return config


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)  # a kithara Tokenizer
    if pad is None:
        pad = getattr(getattr(tokenizer, "backend", tokenizer), "pad_token_id", None)
    if pad is None:
        raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no pad token id to write as pad_token_id.")
    return int(pad)


def head_tensors(model: ScalarHeadModel, dtype: Any) -> dict[str, np.ndarray]:
    """The ``score`` layer in Hugging Face layout: ``weight [num_labels, hidden]`` (and ``bias``)."""
    kernel = host_value(model.head.kernel.value).astype(np.float32)
    tensors = {"weight": np.ascontiguousarray(kernel.T).astype(dtype)}  # safetensors writes memory order
    if model.head.bias is not None:
        tensors["bias"] = host_value(model.head.bias.value).astype(np.float32).astype(dtype)
    return tensors


def classifier_tensors(
    model: ScalarHeadModel, config: Mapping[str, Any], dtype: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """The backbone's tensors (LoRA merged, no LM head), then ``score.weight`` (and ``score.bias``)."""
    yield from hf_tensors(model, config, dtype, skip=(LM_HEAD,))
    for name, value in head_tensors(model, dtype).items():
        yield f"score.{name}", value


def save_classifier(
    model: ScalarHeadModel,
    path: str | Path,
    *,
    max_shard_size: int | str,
    dtype: str,
    tokenizer: Any,
) -> None:
    """Writes ``model`` as a transformers classifier directory (see ``ScalarHeadModel.save_in_hf_format``)."""
    from kithara.models.hf.export import save_in_hf_format

    config = classifier_config(model, tokenizer)
    if config.get("pad_token_id") is None and model.task == SEQUENCE:
        logger.warning(
            "The exported config.json has no pad_token_id: transformers' %s then scores only one row per batch. "
            "Pass tokenizer= to save_in_hf_format to set it.",
            config["architectures"][0],
        )
    save_in_hf_format(
        model,
        path,
        max_shard_size=max_shard_size,
        dtype=dtype,
        tokenizer=tokenizer,
        config=config,
        tensors=lambda config, np_dtype: classifier_tensors(model, config, np_dtype),
    )


def save_classifier_adapter(model: ScalarHeadModel, path: str | Path) -> None:
    """The LoRA adapters in PEFT's format, with the trained ``score`` layer as a module to save."""
    from kithara.models.hf.peft import save_peft_adapter

    save_peft_adapter(
        model,
        path,
        config=classifier_config(model),
        task_type="SEQ_CLS" if model.task == SEQUENCE else "TOKEN_CLS",
        modules_to_save={"score": head_tensors(model, np.float32)},
    )
