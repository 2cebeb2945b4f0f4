"""Supervised fine-tuning: the base Trainer's loss and loop, with the data set up for you."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.formats import ConversationalDataset, Dataset, PromptCompletionDataset, TextDataset
from kithara.data.sources import Source, set_columns
from kithara.data.tokenizer import Tokenizer
from kithara.models.model import Model
from kithara.objectives.configs import SFTConfig
from kithara.objectives.inputs import as_loader, check_ready_data, lora_config, resolve_model
from kithara.trainer.config import TrainingConfig
from kithara.trainer.trainer import Trainer

FORMATS = ("text", "prompt_completion", "conversational")
# SFTConfig fields used to encode raw data, and to batch it: a ready dataset or loader has its own.
ENCODING_FIELDS = (
    "max_length",
    "truncation_mode",
    "completion_only_loss",
    "assistant_only_loss",
    "dataset_text_field",
    "dataset_format",
)
LOADING_FIELDS = ("packing", "length_buckets", "skip_bad_rows")


class SFTTrainer(Trainer):
    """Supervised fine-tuning on text, prompt-completion or conversational data.

    The loss is the base ``Trainer``'s next-token cross-entropy over the label mask, which
    the data format sets: every token for text, the completion only for prompt-completion
    (``completion_only_loss``, the default), the whole conversation or, with
    ``assistant_only_loss=True``, the assistant replies only.

    Settings come from an ``SFTConfig`` (``args=``) or as its fields given as keywords, with
    TRL's names (``max_length``, ``truncation_mode``, ``packing``,
    ``per_device_train_batch_size``, ``num_train_epochs``, ``learning_rate``, ...); the base
    ``Trainer``'s Kithara names (``steps``, ``epochs``, ...) work too.

    Args:
        model: a ``kithara.Model``, or a model directory / preset for ``KerasHubModel.from_preset``
            (built with ``peft_config`` and, with ``bf16``, ``precision="mixed_bfloat16"``).
        train_dataset: a ``kithara.Dataloader`` (used as is), a ``kithara.data`` dataset, or
            raw data for ``kithara.data.load_source`` (a path, glob, list of dicts or Hugging
            Face dataset) in one of ``FORMATS``.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled or packed).
        args: an ``SFTConfig``.
        processing_class: a ``kithara.Tokenizer`` or a ``transformers`` tokenizer (TRL's
            name; ``tokenizer=`` is accepted too); loaded from ``model`` when that is a path.
        peft_config: a ``kithara.LoraConfig`` or ``peft.LoraConfig`` for a ``model`` given as a
            path (a built model must already carry the same adapters).
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule.
        callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``SFTConfig`` fields, or the base ``Trainer``'s Kithara names.

    Example:
        >>> trainer = kithara.SFTTrainer("path/to/model", "chats.jsonl",
        ...     args=kithara.SFTConfig(max_length=512, assistant_only_loss=True, num_train_epochs=2))
        >>> trainer.train()
    """

    config_class = SFTConfig

    def __init__(
        self,
        model: Model | str,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        args: SFTConfig | None = None,
        processing_class: Any = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        optimizer: optax.GradientTransformation | Any | None = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        if train_dataset is None:
            raise ValueError("SFTTrainer needs train_dataset: text, prompt-completion or conversational data.")
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(SFTConfig, self.resolve_config(args, **fields))
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if isinstance(data, TrainingConfig):
                raise TypeError(
                    f"SFTTrainer got a config as {name}: its positional order is (model, train_dataset, "
                    "eval_dataset); pass the config as args=."
                )
            check_ready_data(config, data, name, encoding=ENCODING_FIELDS, loading=LOADING_FIELDS)
        model, self.tokenizer = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )
        loader_options: dict[str, Any] = dict(
            length_buckets=config.length_buckets, seed=config.seed, skip_bad_rows=config.skip_bad_rows
        )
        train_loader = as_loader(
            train_dataset,
            "train_dataset",
            self.tokenizer,
            lambda source, tok: self._dataset(source, tok, "train_dataset", config),
            per_device_batch_size=config.per_device_train_batch_size,
            packing=config.packing,
            **loader_options,
        )
        eval_loader = (
            None
            if eval_dataset is None
            else as_loader(
                eval_dataset,
                "eval_dataset",
                self.tokenizer,
                lambda source, tok: self._dataset(source, tok, "eval_dataset", config),
                per_device_batch_size=config.eval_batch_size,
                shuffle=False,
                drop_remainder=False,
                **loader_options,
            )
        )
        super().__init__(
            model,
            optimizer,
            train_loader,
            eval_loader,
            profiler=profiler,
            checkpointer=checkpointer,
            callbacks=callbacks,
            args=config,
        )

    def _dataset(self, source: Source, tokenizer: Tokenizer, name: str, config: SFTConfig) -> Dataset:
        fmt = config.dataset_format or infer_format(source[0], name, text_field=config.dataset_text_field)
        if config.assistant_only_loss and fmt != "conversational":
            raise ValueError(f"assistant_only_loss=True applies to conversational data, but {name} is {fmt!r}.")
        common: dict[str, Any] = dict(max_length=config.max_length, truncation_mode=config.truncation_mode)
        if fmt == "text":
            if config.dataset_text_field != "text":
                set_columns(source, {config.dataset_text_field: "text"})
            return TextDataset(source, tokenizer, **common)
        if fmt == "prompt_completion":
            completion_only = config.completion_only_loss is not False
            return PromptCompletionDataset(source, tokenizer, completion_only_loss=completion_only, **common)
        return ConversationalDataset(source, tokenizer, assistant_only_loss=config.assistant_only_loss, **common)


def infer_format(row: Any, name: str = "the dataset", *, text_field: str = "text") -> str:
    """The SFT format whose fields ``row`` has."""
    keys = set(row) if isinstance(row, Mapping) else set()
    if "messages" in keys or "conversations" in keys:
        return "conversational"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if text_field in keys:
        return "text"
    raise ValueError(
        f"Cannot tell the format of {name} from its first row's fields {sorted(keys)}: expected {text_field!r} "
        "(dataset_text_field), 'prompt' + 'completion', or 'messages' / 'conversations'. Pass dataset_format= "
        "(and columns via kithara.data.load_source) or a ready dataset."
    )
