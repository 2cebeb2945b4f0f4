"""Supervised fine-tuning: the base Trainer's loss and loop, with the data set up for you."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optax

from kithara.data.formats import ConversationalDataset, Dataset, PromptCompletionDataset, TextDataset
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.model import Model
from kithara.objectives.inputs import as_loader, resolve_model
from kithara.trainer import optimizers
from kithara.trainer.trainer import Trainer

FORMATS = ("text", "prompt_completion", "conversational")


class SFTTrainer(Trainer):
    """Supervised fine-tuning on text, prompt-completion or conversational data.

    The loss is the base ``Trainer``'s next-token cross-entropy over the label mask, which
    the data format sets: every token for text, the completion only for prompt-completion
    (``completion_only_loss=True``, the default), the whole conversation or, with
    ``assistant_only_loss=True``, the assistant replies only.

    Args:
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``.
        train_dataset: a ``kithara.Dataloader`` (used as is), a ``kithara.data`` dataset, or
            raw data for ``kithara.data.load_source`` (a path, glob, list of dicts or Hugging
            Face dataset) in one of ``FORMATS``.
        tokenizer: a ``kithara.Tokenizer``; loaded from ``model`` when that is a path.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled or packed).
        dataset_format: ``"text"``, ``"prompt_completion"`` or ``"conversational"``; by
            default read off the first row's fields (``text`` / ``prompt`` + ``completion`` /
            ``messages`` or ``conversations``).
        max_seq_len: tokens per row (default 1024); longer examples are truncated.
        truncation: ``"keep_start"`` (default) or ``"keep_end"``.
        packing: pack several examples per row (needs a segment-aware model).
        completion_only_loss: prompt-completion data: loss on the completion only (default True).
        assistant_only_loss: conversational data: loss on assistant replies only (default False).
        per_device_batch_size: rows per device per micro-batch (default 1).
        length_buckets: row lengths to choose from per batch; ``None`` pads to ``max_seq_len``.
        learning_rate: for the default optimizer (default 2e-5).
        optimizer: an optax transformation or keras optimizer; default
            ``kithara.optimizers.adamw(learning_rate)``.
        seed: shuffle and step seed.
        **trainer_kwargs: the base ``Trainer``'s options (``steps``, ``epochs``,
            ``checkpointer``, ``tensorboard_dir``, ``gradient_accumulation_steps``, ...).

    Example:
        >>> trainer = kithara.SFTTrainer("path/to/model", "chats.jsonl", max_seq_len=512,
        ...                              assistant_only_loss=True, epochs=2)
        >>> trainer.train()
    """

    def __init__(
        self,
        model: Model | str,
        train_dataset: Any,
        *,
        tokenizer: Tokenizer | None = None,
        eval_dataset: Any = None,
        dataset_format: str | None = None,
        max_seq_len: int = 1024,
        truncation: str = "keep_start",
        packing: bool = False,
        completion_only_loss: bool = True,
        assistant_only_loss: bool = False,
        per_device_batch_size: int = 1,
        length_buckets: Sequence[int] | None = None,
        learning_rate: float = 2e-5,
        optimizer: optax.GradientTransformation | Any | None = None,
        seed: int = 0,
        **trainer_kwargs: Any,
    ) -> None:
        if dataset_format is not None and dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {FORMATS}, got {dataset_format!r}.")
        model, self.tokenizer = resolve_model(model, tokenizer)
        options: dict[str, Any] = dict(
            dataset_format=dataset_format,
            max_seq_len=max_seq_len,
            truncation=truncation,
            completion_only_loss=completion_only_loss,
            assistant_only_loss=assistant_only_loss,
        )
        loader_options: dict[str, Any] = dict(
            per_device_batch_size=per_device_batch_size, length_buckets=length_buckets, seed=seed
        )
        train_loader = as_loader(
            train_dataset,
            "train_dataset",
            self.tokenizer,
            lambda source, tokenizer: self._dataset(source, tokenizer, "train_dataset", **options),
            packing=packing,
            **loader_options,
        )
        eval_loader = (
            None
            if eval_dataset is None
            else as_loader(
                eval_dataset,
                "eval_dataset",
                self.tokenizer,
                lambda source, tokenizer: self._dataset(source, tokenizer, "eval_dataset", **options),
                shuffle=False,
                drop_remainder=False,
                **loader_options,
            )
        )
        super().__init__(
            model,
            optimizer if optimizer is not None else optimizers.adamw(learning_rate),
            train_loader,
            eval_loader,
            seed=seed,
            **trainer_kwargs,
        )

    def _dataset(
        self,
        source: Source,
        tokenizer: Tokenizer,
        name: str,
        *,
        dataset_format: str | None,
        max_seq_len: int,
        truncation: str,
        completion_only_loss: bool,
        assistant_only_loss: bool,
    ) -> Dataset:
        fmt = dataset_format or infer_format(source[0], name)
        if assistant_only_loss and fmt != "conversational":
            raise ValueError(f"assistant_only_loss=True applies to conversational data, but {name} is {fmt!r}.")
        common: dict[str, Any] = dict(max_seq_len=max_seq_len, truncation=truncation)
        if fmt == "text":
            return TextDataset(source, tokenizer, **common)
        if fmt == "prompt_completion":
            return PromptCompletionDataset(source, tokenizer, completion_only_loss=completion_only_loss, **common)
        return ConversationalDataset(source, tokenizer, assistant_only_loss=assistant_only_loss, **common)


def infer_format(row: Any, name: str = "the dataset") -> str:
    """The SFT format whose fields ``row`` has."""
    keys = set(row) if isinstance(row, Mapping) else set()
    if "messages" in keys or "conversations" in keys:
        return "conversational"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"Cannot tell the format of {name} from its first row's fields {sorted(keys)}: expected 'text', "
        "'prompt' + 'completion', or 'messages' / 'conversations'. Pass dataset_format= (and columns via "
        "kithara.data.load_source) or a ready dataset."
    )
