"""RewardDataset: preference pairs encoded for a reward model, as TRL's ``RewardTrainer`` does."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kithara.data.formats import Dataset, Example, FormatError, SkipRow, _messages, _tools
from kithara.data.tokenizer import Tokenizer


class RewardDataset(Dataset):
    """``{"prompt", "chosen", "rejected"}`` rows, or TRL's implicit-prompt ``{"chosen",
    "rejected"}``, each a string or a list of chat messages, with an optional numeric ``margin``.

    Each answer becomes one whole sequence, as TRL's ``RewardTrainer`` tokenizes it: text
    rows are ``[BOS] prompt + answer EOS``, chat rows the chat template over the prompt
    messages followed by the answer messages. The reward is read at the sequence's last token.
    A pair whose chosen or rejected sequence is longer than ``max_length`` tokens is skipped
    (TRL filters it; counted in ``skipped``), never truncated: a cut sequence would lose the
    token its reward is read at.

    Yields ``chosen_token_ids`` / ``rejected_token_ids`` (the full sequences; ``labels`` equal
    the ids and ``label_mask`` is all true: only its "any" matters, marking a real pair) and a
    per-pair ``margin`` (the row's ``margin``, else ``margin=``).

    Args:
        data: as for every ``kithara.data`` dataset (path, glob, list of dicts, HF dataset).
        tokenizer: a ``kithara.Tokenizer`` or ``transformers`` tokenizer.
        max_length: tokens per sequence; longer pairs are skipped.
        margin: the margin of rows without a ``margin`` field.

    Example:
        >>> ds = RewardDataset([{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 1.0}],
        ...                    tokenizer, max_length=64)
    """

    fields = ("chosen", "rejected")
    sequences = ("chosen_", "rejected_")
    supports_packing = False

    def __init__(self, data: Any, tokenizer: Tokenizer, *, margin: float = 0.0, **kwargs: Any) -> None:
        super().__init__(data, tokenizer, **kwargs)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number, got {margin!r}.")
        self.margin = float(margin)

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        example: Example = {}
        for answer in ("chosen", "rejected"):
            ids = reward_tokens(self.tokenizer, row.get("prompt"), row[answer], answer, self.clip, _tools(row))
            if len(ids) > self.max_length:
                raise SkipRow(f"{answer} has more than max_length={self.max_length} tokens (TRL filters such pairs)")
            ids_arr = np.asarray(ids, np.int32)
            example[f"{answer}_token_ids"] = ids_arr
            example[f"{answer}_labels"] = ids_arr.copy()
            example[f"{answer}_label_mask"] = np.ones(len(ids_arr), bool)
        example["margin"] = np.asarray(row_margin(row, self.margin), np.float32)
        return example


def row_margin(row: Mapping[str, Any], default: float) -> float:
    """The row's ``margin`` (a finite number) or ``default`` when the row has none."""
    value = row.get("margin")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise FormatError("margin", f"expected a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(float(value)):
        raise FormatError("margin", f"expected a finite number, got {value!r}.")
    return float(value)


def reward_tokens(
    tokenizer: Tokenizer,
    prompt: Any,
    answer: Any,
    field: str = "completion",
    clip: Callable[[str], str] = lambda text: text,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The token ids a reward model scores for ``prompt`` (``None``: the implicit-prompt form)
    followed by ``answer``: ``[BOS] prompt + answer EOS`` for strings, the chat template over
    both message lists for chat, with ``tools`` (texts first clipped by ``clip``). ``field``
    names the answer in errors."""
    if isinstance(answer, str):
        if prompt is not None and not isinstance(prompt, str):
            raise FormatError("prompt", f"expected a string like {field!r}, got {type(prompt).__name__}.")
        return [*tokenizer.encode_text(clip((prompt or "") + answer)), tokenizer.eos_id]
    if not isinstance(answer, list):
        raise FormatError(field, f"expected a string or a list of messages, got {type(answer).__name__}.")
    if prompt is not None and not isinstance(prompt, list):
        raise FormatError("prompt", f"expected a list of messages like {field!r}, got {type(prompt).__name__}.")
    rows = {field: answer} if prompt is None else {"prompt": prompt, field: answer}
    messages = [*(_messages(rows, "prompt") if prompt is not None else []), *_messages(rows, field)]
    messages = [{**m, "content": clip(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
    ids, _ = tokenizer.encode_chat(messages, tools=tools)
    return list(ids)
