"""What the objective trainers accept besides built objects: model paths and raw data.

``SFTTrainer`` and ``DPOTrainer`` take a ``kithara.Model`` or a model directory / preset,
and a ``Dataloader``, a ``kithara.data`` dataset, or raw data (a path, glob, list of dicts
or Hugging Face dataset) that they tokenize with the trainer's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kithara.data import tokenizer as tokenizer_lib
from kithara.data.dataloader import Dataloader
from kithara.data.formats import Dataset
from kithara.data.sources import Source, load_source
from kithara.data.tokenizer import Tokenizer
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.models.model import Model
from kithara.trainer.config import TrainingConfig


def resolve_model(
    model: Model | str, tokenizer: Any, *, lora: LoraConfig | None = None, precision: str | None = None
) -> tuple[Model, Tokenizer | None]:
    """``(model, tokenizer)``: a path or preset is loaded with ``KerasHubModel.from_preset``
    (with ``lora`` and ``precision``), and the tokenizer, when not given, from the same
    directory. ``tokenizer`` may be a ``kithara.Tokenizer`` or a ``transformers`` one."""
    tokenizer = as_tokenizer(tokenizer)
    if isinstance(model, str):
        loaded = KerasHubModel.from_preset(model, lora=lora, precision=precision or "float32")
        return loaded, tokenizer or Tokenizer.from_pretrained(model)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a kithara.Model or a model directory / preset, got {type(model).__name__}.")
    built_with = getattr(model, "lora", None)
    if lora is not None and built_with != lora:
        raise ValueError(
            f"peft_config={lora} asks for LoRA adapters, but the model was built "
            f"{'with ' + str(built_with) if built_with else 'without them'}; adapters are added "
            "when a model is built: KerasHubModel.from_preset(path, lora=...) or from_config(..., lora=...), "
            "or pass the model as a path."
        )
    return model, tokenizer


def as_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """A ``kithara.Tokenizer`` from one, a ``transformers`` tokenizer, or None."""
    try:
        return tokenizer_lib.as_tokenizer(tokenizer)
    except TypeError:
        raise TypeError(
            f"processing_class must be a kithara.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}."
        ) from None


def lora_config(peft_config: Any) -> LoraConfig | None:
    """kithara's ``LoraConfig`` from one, or from a ``peft.LoraConfig`` (``r``,
    ``lora_alpha``, ``target_modules`` in Hugging Face projection names)."""
    if peft_config is None or isinstance(peft_config, LoraConfig):
        return peft_config
    if hasattr(peft_config, "r") and hasattr(peft_config, "target_modules"):
        return LoraConfig.from_peft(peft_config)
    raise TypeError(f"peft_config must be a kithara.LoraConfig or a peft.LoraConfig, got {type(peft_config).__name__}.")


def as_loader(
    data: Any,
    name: str,
    tokenizer: Tokenizer | None,
    make_dataset: Callable[[Source, Tokenizer], Dataset],
    **loader_kwargs: Any,
) -> Dataloader:
    """``data`` as a Dataloader: used as is, wrapped (a dataset), or read with
    ``load_source`` and encoded by ``make_dataset(source, tokenizer)`` (raw data, which
    needs ``tokenizer``)."""
    if isinstance(data, Dataloader):
        return data
    if isinstance(data, Dataset):
        return Dataloader(data, **loader_kwargs)
    if tokenizer is None:
        raise ValueError(f"{name} is raw data: pass tokenizer= (or a model path to load it from).")
    return Dataloader(make_dataset(as_source(data, name), tokenizer), **loader_kwargs)


def as_source(data: Any, name: str) -> Source:
    """Raw data (a ``Source``, path, glob, list of dicts or Hugging Face dataset) as a
    ``Source`` of rows; refuses an empty one, naming the argument ``name``."""
    source = data if isinstance(data, Source) else load_source(data)
    if len(source) == 0:
        raise ValueError(f"{name} has no rows.")
    return source


def check_ready_data(
    config: TrainingConfig, data: Any, name: str, *, encoding: tuple[str, ...], loading: tuple[str, ...]
) -> None:
    """Refuses settings that ``data`` would ignore because it is ready: a ``Dataset`` is
    already encoded (``encoding`` fields), a ``Dataloader`` also batched (``loading`` fields).
    A setting equal to the ready data's own value is fine."""
    if isinstance(data, Dataloader):
        fields = (*encoding, *loading)
    elif isinstance(data, Dataset):
        fields = encoding
    else:
        return
    own = data.dataset if isinstance(data, Dataloader) else data
    changed = config.changed_fields()
    ignored = [
        f"{field}={changed[field]!r}"
        for field in fields
        if field in changed and changed[field] != getattr(data, field, getattr(own, field, object()))
    ]
    if ignored:
        raise ValueError(
            f"{name} is a ready {type(data).__name__}, which would ignore {', '.join(ignored)}: set "
            f"{'them' if len(ignored) > 1 else 'it'} when building it, or pass the raw data instead."
        )


def data_argument(kind: str, dataset: Any, dataloader: Any) -> tuple[str, Any]:
    """(argument name, data) of ``{kind}_dataset`` or ``{kind}_dataloader`` (at most one)."""
    if dataset is not None and dataloader is not None:
        raise ValueError(f"Pass {kind}_dataset or {kind}_dataloader, not both.")
    if dataloader is not None:
        if not isinstance(dataloader, Dataloader):
            raise TypeError(
                f"{kind}_dataloader takes a kithara.Dataloader, got {type(dataloader).__name__}; pass raw rows, "
                f"files or datasets as {kind}_dataset=."
            )
        return f"{kind}_dataloader", dataloader
    return f"{kind}_dataset", dataset
