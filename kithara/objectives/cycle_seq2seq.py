"""Cycle-training rows and batches for a seq2seq side: the synthetic text is the encoder's
source, the original text the decoder's target (its only supervised tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from kithara.data.tokenizer import Tokenizer
from kithara.models.seq2seq_model import KerasHubSeq2SeqModel


class Seq2SeqRow(NamedTuple):
    """One training example of a seq2seq side.

    Args:
        source_ids: encoder ids (BART: ``<s> source </s>``).
        decoder_ids: the decoder prefix, then the target and EOS (BART: ``</s> <s> target </s>``).
        supervised: per ``decoder_ids`` position, whether predicting it counts in the loss.
    """

    source_ids: list[int]
    decoder_ids: list[int]
    supervised: list[bool]


def source_ids(model: KerasHubSeq2SeqModel, tokenizer: Tokenizer, text: str, max_length: int) -> list[int]:
    """Encoder ids of ``text``, cut to ``max_length`` while keeping the closing EOS (the
    encoder was trained to see it at the end)."""
    ids = model.encode_source(tokenizer, text)
    return ids if len(ids) <= max_length else [*ids[: max_length - 1], ids[-1]]


def seq2seq_rows(
    model: KerasHubSeq2SeqModel,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    targets: Sequence[str],
    max_length: int,
) -> list[Seq2SeqRow]:
    """Rows mapping each source to its target, supervised on ``target EOS`` only: the decoder
    prefix (BART's ``</s> <s>``) is given at generation time, so it is not learned."""
    start = model.decoder_start_ids(tokenizer)
    rows = []
    for source, target in zip(sources, targets, strict=True):
        answer = [*tokenizer.encode(target), tokenizer.eos_id]
        rows.append(
            Seq2SeqRow(
                source_ids(model, tokenizer, source, max_length),
                [*start, *answer],
                [False] * len(start) + [True] * len(answer),
            )
        )
    return rows


def seq2seq_arrays(rows: Sequence[Seq2SeqRow], num_rows: int, length: int) -> dict[str, np.ndarray]:
    """``[num_rows, length]`` encoder inputs, decoder inputs (``decoder_ids[:-1]``), labels
    (``decoder_ids[1:]``) and masks; decoder rows are cut at the end, padding rows fully masked."""
    out = {
        "encoder_token_ids": np.zeros((num_rows, length), np.int32),
        "encoder_padding_mask": np.zeros((num_rows, length), bool),
        "decoder_token_ids": np.zeros((num_rows, length), np.int32),
        "decoder_padding_mask": np.zeros((num_rows, length), bool),
        "labels": np.zeros((num_rows, length), np.int32),
        "label_mask": np.zeros((num_rows, length), bool),
    }
    for i, row in enumerate(rows):
        source = row.source_ids[:length]
        out["encoder_token_ids"][i, : len(source)] = source
        out["encoder_padding_mask"][i, : len(source)] = True
        ids, supervised = row.decoder_ids[: length + 1], row.supervised[: length + 1]
        k = len(ids) - 1
        out["decoder_token_ids"][i, :k] = ids[:-1]
        out["decoder_padding_mask"][i, :k] = True
        out["labels"][i, :k] = ids[1:]
        out["label_mask"][i, :k] = supervised[1:]
    return out
