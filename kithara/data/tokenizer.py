"""Tokenizer: a Hugging Face or keras-hub tokenizer with its family's special-token rules."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, cast

from etils import epath

Messages = Sequence[Mapping[str, Any]]
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")  # fmt: skip


class Tokenizer:
    """Text and chat encoding with the BOS/EOS/PAD conventions of the tokenizer's family.

    Special tokens are never pasted into text as literal strings: BOS (and anything else
    the tokenizer's own post-processor adds around a sequence) comes from the tokenizer, EOS
    is appended as an id, and chat markup comes from the tokenizer's Jinja chat template.
    So a Llama 3 tokenizer starts sequences with ``<|begin_of_text|>``, a Gemma one with
    ``<bos>``, and a Qwen one with nothing, each as its own configuration says.

    Build one with ``Tokenizer.from_pretrained(dir)`` (a Hugging Face tokenizer directory,
    local or ``gs://``) or ``Tokenizer.from_keras_hub(preset_or_tokenizer)``.

    Args:
        backend: a ``transformers`` tokenizer, or a keras-hub tokenizer.
        chat_template: overrides the backend's chat template (required for chat formats
            with a keras-hub tokenizer, which carries none).

    Example:
        >>> tok = kithara.Tokenizer.from_pretrained("path/to/tokenizer_dir")
        >>> tok.encode_text("Hello")            # [bos?] + ids, no EOS
        >>> ids, assistant = tok.encode_chat(messages, tools=tools, assistant_mask=True)
    """

    def __init__(self, backend: Any, *, chat_template: str | None = None) -> None:
        self.backend = backend
        self._is_hf = hasattr(backend, "apply_chat_template")
        template = chat_template or (getattr(backend, "chat_template", None) if self._is_hf else None)
        if isinstance(template, Mapping):  # named templates (e.g. "default" and "tool_use")
            self.chat_templates: dict[str, str] = dict(template)
            if "default" not in self.chat_templates:
                raise ValueError(
                    f"The tokenizer has named chat templates {sorted(self.chat_templates)} but no 'default'; "
                    "pass chat_template= to choose one."
                )
        else:
            self.chat_templates = {"default": template} if template else {}
        self.chat_template: str | None = self.chat_templates.get("default")
        if self._is_hf:
            eos, pad, bos = backend.eos_token_id, backend.pad_token_id, backend.bos_token_id
        else:
            eos, pad, bos = backend.end_token_id, backend.pad_token_id, backend.start_token_id
        if eos is None:
            raise ValueError("The tokenizer defines no EOS token; kithara needs one to end sequences.")
        self.eos_id: int = int(eos)
        self.bos_id: int | None = None if bos is None else int(bos)
        # Padding positions are masked out of attention and loss, so any valid id will do.
        self.pad_id: int = int(pad) if pad is not None else self.eos_id
        self._prefix = self._special_prefix()
        # BOS/EOS as the chat template writes them, for encoding rendered text piece by piece.
        self._specials = {self._special_text(i): i for i in (self.bos_id, self.eos_id) if i is not None}
        self._specials.pop("", None)
        self._specials_pattern = (
            "(" + "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)) + ")"
        )

    # Construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, chat_template: str | None = None) -> Tokenizer:
        """Loads a Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``).

        ``gs://`` directories are copied to a temporary local directory first. Nothing is
        downloaded from a model hub.
        """
        import transformers

        source = epath.Path(path)
        if not source.is_dir():
            raise FileNotFoundError(f"Tokenizer directory {os.fspath(path)!r} does not exist.")
        if not any((source / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(
                f"{os.fspath(path)!r} holds no tokenizer.json, tokenizer.model or vocab.json; "
                "pass a Hugging Face tokenizer directory."
            )
        with tempfile.TemporaryDirectory() as tmp:
            local = os.fspath(path)
            if not _is_local(source):
                for name in _HF_FILES:
                    if (source / name).exists():
                        (epath.Path(tmp) / name).write_bytes((source / name).read_bytes())
                local = tmp
            try:  # never code from the directory (auto_map), whatever a prompt is answered
                backend = transformers.AutoTokenizer.from_pretrained(
                    local, local_files_only=True, trust_remote_code=False
                )
            except ValueError as error:
                if "trust_remote_code" not in str(error):
                    raise
                raise ValueError(
                    f"{os.fspath(path)!r} names custom tokenizer code (auto_map in tokenizer_config.json or "
                    "config.json), which kithara never runs: set tokenizer_class to a transformers tokenizer "
                    "class and remove auto_map."
                ) from error
        return cls(backend, chat_template=chat_template)

    @classmethod
    def from_keras_hub(cls, tokenizer: Any, *, chat_template: str | None = None) -> Tokenizer:
        """Wraps a keras-hub tokenizer, or loads one from a keras-hub preset (name or directory)."""
        if isinstance(tokenizer, str | os.PathLike):
            import keras_hub

            tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(os.fspath(tokenizer))
        return cls(tokenizer, chat_template=chat_template)

    # Encoding ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.backend) if self._is_hf else int(self.backend.vocabulary_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` alone: no BOS, no EOS."""
        if self._is_hf:
            return list(self.backend.encode(text, add_special_tokens=False))
        return [int(i) for i in self.backend.tokenize(text)]

    def encode_text(self, text: str) -> list[int]:
        """``text`` as the start of a sequence: with whatever the family puts first (BOS)."""
        return [*self._prefix, *self.encode(text)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        if self._is_hf:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return str(self.backend.detokenize(list(ids)))

    @property
    def has_generation_markers(self) -> bool:
        """Whether the chat template marks assistant text with ``{% generation %}``."""
        return bool(self.chat_template and _GENERATION_TAG.search(self.chat_template))

    def encode_chat(
        self,
        messages: Messages,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        assistant_mask: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """A conversation through the tokenizer's chat template: ``(ids, assistant_mask)``.

        ``assistant_mask[i]`` is true for tokens the template wraps in ``{% generation %}``
        (the assistant's replies); it is all false unless ``assistant_mask=True``.
        """
        tools_list = list(tools) if tools else None
        template = self._template_for(tools_list)
        if assistant_mask and not self.has_generation_markers:
            raise ValueError(
                "assistant-only loss needs a chat template that wraps assistant replies in "
                "{% generation %} ... {% endgeneration %}; this tokenizer's template has no such markers. "
                "Pass a template that has them (chat_template=...) or turn assistant-only loss off."
            )
        if assistant_mask and not _GENERATION_TAG.search(template or ""):
            raise ValueError("The tool_use chat template has no {% generation %} markers for assistant-only loss.")
        if self._is_hf:
            out = self.backend.apply_chat_template(
                list(messages),
                tools=tools_list,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=assistant_mask,
                add_generation_prompt=add_generation_prompt,
            )
            ids = list(out["input_ids"])
            mask = [bool(m) for m in out["assistant_masks"]] if assistant_mask else [False] * len(ids)
            return ids, mask
        return self._encode_chat_pieces(list(messages), tools_list, add_generation_prompt, template)

    def apply_chat_template(
        self,
        conversation: Messages,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> str | list[int]:
        """The conversation through the chat template, as ``transformers``' method of that name
        (this subset of its arguments): the rendered text with ``tokenize=False``, else its
        token ids (those of ``encode_chat``).

        Example:
            >>> prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        """
        if tokenize:
            return self.encode_chat(conversation, tools=tools, add_generation_prompt=add_generation_prompt)[0]
        tools_list = list(tools) if tools else None
        template = self._template_for(tools_list)
        if self._is_hf:
            return str(
                self.backend.apply_chat_template(
                    list(conversation),
                    tools=tools_list,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = cast(Any, render_jinja_template)(
            [list(conversation)],
            tools=tools_list,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
        )
        return str(rendered[0])

    def _template_for(self, tools: list[Any] | None) -> str:
        """The chat template to render with: the ``tool_use`` one when tools are given and it exists."""
        if not self.chat_template:
            raise ValueError(
                "This tokenizer has no chat template; pass chat_template= to Tokenizer or add one to the "
                "tokenizer directory (tokenizer_config.json or chat_template.jinja)."
            )
        return self.chat_templates.get("tool_use", self.chat_template) if tools else self.chat_template

    def _encode_chat_pieces(
        self, messages: list[Any], tools: list[Any] | None, add_generation_prompt: bool, template: str | None
    ) -> tuple[list[int], list[bool]]:
        """keras-hub tokenizers give no character offsets: encode the text between
        generation boundaries piece by piece instead."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, spans = cast(Any, render_jinja_template)(
            [messages],
            tools=tools,
            chat_template=template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
        )
        text, cuts, flags = rendered[0], [0], [False]
        for start, end in spans[0]:
            cuts += [start, end]
            flags += [True, False]
        cuts.append(len(text))
        ids: list[int] = []
        mask: list[bool] = []
        for (start, end), is_assistant in zip(itertools.pairwise(cuts), flags, strict=True):
            piece = self._encode_with_specials(text[start:end], at_start=start == 0) if end > start else []
            ids += piece
            mask += [is_assistant] * len(piece)
        return ids, mask

    # Helpers -----------------------------------------------------------------------------

    def _encode_with_specials(self, text: str, *, at_start: bool) -> list[int]:
        """Encodes a piece of rendered template text, mapping the BOS/EOS strings the template
        wrote to their ids (sentencepiece does not parse control tokens out of text)."""
        ids: list[int] = []
        for i, part in enumerate(re.split(self._specials_pattern, text) if self._specials else [text]):
            if i % 2:
                ids.append(self._specials[part])
            elif part:
                ids += self._encode_mid_text(part) if ids or not at_start else self.encode(part)
        return ids

    def _encode_mid_text(self, text: str) -> list[int]:
        """Encodes text that continues a line: sentencepiece would otherwise add the word-start
        marker it puts at the start of a string. Encoding after a newline and dropping the
        newline's ids avoids that (the same trick transformers uses)."""
        newline = self.encode("\n")
        ids = self.encode("\n" + text)
        return ids[len(newline) :] if ids[: len(newline)] == newline else self.encode(text)

    def _special_text(self, token_id: int | None) -> str:
        """A special token's string (``decode`` would drop a control token)."""
        if token_id is None:
            return ""
        if self._is_hf:
            return str(self.backend.convert_ids_to_tokens(token_id))
        return str(self.backend.id_to_token(token_id))

    def _special_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a sequence (BOS, if any).

        keras-hub tokenizers add nothing themselves (their preprocessors add BOS when the
        family has one), so the family's BOS is the prefix there. What a post-processor puts
        after a sequence is ignored: formats append EOS themselves where they need it.
        """
        if not self._is_hf:
            return [self.bos_id] if self.bos_id is not None else []
        probe = "a b"
        plain = self.backend.encode(probe, add_special_tokens=False)
        full = self.backend.encode(probe, add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start])
        return []

    def __repr__(self) -> str:
        kind = type(self.backend).__name__
        return f"Tokenizer({kind}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def as_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """A ``kithara.Tokenizer`` from one, from a ``transformers`` tokenizer (wrapped), or None."""
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "eos_token_id"):
        return Tokenizer(tokenizer)
    raise TypeError(
        f"Expected a kithara.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}; build one with "
        "kithara.Tokenizer.from_pretrained(dir) or Tokenizer.from_keras_hub(preset)."
    )


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)
