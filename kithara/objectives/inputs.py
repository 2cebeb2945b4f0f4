"""What the objective trainers accept besides built objects: model paths and raw data.

``SFTTrainer`` and ``DPOTrainer`` take a ``kithara.Model`` or a model directory / preset,
and a ``Dataloader``, a ``kithara.data`` dataset, or raw data (a path, glob, list of dicts
or Hugging Face dataset) that they tokenize with the trainer's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kithara.data.dataloader import Dataloader
from kithara.data.formats import Dataset
from kithara.data.sources import Source, load_source
from kithara.data.tokenizer import Tokenizer
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import Model


def resolve_model(model: Model | str, tokenizer: Tokenizer | None) -> tuple[Model, Tokenizer | None]:
    """``(model, tokenizer)``: a path or preset is loaded with ``KerasHubModel.from_preset``,
    and the tokenizer, when not given, from the same directory."""
    if isinstance(model, str):
        return KerasHubModel.from_preset(model), tokenizer or Tokenizer.from_pretrained(model)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a kithara.Model or a model directory / preset, got {type(model).__name__}.")
    return model, tokenizer


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
    source = load_source(data)
    if len(source) == 0:
        raise ValueError(f"{name} has no rows.")
    return Dataloader(make_dataset(source, tokenizer), **loader_kwargs)
