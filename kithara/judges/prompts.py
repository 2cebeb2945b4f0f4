"""What every pairwise judge that asks a language model shares: the request text, reading the
model's reply, and shuffling pairs against position bias.

``PAIRWISE_SYSTEM_PROMPT`` is TRL's ``DEFAULT_PAIRWISE_SYSTEM_PROMPT`` verbatim (``{prompt}``,
``{response0}``, ``{response1}`` placeholders); ``pairwise_request`` fills it,
``parse_pairwise`` reads the verdict (0 or 1) from a reply, and ``shuffled_pairs`` /
``unflip`` present a random share of the pairs swapped and map the verdicts back, as TRL's
judges do with ``shuffle_order=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PAIRWISE_SYSTEM_PROMPT = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{prompt}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "0",
        "output": """{response0}"""
    }},
    {{
        "model_identifier": "1",
        "output": """{response1}"""
    }}
}}

## Task

Evaluate the models on the basis of the quality and relevance of their results, and select the model that generated the best result. Reply with the identifier of the best model. Our evaluation will only take into account the first character of your answer, so make sure it contains only one of the identifiers and nothing else (no quotation marks, no spaces, no new lines, ...).
'''  # noqa: E501

_PLACEHOLDERS = ("{prompt}", "{response0}", "{response1}")


def as_text(value: Any) -> str:
    """A prompt or completion as text: a string as is; a chat message list rendered as TRL's
    ``SIMPLE_CHAT_TEMPLATE`` renders it for a judge (``"Role: content"`` per message, blank
    lines between, without the trailing blank line).

    Example:
        >>> as_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}])
        'User: hi\\n\\nAssistant: hey'
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, Mapping) for m in value):
        raise TypeError(
            f"a judge takes prompts and completions as strings or chat message lists "
            f"([{{'role': ..., 'content': ...}}, ...]), got {type(value).__name__}: {value!r:.80}"
        )
    lines = []
    for message in value:
        if "role" not in message or "content" not in message:
            raise ValueError(f"a chat message needs 'role' and 'content', got keys {sorted(message)}.")
        lines.append(f"{str(message['role']).capitalize()}: {_content_text(message['content'])}")
    return "\n\n".join(lines)


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def pairwise_request(prompt: Any, first: Any, second: Any, system_prompt: str = PAIRWISE_SYSTEM_PROMPT) -> str:
    """The text a pairwise judge model is asked: ``system_prompt`` with ``{prompt}``,
    ``{response0}`` and ``{response1}`` filled (chat message lists rendered by ``as_text``).

    Args:
        prompt: the prompt (a string, or chat messages).
        first: the completion shown as model ``0``.
        second: the completion shown as model ``1``.
        system_prompt: a ``str.format`` template with the three placeholders (literal braces
            doubled, as in ``PAIRWISE_SYSTEM_PROMPT``).

    Example:
        >>> pairwise_request("2+2=", "4", "5", "Q: {prompt} A0: {response0} A1: {response1}")
        'Q: 2+2= A0: 4 A1: 5'
    """
    missing = [p for p in _PLACEHOLDERS if p not in system_prompt]
    if missing:
        raise ValueError(
            f"system_prompt lacks the placeholder(s) {', '.join(missing)}; a pairwise judge's prompt needs "
            f"{{prompt}}, {{response0}} and {{response1}} (double any literal braces: '{{{{')."
        )
    try:
        return system_prompt.format(prompt=as_text(prompt), response0=as_text(first), response1=as_text(second))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"system_prompt is not a valid str.format template ({err!r}); double literal braces ('{{{{', '}}}}') "
            f"and use only {{prompt}}, {{response0}}, {{response1}}."
        ) from err


# A reasoning model's hidden thoughts: never the answer.
_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
# 0 or 1 standing alone: not part of a number ("10", "0.5", "1st") or a word ("v1").
_DIGIT = re.compile(r"(?<![\w.])([01])(?![\w]|\.\d)")
# An answer given with a label: "Answer: 1", "the best model is 0", "identifier: \"1\"".
_LABELLED = re.compile(
    r"(?:answer|verdict|identifier|choice|winner|best(?:\s+(?:model|response|output))?)"
    r"\s*(?:is|:|=)?\s*(?:model|response|output)?\s*[\"'`*(\[]*([01])(?![\w]|\.\d)",
    re.IGNORECASE,
)
_WRAPPING = "\"'`*_()[]{}<>. \t\r\n"
# The reply opens with its answer, then explains (TRL's prompt: only the first character
# counts): "1\n\nModel 0 repeats...", "0. Model 1 is wrong", "1 (model 0 is off-topic)". The
# identifier must end there: followed by a line break, punctuation, "(" or nothing, not by
# "or 1" ("0 or 1" is no answer), a word ("1st") or more digits ("10", "0.5").
_LEADING = re.compile(r"^[\s\"'`*_(\[]*([01])(?!\.\d)[\"'`*_)\]]*(?=[ \t]*(?:\n|[.:,;!\u2014-]|\(|$))")


def parse_pairwise(reply: str) -> int | None:
    """The verdict (0 or 1) in a judge model's reply, or None when there is none or it is
    ambiguous.

    Read in this order: the reply is the bare identifier (``"1"``, ``" '0' "``, ``"1."``,
    ``"**1**"``); else the reply opens with it and explains after a line break, punctuation
    or a parenthesis (``"0. Model 1 is wrong"``, ``"1 (model 0 is off-topic)"``: TRL's prompt
    says only the first character counts); else an answer given with a label (``"Answer: 1"``, ``"The best model is
    0"``) names one identifier; else ``0`` or ``1`` stands alone in it, one of the two only
    (``"I pick model 1 because it is shorter."``, ``"response 0"``). Both as answers (``"0 or
    1"``), neither, or another number (``"2"``, ``"10"``, ``"0.5"``) give None. A reasoning
    model's ``<think>...</think>`` block is ignored.

    Example:
        >>> [parse_pairwise(r) for r in ["1", " '0'\\n", "Answer: 1", "model 0 is better", "0 or 1", "2"]]
        [1, 0, 1, 0, None, None]
    """
    if not isinstance(reply, str):
        raise TypeError(f"parse_pairwise takes the judge model's reply as a str, got {type(reply).__name__}.")
    text = _THINK.sub(" ", reply)
    bare = text.strip(_WRAPPING)
    if bare in ("0", "1"):
        return int(bare)
    leading = _LEADING.match(text)
    if leading:
        return int(leading.group(1))
    for pattern in (_LABELLED, _DIGIT):
        found = {int(m.group(1)) for m in pattern.finditer(text)}
        if len(found) == 1:
            return found.pop()
        if found:
            return None  # both identifiers given as answers
    return None


def shuffled_pairs(
    pairs: Sequence[Sequence[Any]], rng: np.random.Generator | int | None = None
) -> tuple[list[list[Any]], list[bool]]:
    """The pairs in the order a judge is shown them, each swapped with probability 1/2 (TRL's
    ``shuffle_order``), and which were swapped; ``unflip`` maps verdicts on the shown pairs
    back to the given order.

    Args:
        pairs: one ``[first, second]`` per prompt.
        rng: a ``numpy.random.Generator``, a seed, or None for fresh entropy.

    Example:
        >>> shown, flipped = shuffled_pairs([["a", "b"], ["c", "d"]], rng=0)
        >>> unflip([0 if s[0] in "ac" else 1 for s in shown], flipped)  # a judge that picks a or c
        [0, 0]
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shown, flipped = [], []
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"completions[{i}] must be a pair [first, second], got {pair!r:.80}.")
        flip = bool(rng.integers(2))
        shown.append([pair[1], pair[0]] if flip else [pair[0], pair[1]])
        flipped.append(flip)
    return shown, flipped


def unflip(verdicts: Sequence[int], flipped: Sequence[bool]) -> list[int]:
    """Verdicts on shown pairs mapped back to the given order: a swapped pair's 0 is 1 and its
    1 is 0; -1 (the judge could not decide) stays -1.

    Example:
        >>> unflip([0, 1, -1], [True, False, True])
        [1, 1, -1]
    """
    if len(verdicts) != len(flipped):
        raise ValueError(f"unflip got {len(verdicts)} verdicts for {len(flipped)} pairs.")
    out = []
    for i, (verdict, flip) in enumerate(zip(verdicts, flipped, strict=True)):
        if verdict not in (0, 1, -1):
            raise ValueError(f"verdict {i} is {verdict!r}; a pairwise judge returns 0, 1 or -1 per pair.")
        out.append(1 - int(verdict) if flip and verdict != -1 else int(verdict))
    return out
