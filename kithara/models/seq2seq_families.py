"""The keras-hub encoder-decoder families kithara builds, and their token conventions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Seq2SeqArchitecture:
    """Sizes shared by encoder and decoder (``num_layers`` per stack)."""

    vocab_size: int
    num_layers: int
    hidden_dim: int
    num_heads: int
    intermediate_dim: int
    max_sequence_length: int


@dataclasses.dataclass(frozen=True)
class Seq2SeqFamily:
    """How kithara builds one keras-hub seq2seq family and frames its sequences.

    Args:
        backbone_class / lm_class: keras-hub class names.
        backbone_args: keras-hub backbone arguments for an architecture.
        source_bos: whether the encoder reads BOS before the source (EOS always ends it).
        decoder_start: ``f(eos_id, bos_id) -> ids`` the decoder reads before the target.
        position_table: whether positions are a learned table (so lengths are bounded by
            ``max_sequence_length``) rather than rotary.
    """

    backbone_class: str
    lm_class: str
    backbone_args: Callable[[Seq2SeqArchitecture], dict[str, Any]]
    source_bos: bool
    decoder_start: Callable[[int, int | None], list[int]]
    position_table: bool


def _bart_args(a: Seq2SeqArchitecture) -> dict[str, Any]:
    return dict(
        vocabulary_size=a.vocab_size,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
        hidden_dim=a.hidden_dim,
        intermediate_dim=a.intermediate_dim,
        max_sequence_length=a.max_sequence_length,
    )


def _t5gemma_args(a: Seq2SeqArchitecture) -> dict[str, Any]:
    stack = dict(
        hidden_dim=a.hidden_dim,
        intermediate_dim=a.intermediate_dim,
        num_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads,
        head_dim=a.hidden_dim // a.num_heads,
        layer_types=["full_attention"] * a.num_layers,
    )
    return {
        "vocabulary_size": a.vocab_size,
        **{f"{s}_{k}": v for s in ("encoder", "decoder") for k, v in stack.items()},
    }


def _with_bos(eos: int, bos: int | None) -> list[int]:
    if bos is None:
        raise ValueError("T5Gemma's decoder starts with BOS; the tokenizer has none.")
    return [bos]


SEQ2SEQ_FAMILIES = {
    # keras-hub's BartSeq2SeqLMPreprocessor: encoder ``<s> source </s>``, decoder
    # ``</s> <s> target </s>`` (start_value=[end, start]); Hugging Face's
    # decoder_start_token_id=</s> with forced_bos_token_id=<s> is the same.
    "bart": Seq2SeqFamily(
        "BartBackbone",
        "BartSeq2SeqLM",
        _bart_args,
        source_bos=True,
        decoder_start=lambda eos, bos: [eos] if bos is None else [eos, bos],
        position_table=True,
    ),
    # keras-hub's T5GemmaSeq2SeqLMPreprocessor: encoder ``source <eos>`` (no start token),
    # decoder ``<bos> target <eos>``. Backbone keyword arguments override the shared sizes
    # (e.g. ``encoder_num_key_value_heads``, ``tie_word_embeddings``).
    "t5gemma": Seq2SeqFamily(
        "T5GemmaBackbone",
        "T5GemmaSeq2SeqLM",
        _t5gemma_args,
        source_bos=False,
        decoder_start=_with_bos,
        position_table=False,
    ),
}
