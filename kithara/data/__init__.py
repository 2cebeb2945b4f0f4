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
from kithara.data.reward_data import RewardDataset
from kithara.data.sources import RowError, Source, load_source
from kithara.data.stepwise import StepwiseDataset
from kithara.data.tokenizer import Tokenizer
from kithara.data.unpaired import UnpairedPreferenceDataset

__all__ = [
    "DATASETS",
    "ConversationalDataset",
    "DataIterator",
    "Dataloader",
    "Dataset",
    "FormatError",
    "PreferenceDataset",
    "PromptCompletionDataset",
    "RewardDataset",
    "RowError",
    "Source",
    "StepwiseDataset",
    "TextDataset",
    "TokenizedDataset",
    "Tokenizer",
    "UnpairedPreferenceDataset",
    "best_fit_decreasing",
    "load_source",
    "sharegpt_to_messages",
]
