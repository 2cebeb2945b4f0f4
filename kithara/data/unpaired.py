"""Unpaired preference data (KTO, BCO): one completion per row, labelled desirable or not.

Rows are ``{"prompt", "completion", "label"}`` (``label`` a bool), strings or chat message
lists as ``PreferenceDataset`` takes them. Paired rows (``prompt`` / ``chosen`` /
``rejected``) are unpaired into ``2 n`` rows: a first pass over the pairs takes pair ``i``'s
chosen answer (``label=True``) for even ``i`` and its rejected one for odd ``i``, a second
pass the other answer of each pair. Neighbouring rows then alternate labels and have
different prompts, so KTO's sequential batches mix desirable and undesirable rows and each
KL row is a mismatched pair. (TRL's ``unpair_preference_dataset`` puts all chosen answers
first: with KTO's sequential sampler every batch is one-sided unless the data is shuffled.)

With ``kl_batch_size`` every example also holds a mismatched sequence, prefixed ``kl_``: its
own prompt followed by the completion of the previous row of its chunk of ``kl_batch_size``
rows (the first row takes the chunk's last), TRL's KL rows for KTO's reference point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kithara.data.formats import Dataset, Example, FormatError, SkipRow, prompt_and_answer
from kithara.data.sources import RowError
from kithara.data.tokenizer import Tokenizer

UNPAIRED_FIELDS = ("prompt", "completion", "label")
PAIRED_FIELDS = ("prompt", "chosen", "rejected")


class UnpairedPreferenceDataset(Dataset):
    """``{"prompt", "completion", "label"}`` rows (or paired rows, unpaired) for KTO and BCO.

    Yields a ``token_ids`` / ``labels`` / ``label_mask`` sequence whose label mask covers the
    completion only, the per-example ``label`` (a bool), and with ``kl_batch_size`` the
    ``kl_`` sequence (this prompt, another row's completion). A row whose completion is
    truncated away is dropped.

    Args:
        data, tokenizer, max_length, truncation_mode, columns, split, file_format: as for
            every ``kithara.data`` dataset.
        kl_batch_size: build the KL rows by rotating completions within chunks of this many
            rows (KTO: the global batch size); ``None``: no KL rows (BCO, ``apo_zero_unpaired``).

    Example:
        >>> ds = UnpairedPreferenceDataset("feedback.jsonl", tokenizer, max_length=512, kl_batch_size=8)
        >>> ds[0]["label"], ds[0]["kl_token_ids"][:4]
    """

    fields = ("prompt",)
    supports_packing = False

    def __init__(self, data: Any, tokenizer: Tokenizer, *, kl_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(data, tokenizer, **kwargs)
        if kl_batch_size is not None and (not isinstance(kl_batch_size, int) or kl_batch_size < 2):
            raise ValueError(
                f"kl_batch_size must be an int >= 2 (a KL row pairs a prompt with another row's completion), "
                f"got {kl_batch_size!r}."
            )
        self.kl_batch_size = kl_batch_size
        self.sequences = ("", "kl_") if kl_batch_size else ("",)
        first = self.source[0] if len(self.source) else {}
        self.paired = isinstance(first, Mapping) and "completion" not in first and "chosen" in first

    def __len__(self) -> int:
        return 2 * len(self.source) if self.paired else len(self.source)

    def locate(self, index: int) -> tuple[int, str]:
        """``(source row, answer field)`` of unpaired row ``index``."""
        if not self.paired:
            return index, "completion"
        n = len(self.source)
        row, second_pass = index % n, index >= n
        return row, "chosen" if (row % 2 == 0) != second_pass else "rejected"

    def kl_partner(self, index: int) -> int:
        """The row whose completion follows ``index``'s prompt in its KL row."""
        size = self.kl_batch_size or 1
        start = index - index % size
        chunk = min(size, len(self) - start)
        return start + (index - start - 1) % chunk

    def __getitem__(self, index: int) -> Example | None:
        row_index, _ = self.locate(index)
        where = row_index
        try:
            prompt, completion, label = self.parts(index)
            example = self.sequence(prompt + completion, [False] * len(prompt) + [True] * len(completion))
            if example is None:
                return None
            if self.kl_batch_size:
                where = self.locate(self.kl_partner(index))[0]
                _, other, _ = self.parts(self.kl_partner(index))
                kl = self.sequence(prompt + other, [False] * len(prompt) + [True] * len(other), prefix="kl_")
                if kl is None:
                    return None
                example.update(kl)
            example["label"] = np.asarray(label, bool)
            return example
        except SkipRow as skip:
            self._count_skip(where, skip.reason)
            return None
        except FormatError as error:
            raise RowError(self.source.describe(where), error.message, error.field) from None
        except RowError:
            raise
        except Exception as error:  # a chat template's raise_exception, a tokenizer refusing input, ...
            raise RowError(self.source.describe(where), f"{type(error).__name__}: {error}") from error

    def parts(self, index: int) -> tuple[list[int], list[int], bool]:
        """Prompt tokens, completion tokens (with EOS, or as the chat template ends the
        answer) and the label of unpaired row ``index``."""
        row_index, answer = self.locate(index)
        row = self.source[row_index]
        if not isinstance(row, Mapping):
            raise FormatError(
                None, f"expected an object with fields {list(UNPAIRED_FIELDS)}, got {type(row).__name__}."
            )
        needed = PAIRED_FIELDS if self.paired else UNPAIRED_FIELDS
        missing = [f for f in needed if row.get(f) is None]
        if missing:
            other = "paired rows (prompt, chosen, rejected)" if self.paired else "unpaired rows"
            raise FormatError(
                missing[0],
                f"missing; {other} need {list(needed)} (the format is read off the first row: "
                f"{'unpaired' if not self.paired else 'paired'}).",
            )
        label = True if answer == "chosen" else False if answer == "rejected" else row["label"]
        if not isinstance(label, bool | np.bool_):
            raise FormatError("label", f"expected a bool (true: desirable, false: undesirable), got {label!r}.")
        if self.paired and row["chosen"] == row["rejected"]:
            raise SkipRow("chosen and rejected are identical")
        prompt, completion = prompt_and_answer(self.tokenizer, row, answer, self.clip)
        return prompt, completion, bool(label)

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        """Not used: rows are encoded by index (``__getitem__``), which a KL row needs."""
        raise NotImplementedError("UnpairedPreferenceDataset encodes rows by index; use dataset[i].")
