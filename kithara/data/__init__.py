"""Data: sources, tokenizer, dataset formats, packing and the Dataloader."""

from kithara.data.dataloader import DataIterator, Dataloader
from kithara.data.formats import (
    DATASETS,
    ConversationalDataset,
    Dataset,
    FormatError,
    PreferenceDataset,
    PromptCompletionDataset,
    TextDataset,
    TokenizedDataset,
    sharegpt_to_messages,
)
from kithara.data.packing import best_fit_decreasing
from kithara.data.sources import RowError, Source, load_source
from kithara.data.tokenizer import Tokenizer

__all__ = [
    "DATASETS",
    "ConversationalDataset",
    "DataIterator",
    "Dataloader",
    "Dataset",
    "FormatError",
    "PreferenceDataset",
    "PromptCompletionDataset",
    "RowError",
    "Source",
    "TextDataset",
    "TokenizedDataset",
    "Tokenizer",
    "best_fit_decreasing",
    "load_source",
    "sharegpt_to_messages",
]
