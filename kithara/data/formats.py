"""Dataset classes: rows of user data in one format, encoded into token ids, labels and masks.

Every dataset yields, per sequence, three equal-length 1-D arrays (unpadded): ``token_ids``,
``labels`` (the next token at each position) and ``label_mask`` (which labels count in the
loss). Preference rows yield two sequences, prefixed ``chosen_`` and ``rejected_``. Padding,
packing and batching happen in the Dataloader.
"""

from __future__ import annotations

import abc
import collections
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kithara.data.sources import RowError, Source, load_source
from kithara.data.tokenizer import Tokenizer, as_tokenizer

logger = logging.getLogger(__name__)

Example = dict[str, np.ndarray]
TRUNCATIONS = ("keep_start", "keep_end")
# Roles a chat message may have; another (like "bot") is a data error, not a new speaker.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
# Texts longer than this many characters per max_length token are clipped before tokenizing.
CLIP_CHARS_PER_TOKEN = 16
_CLIP_MIN_CHARS = 8192
_LOGGED_SKIPS = 5  # per reason and dataset; the rest are only counted (Dataset.skipped)
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


class FormatError(ValueError):
    """A row that does not fit its format; ``Dataset.__getitem__`` adds the file and row."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"field {field!r}: {message}" if field else message)


class SkipRow(Exception):
    """A well-formed row that would teach nothing (identical preference answers, empty text).

    ``Dataset.__getitem__`` counts it in ``Dataset.skipped``, logs the first few, and
    yields ``None`` for it, as for a row that truncation leaves without loss tokens.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Dataset(abc.ABC):
    """Rows from a source (file, list, Hugging Face dataset), encoded one at a time.

    Rows are read and tokenized lazily, by index, so each process of a multi-host job
    touches only the rows of its own shard. ``dataset[i]`` is the example of row ``i``, or
    ``None`` when truncation leaves it no loss token or the row would teach nothing (an
    empty text, a preference pair whose answers are identical: counted by reason in
    ``skipped`` and logged); a bad row raises ``RowError`` naming the file, row and field.

    A text far longer than ``max_length`` tokens can use is clipped before it is tokenized
    (to the part that truncation keeps, with a margin checked to tokenize the same), so a
    multi-megabyte line costs time and memory in proportion to ``max_length``, not to its size.

    Args:
        data: a path (local or ``gs://``; JSONL, JSON, Parquet, CSV, text), a glob, a list
            of paths, a list of dicts, or a Hugging Face ``Dataset`` / ``DatasetDict`` (also
            as a ``save_to_disk`` directory).
        tokenizer: a ``kithara.Tokenizer`` (a ``transformers`` tokenizer is wrapped in one).
        max_length: model input length; longer sequences are truncated.
        truncation_mode: ``"keep_start"`` (drop the end) or ``"keep_end"`` (drop the start).
        columns: renames source fields to this format's fields, e.g. ``{"question": "prompt"}``.
        split: the split of a ``DatasetDict``.
        file_format: force a file format instead of inferring it from the suffix.
    """

    fields: tuple[str, ...] = ()  # fields every row must have
    sequences: tuple[str, ...] = ("",)  # output field prefixes, one per sequence
    supports_packing = True

    def __init__(
        self,
        data: Any,
        tokenizer: Tokenizer | None,
        *,
        max_length: int,
        truncation_mode: str = "keep_start",
        columns: Mapping[str, str] | None = None,
        split: str | None = None,
        file_format: str | None = None,
    ) -> None:
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}.")
        if truncation_mode not in TRUNCATIONS:
            raise ValueError(f"truncation_mode must be one of {TRUNCATIONS}, got {truncation_mode!r}.")
        if isinstance(data, Source) and (columns or split or file_format):
            raise ValueError("columns=, split= and file_format= apply when loading data; pass them to load_source().")
        self.source = (
            data if isinstance(data, Source) else load_source(data, format=file_format, columns=columns, split=split)
        )
        self._tokenizer = as_tokenizer(tokenizer)
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.skipped: collections.Counter[str] = collections.Counter()  # rows skipped, by reason

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer.")
        return self._tokenizer

    def __len__(self) -> int:
        """Rows in the source (before any are dropped)."""
        return len(self.source)

    def __getitem__(self, index: int) -> Example | None:
        row = self.source[index]
        try:
            if not isinstance(row, Mapping):
                raise FormatError(
                    None, f"expected an object with fields {list(self.fields)}, got {type(row).__name__}."
                )
            missing = [f for f in self.fields if row.get(f) is None]
            if missing:
                raise FormatError(missing[0], f"missing; rows of this format need {list(self.fields)}.")
            return self.encode(row)
        except SkipRow as skip:
            self._count_skip(index, skip.reason)
            return None
        except FormatError as error:
            raise RowError(self.source.describe(index), error.message, error.field) from None
        except RowError:
            raise
        except Exception as error:  # a chat template's raise_exception, a tokenizer refusing input, ...
            raise RowError(self.source.describe(index), f"{type(error).__name__}: {error}") from error

    @abc.abstractmethod
    def encode(self, row: Mapping[str, Any]) -> Example | None:
        """The example for a row that has all of ``fields``; raises ``SkipRow`` for a row that
        would teach nothing."""

    def _count_skip(self, index: int, reason: str) -> None:
        self.skipped[reason] += 1
        count = self.skipped[reason]
        if count <= _LOGGED_SKIPS:
            more = (
                " (further rows skipped for this reason are counted in dataset.skipped)"
                if count == _LOGGED_SKIPS
                else ""
            )
            logger.warning("%s: skipping the row: %s%s", self.source.describe(index), reason, more)

    def clip(self, text: str) -> str:
        """``text``, or for a text far longer than ``max_length`` tokens, the part of it that
        truncation keeps (its start, or its end with ``keep_end``) plus a margin.

        The part is grown by doubling until the tokens truncation keeps no longer change
        when it grows, so the clipped text gives the same kept tokens as the whole text.
        """
        limit = self.max_length + 1
        chars = max(_CLIP_MIN_CHARS, CLIP_CHARS_PER_TOKEN * limit)
        if len(text) <= 2 * chars:
            return text
        from_end = self.truncation_mode == "keep_end"

        def part(n: int) -> str:
            return text[len(text) - n :] if from_end else text[:n]

        def kept(ids: list[int]) -> list[int]:
            return ids[len(ids) - limit :] if from_end else ids[:limit]

        previous = self.tokenizer.encode(part(chars))
        while 2 * chars < len(text):
            chars *= 2
            current = self.tokenizer.encode(part(chars))
            if len(previous) > limit and kept(previous) == kept(current):
                return part(chars)
            previous = current
        return text

    def sequence(self, ids: Sequence[int], targets: Sequence[bool], prefix: str = "") -> Example | None:
        """Truncates a token sequence and shifts it into inputs and labels."""
        limit = self.max_length + 1  # n + 1 tokens give n (input, label) positions
        if len(ids) > limit:
            window = slice(0, limit) if self.truncation_mode == "keep_start" else slice(len(ids) - limit, len(ids))
            ids, targets = ids[window], targets[window]
        ids_arr = np.asarray(ids, np.int32)
        label_mask = np.asarray(targets[1:], bool)
        if not label_mask.any():
            return None
        return {f"{prefix}token_ids": ids_arr[:-1], f"{prefix}labels": ids_arr[1:], f"{prefix}label_mask": label_mask}


class TextDataset(Dataset):
    """Continued pretraining on ``{"text": ...}``: ``[BOS] text EOS``, loss on every token."""

    fields = ("text",)

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        text = _string(row, "text")
        if not text.strip():
            raise SkipRow("empty text")
        ids = [*self.tokenizer.encode_text(self.clip(text)), self.tokenizer.eos_id]
        return self.sequence(ids, [True] * len(ids))


class PromptCompletionDataset(Dataset):
    """``{"prompt", "completion"}``, both strings or both message lists.

    Strings become ``[BOS] prompt completion EOS``; message lists go through the chat
    template (prompt with the generation prompt, then prompt + completion). The loss covers
    the completion only unless ``completion_only_loss=False``.
    """

    fields = ("prompt", "completion")

    def __init__(self, data: Any, tokenizer: Tokenizer, *, completion_only_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(data, tokenizer, **kwargs)
        self.completion_only_loss = completion_only_loss

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        if row["prompt"] == "" and row["completion"] == "":
            raise SkipRow("empty prompt and completion")
        prompt, completion = prompt_and_answer(self.tokenizer, row, "completion", self.clip)
        targets = [not self.completion_only_loss] * len(prompt) + [True] * len(completion)
        return self.sequence(prompt + completion, targets)


class ConversationalDataset(Dataset):
    """``{"messages": [{"role", "content"}, ...]}`` (optional ``tools``) or ShareGPT
    ``{"conversations": [{"from", "value"}, ...]}``, through the tokenizer's chat template.

    With ``assistant_only_loss=True`` only the assistant replies count in the loss; that
    needs a template that marks them with ``{% generation %}``.
    """

    fields = ()

    def __init__(self, data: Any, tokenizer: Tokenizer, *, assistant_only_loss: bool = False, **kwargs: Any) -> None:
        super().__init__(data, tokenizer, **kwargs)
        if not tokenizer.chat_template:
            raise ValueError(
                "ConversationalDataset needs a tokenizer with a chat template (Tokenizer(chat_template=))."
            )
        if assistant_only_loss and not tokenizer.has_generation_markers:
            raise ValueError(
                "assistant_only_loss=True needs a chat template that wraps assistant replies in "
                "{% generation %} ... {% endgeneration %}; this tokenizer's template has none. "
                "Pass one with Tokenizer(..., chat_template=...) or set assistant_only_loss=False."
            )
        self.assistant_only_loss = assistant_only_loss

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        if row.get("messages") is not None:
            messages = _messages(row, "messages")
        elif row.get("conversations") is not None:
            messages = sharegpt_to_messages(row["conversations"])
        else:
            raise FormatError("messages", "missing; conversational rows need 'messages' (or ShareGPT 'conversations').")
        messages = _clip_messages(messages, self.clip)
        ids, assistant = self.tokenizer.encode_chat(
            messages, tools=_tools(row), assistant_mask=self.assistant_only_loss
        )
        return self.sequence(ids, assistant if self.assistant_only_loss else [True] * len(ids))


class PreferenceDataset(Dataset):
    """``{"prompt", "chosen", "rejected"}``: strings, or a prompt message list with chosen and
    rejected assistant message lists. Yields ``chosen_*`` and ``rejected_*`` sequences whose
    label masks cover the answers only; a pair is dropped if either answer is truncated away.
    """

    fields = ("prompt", "chosen", "rejected")
    sequences = ("chosen_", "rejected_")
    supports_packing = False

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        pairs = {answer: prompt_and_answer(self.tokenizer, row, answer, self.clip) for answer in ("chosen", "rejected")}
        if self.truncation_mode == "keep_end":
            # Cut the same prompt tokens from both, so chosen and rejected keep the same context.
            longest = max(len(p) + len(a) for p, a in pairs.values())
            cut = max(0, longest - (self.max_length + 1))
            pairs = {k: (p[cut:], a) for k, (p, a) in pairs.items()}
        example: Example = {}
        for answer, (prompt, completion) in pairs.items():
            targets = [False] * len(prompt) + [True] * len(completion)
            sequence = self.sequence(prompt + completion, targets, prefix=f"{answer}_")
            if sequence is None:
                return None
            example.update(sequence)
        if all(
            np.array_equal(example[f"chosen_{k}"], example[f"rejected_{k}"])
            for k in ("token_ids", "labels", "label_mask")
        ):
            # The DPO loss is ln 2 with zero gradient on such a pair: it trains nothing.
            same = row["chosen"] == row["rejected"]
            raise SkipRow("chosen and rejected are identical" + ("" if same else " after truncation to max_length"))
        return example


class TokenizedDataset(Dataset):
    """Rows that are token ids already: ``token_ids``, ``labels`` (shifted by one) and
    ``label_mask``, plus an optional ``padding_mask`` whose true entries are a prefix (the
    padding is stripped, so the Dataloader can pad or pack the rows again). Other fields must
    be per-example scalars; they reach the batch as ``[batch]`` arrays (not when packing).
    """

    fields = ("token_ids", "labels", "label_mask")

    def __init__(self, data: Any, *, max_length: int, **kwargs: Any) -> None:
        super().__init__(data, None, max_length=max_length, **kwargs)

    def encode(self, row: Mapping[str, Any]) -> Example | None:
        arrays = {f: np.asarray(row[f]) for f in (*self.fields, "padding_mask") if row.get(f) is not None}
        shapes = {f: a.shape for f, a in arrays.items()}
        if len(set(shapes.values())) != 1 or len(shapes["token_ids"]) != 1:
            raise FormatError(None, f"fields must be 1-D arrays of one length, got shapes {shapes}.")
        length = len(arrays["token_ids"])
        if "padding_mask" in arrays:
            valid = arrays.pop("padding_mask").astype(bool)
            length = int(valid.sum())
            if not valid[:length].all():
                raise FormatError("padding_mask", "true entries must come first (right padding).")
        window = slice(0, min(length, self.max_length))
        if self.truncation_mode == "keep_end":
            window = slice(max(0, length - self.max_length), length)
        example = {
            "token_ids": arrays["token_ids"][window].astype(np.int32),
            "labels": arrays["labels"][window].astype(np.int32),
            "label_mask": arrays["label_mask"][window].astype(bool),
        }
        for key, value in row.items():  # per-example scalars (weights, rewards, ...) travel along
            if key not in example and key != "padding_mask":
                value = np.asarray(value)
                if value.ndim or value.dtype.kind not in "biuf":
                    raise FormatError(key, f"extra fields must be numeric per-example scalars, got {value!r}.")
                example[key] = value
        return example if example["label_mask"].any() else None


DATASETS: dict[str, type[Dataset]] = {
    "text": TextDataset,
    "prompt_completion": PromptCompletionDataset,
    "conversational": ConversationalDataset,
    "preference": PreferenceDataset,
}


def sharegpt_to_messages(conversations: Any) -> list[dict[str, Any]]:
    """ShareGPT turns (``{"from", "value"}``) as chat messages (``{"role", "content"}``)."""
    if not isinstance(conversations, list) or not conversations:
        raise FormatError("conversations", "expected a non-empty list of {'from', 'value'} turns.")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise FormatError(f"conversations[{i}]", "expected an object with string 'from' and 'value'.")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise FormatError(
                f"conversations[{i}].from", f"unknown speaker {turn['from']!r}; known: {sorted(SHAREGPT_ROLES)}."
            )
        if not isinstance(turn["value"], str):
            raise FormatError(f"conversations[{i}].value", f"expected a string, got {type(turn['value']).__name__}.")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def prompt_and_answer(
    tokenizer: Tokenizer, row: Mapping[str, Any], answer: str, clip: Callable[[str], str] = lambda text: text
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer that follows it, for plain or chat rows
    (texts first clipped by ``clip``)."""
    prompt = row["prompt"]
    if not isinstance(prompt, str | list):
        raise FormatError("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}.")
    if isinstance(prompt, str):
        prompt, answer_text = clip(prompt), clip(_string(row, answer))
        # Tokenize the joined text, as the model will see it at inference: encoding the answer
        # alone would, with sentencepiece, start it with a spurious word-start token.
        prompt_ids = tokenizer.encode_text(prompt)
        joined = tokenizer.encode_text(prompt + answer_text)
        if joined[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, [*joined[len(prompt_ids) :], tokenizer.eos_id]
        # A token spans the boundary: keep the prompt's own tokens and encode the answer alone.
        return prompt_ids, [*tokenizer.encode(answer_text), tokenizer.eos_id]
    prompt_messages = _clip_messages(_messages(row, "prompt"), clip)
    answer_messages = _clip_messages(_messages(row, answer), clip)
    tools = _tools(row)
    prompt_ids, _ = tokenizer.encode_chat(prompt_messages, tools=tools, add_generation_prompt=True)
    full_ids, _ = tokenizer.encode_chat([*prompt_messages, *answer_messages], tools=tools)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise FormatError(
            answer,
            "the chat template renders the prompt differently once the answer follows it, so the answer's "
            "tokens cannot be told apart; use a template whose generation prompt is a prefix of the next turn.",
        )
    return prompt_ids, full_ids[len(prompt_ids) :]


def _string(row: Mapping[str, Any], field: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise FormatError(field, f"expected a string, got {type(value).__name__}.")
    return value


def _messages(row: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    value = row[field]
    if not isinstance(value, list) or not value:
        raise FormatError(field, f"expected a non-empty list of messages, got {type(value).__name__}.")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise FormatError(f"{field}[{i}]", "expected a message object with a string 'role'.")
        if message["role"] not in CHAT_ROLES:
            raise FormatError(
                f"{field}[{i}].role",
                f"unknown role {message['role']!r}; the known roles are {list(CHAT_ROLES)} "
                "(map the dataset's names to them first, e.g. 'bot' or 'gpt' to 'assistant').",
            )
        message = dict(message)
        if message.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(message["tool_calls"], f"{field}[{i}].tool_calls")
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise FormatError(f"{field}[{i}].content", f"expected a string, got {type(content).__name__}.")
        messages.append(message)
    return messages


def _tool_calls(calls: Any, field: str) -> list[dict[str, Any]]:
    """A message's tool calls, checked: a list (or a JSON string of one) of
    ``{"type": "function", "function": {"name", "arguments"}}`` whose arguments are a JSON
    object (a dict, or a string holding one)."""
    if isinstance(calls, str):  # stored as a JSON string, as some datasets do
        calls = _json(calls, field)
    if not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls):
        raise FormatError(field, f"expected a list of tool-call objects, got {type(calls).__name__}.")
    for j, call in enumerate(calls):
        function = call.get("function", call)
        where = f"{field}[{j}]" + (".function" if "function" in call else "")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise FormatError(where, "expected {'name': str, 'arguments': {...}}.")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            arguments = _json(arguments, f"{where}.arguments")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise FormatError(f"{where}.arguments", f"expected a JSON object, got {type(arguments).__name__}.")
    return [dict(c) for c in calls]


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(field, f"not valid JSON ({error.msg} at column {error.colno}): {text[:80]!r}.") from None


def _clip_messages(messages: list[dict[str, Any]], clip: Callable[[str], str]) -> list[dict[str, Any]]:
    """``messages`` with each string content clipped."""
    return [{**m, "content": clip(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]


def _tools(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # tools stored as a JSON string, as some datasets do
        tools = _json(tools, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise FormatError("tools", "expected a list of tool (JSON schema) objects.")
    return [dict(t) for t in tools]
