"""From generated token ids to an OpenAI choice: text, stop strings and finish reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kithara.serve.protocol import FinishReason


@dataclasses.dataclass(frozen=True)
class FinishedText:
    """One choice's final text.

    Attributes:
        text: the completion, cut before the first stop string.
        finish_reason: ``"stop"`` (a stop token or stop string ended it) or ``"length"``.
        num_tokens: completion tokens (up to and including the stop token, or up to the token
            that completed a stop string).
    """

    text: str
    finish_reason: FinishReason
    num_tokens: int


def finish_text(tokens: Sequence[int], stopped: bool, tokenizer: Any, stop: Sequence[str]) -> FinishedText:
    """The choice for ``tokens`` (the stop token excluded) that ended at a stop token
    (``stopped``) or at its length limit, cut at the earliest of the ``stop`` strings.

    Example:
        >>> finish_text([5, 6, 7], False, tokenizer, ["\\n"])  # text up to the first newline
    """
    tokens = list(tokens)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = first_stop(full, stop)
    if cut is None:
        return FinishedText(full, "stop" if stopped else "length", len(tokens) + int(stopped))
    # The shortest prefix holding a whole stop string: its last token completed it.
    count = next(
        i
        for i in range(1, len(tokens) + 1)
        if first_stop(tokenizer.decode(tokens[:i], skip_special_tokens=True), stop) is not None
    )
    return FinishedText(full[:cut], "stop", count)


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest of the ``stop`` strings starts in ``text`` (None: none does)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None
