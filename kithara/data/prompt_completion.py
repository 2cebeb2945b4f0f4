"""Prompt-completion examples: tokenized, fixed length, loss on the completion only."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer


def read_jsonl(path: str | Path, fields: Sequence[str] = ("prompt", "completion")) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line raises with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
            missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(
                    f"{path}:{number}: needs string fields {list(fields)}; missing or not a string: {missing}."
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows


def encode_prompt_completion(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    max_seq_len: int,
    bos_id: int | None,
    eos_id: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray] | None:
    """One example of length ``max_seq_len``: ``[bos] prompt completion [eos]``, labels
    shifted by one, and a label mask over the completion and EOS. Too-long sequences keep
    their start; returns ``None`` when no completion token survives truncation."""
    prefix = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    sequence = (prefix + list(completion_ids) + [eos_id])[: max_seq_len + 1]
    if len(sequence) <= len(prefix):
        return None
    n = len(sequence) - 1  # input positions
    token_ids = np.full(max_seq_len, pad_id, np.int32)
    labels = np.full(max_seq_len, pad_id, np.int32)
    token_ids[:n], labels[:n] = sequence[:-1], sequence[1:]
    positions = np.arange(max_seq_len)
    return {
        "token_ids": token_ids,
        "padding_mask": positions < n,
        "labels": labels,
        "label_mask": (positions >= len(prefix) - 1) & (positions < n),
    }


def tokenize_prompt_completion(
    rows: Iterable[Mapping[str, str]],
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    bos_token: str | None = "<bos>",
    eos_token: str = "<eos>",
    pad_token: str = "<pad>",
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Tokenizes ``{"prompt", "completion"}`` rows; returns the examples and how many rows
    were dropped because truncation left them no completion token."""
    bos_id = token_id(tokenizer, bos_token) if bos_token else None
    eos_id, pad_id = token_id(tokenizer, eos_token), token_id(tokenizer, pad_token)
    examples, dropped = [], 0
    for row in rows:
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        completion = tokenizer.encode(row["completion"], add_special_tokens=False).ids
        example = encode_prompt_completion(
            prompt, completion, max_seq_len=max_seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id
        )
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"The tokenizer has no special token {token!r}.")
    return token_id
