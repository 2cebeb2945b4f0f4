"""StepwiseDataset: step-by-step solutions with a correctness label per step (process supervision)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kithara.data.formats import Dataset, Example, FormatError
from kithara.data.tokenizer import Tokenizer


class StepwiseDataset(Dataset):
    """``{"prompt": str, "completions": [step, ...], "labels": [bool, ...]}`` rows for a process
    reward model (TRL's stepwise-supervision format), encoded as TRL's ``PRMTrainer`` does.

    The row is ``[BOS] prompt step_1 separator step_2 separator ...`` (each piece tokenized on
    its own, without special tokens; BOS only if the tokenizer has one). Step ``i``'s label
    (1 correct, 0 wrong) sits on the last token of ``step_i + separator``; every other position
    is unlabelled. With ``train_on_last_step_only`` only the last step is labelled. The joined
    steps are cut to ``max_completion_length`` tokens and the row to ``max_length`` (both keep
    the start; TRL's order); ``max_prompt_length`` keeps the prompt's last tokens. A row left
    with no label is dropped.

    Yields ``token_ids`` (the row), ``labels`` (0 / 1 at labelled positions, 0 elsewhere) and
    ``label_mask`` (the labelled positions), not shifted: a label is about its own token.

    Args:
        data: as for every ``kithara.data`` dataset (path, glob, list of dicts, HF dataset).
        tokenizer: a ``kithara.Tokenizer`` or ``transformers`` tokenizer.
        max_length: tokens per row.
        step_separator: text after every step (TRL's default ``"\\n"``).
        train_on_last_step_only: label only the last step.
        max_prompt_length / max_completion_length: token limits of the prompt and the joined steps.

    Example:
        >>> ds = StepwiseDataset([{"prompt": "2+2=?", "completions": ["2+2=4", "so 4"],
        ...                        "labels": [True, True]}], tokenizer, max_length=128)
    """

    fields = ("prompt", "completions", "labels")
    supports_packing = False

    def __init__(
        self,
        data: Any,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        step_separator: str = "\n",
        train_on_last_step_only: bool = False,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data, tokenizer, max_length=max_length, **kwargs)
        if not isinstance(step_separator, str):
            raise ValueError(f"step_separator must be a string, got {type(step_separator).__name__}.")
        for name, limit in (("max_prompt_length", max_prompt_length), ("max_completion_length", max_completion_length)):
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise ValueError(f"{name} must be a positive int or None, got {limit!r}.")
        self.step_separator = step_separator
        self.train_on_last_step_only = bool(train_on_last_step_only)
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self._separator_ids = self.tokenizer.encode(step_separator)

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        prompt, steps, labels = _checked_row(row)
        if self.max_prompt_length is None:
            prompt_ids = self.tokenizer.encode(self.clip(prompt))
        else:  # the prompt's end (a clip would keep its start)
            prompt_ids = self.tokenizer.encode(prompt)
            prompt_ids = prompt_ids[max(0, len(prompt_ids) - self.max_prompt_length) :]
        if self.tokenizer.bos_id is not None:
            prompt_ids = [self.tokenizer.bos_id, *prompt_ids]
        step_labels: list[bool | None] = list(labels)
        if self.train_on_last_step_only:
            unlabelled: list[bool | None] = [None] * (len(labels) - 1)
            step_labels = [*unlabelled, labels[-1]]
        completion_ids: list[int] = []
        targets: list[int | None] = []
        for i, (step, label) in enumerate(zip(steps, step_labels, strict=True)):
            ids = [*self.tokenizer.encode(self.clip(step)), *self._separator_ids]
            if not ids:
                raise FormatError(
                    f"completions[{i}]",
                    "the step and step_separator tokenize to no token, so the step's label has no position; "
                    "drop the empty step or use a separator that is a token.",
                )
            completion_ids += ids
            targets += [None] * (len(ids) - 1) + [None if label is None else int(label)]
        if self.max_completion_length is not None:
            completion_ids = completion_ids[: self.max_completion_length]
            targets = targets[: self.max_completion_length]
        ids_all = (prompt_ids + completion_ids)[: self.max_length]
        targets = ([None] * len(prompt_ids) + targets)[: self.max_length]
        mask = np.asarray([t is not None for t in targets], bool)
        if not mask.any():
            return None
        return {
            "token_ids": np.asarray(ids_all, np.int32),
            "labels": np.asarray([0 if t is None else t for t in targets], np.int32),
            "label_mask": mask,
        }


def _checked_row(row: Mapping[str, Any]) -> tuple[str, list[str], list[bool]]:
    """``(prompt, steps, labels)`` of a row, or a ``FormatError`` naming the bad field."""
    prompt, steps, labels = row["prompt"], row["completions"], row["labels"]
    if not isinstance(prompt, str):
        raise FormatError("prompt", f"expected a string, got {type(prompt).__name__}.")
    if not isinstance(steps, list | tuple) or not steps:
        raise FormatError("completions", f"expected a non-empty list of step strings, got {type(steps).__name__}.")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise FormatError(f"completions[{i}]", f"expected a string, got {type(step).__name__}.")
    if not isinstance(labels, list | tuple):
        raise FormatError("labels", f"expected a list of booleans (one per step), got {type(labels).__name__}.")
    if len(labels) != len(steps):
        raise FormatError(
            "labels", f"has {len(labels)} labels for {len(steps)} completions; give one boolean per step."
        )
    for i, label in enumerate(labels):
        if not isinstance(label, bool | np.bool_):
            raise FormatError(f"labels[{i}]", f"expected a boolean (is step {i} correct?), got {label!r}.")
    return prompt, list(steps), [bool(label) for label in labels]
