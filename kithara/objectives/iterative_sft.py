"""Iterative SFT: optimizer steps on batches the user builds between calls (generate,
score, filter, train), with the base Trainer's jitted step, checkpoints and logging."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import jax
import numpy as np
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.packing import empty_row
from kithara.models.model import Model
from kithara.models.seq2seq_model import KerasHubSeq2SeqModel
from kithara.objectives.configs import IterativeSFTConfig
from kithara.objectives.inputs import lora_config, resolve_model
from kithara.trainer import validation
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100  # a label that takes no part in the loss, as in Hugging Face


class IterativeSFTTrainer(Trainer):
    """Supervised fine-tuning one ``step()`` at a time, on data made between steps.

    Each ``step()`` call turns its rows into fixed-shape batches (``rows_per_step`` rows of
    ``max_length`` tokens, or the smallest of ``length_buckets`` that fits), so the jitted
    step compiles once (per bucket) however many rows each call brings. Rows beyond one
    optimizer step's worth become further steps; a short last step is filled with fully
    masked rows, which add nothing to the loss.

    Settings come from an ``IterativeSFTConfig`` (``args=``, TRL's names: ``max_length``,
    ``truncation_mode``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
    ``learning_rate``, ``max_steps`` (the length of the learning-rate schedule),
    ``output_dir`` / ``save_steps``, ...) or as its fields given as keywords.

    Args:
        model: a ``kithara.Model`` or a model directory / preset for ``KerasHubModel.from_preset``.
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer (``tokenizer=``
            too); needed for ``texts=`` (loaded from ``model`` when that is a path).
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW and
            schedule.
        args: an ``IterativeSFTConfig``.
        peft_config: LoRA adapters for a ``model`` given as a path.
        callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``IterativeSFTConfig`` fields, or the base ``Trainer``'s Kithara names.

    Example:
        >>> trainer = kithara.IterativeSFTTrainer(model, args=kithara.IterativeSFTConfig(max_length=128),
        ...                                       processing_class=tokenizer)
        >>> stats = trainer.step(texts=prompts, texts_labels=accepted_answers)
        >>> trainer.finish()
    """

    config_class = IterativeSFTConfig

    def __init__(
        self,
        model: Model | str,
        processing_class: Any = None,
        optimizer: optax.GradientTransformation | Any | None = None,
        *,
        args: IterativeSFTConfig | None = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(IterativeSFTConfig, self.resolve_config(args, **fields))
        model, tokenizer = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )
        if isinstance(model, KerasHubSeq2SeqModel):
            raise ValueError(
                "IterativeSFTTrainer trains causal LMs (each row is one token sequence); a KerasHubSeq2SeqModel "
                "needs encoder and decoder inputs. Train it with kithara.Trainer on batches of encoder_token_ids, "
                "encoder_padding_mask, decoder_token_ids, decoder_padding_mask, labels and label_mask "
                "(docs/models.md), or use a causal model here."
            )
        validation.check_vocabulary(model, tokenizer)  # the base class checks only self.tokenizer, set below
        super().__init__(
            model, optimizer, None, profiler=profiler, checkpointer=checkpointer, callbacks=callbacks, args=config
        )
        max_length, buckets = config.max_length, sorted(set(config.length_buckets or ())) or [config.max_length]
        if buckets[-1] != max_length:
            buckets.append(max_length)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = config.truncation_mode
        self.length_buckets = tuple(buckets)
        self.rows_per_micro_batch = config.per_device_train_batch_size * jax.device_count() // jax.process_count()
        if self.rows_per_micro_batch < 1:
            raise ValueError("per_device_batch_size x devices is smaller than the number of processes.")

    def step(
        self,
        input_ids: Sequence[Sequence[int]] | None = None,
        attention_mask: Sequence[Sequence[int]] | None = None,
        labels: Sequence[Sequence[int]] | None = None,
        texts: Sequence[str] | None = None,
        texts_labels: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Trains on this process's rows; returns the stats (the mean over the optimizer
        steps these rows made, with ``steps``, the last ``step`` and ``dropped_rows``: rows
        that truncation to ``max_length`` left without a loss token, which are logged too).

        Give either token ids or texts:

        - ``input_ids`` (rows of ids, any lengths), optional ``attention_mask`` (positions
          with 0 are dropped, so left or right padding both work) and optional ``labels``
          aligned with ``input_ids`` (``-100`` = no loss there). Without labels, the loss
          covers every token after the first (the causal-LM labels are the inputs shifted).
        - ``texts``, and optionally ``texts_labels``: without labels each row is
          ``[BOS] text EOS`` with the loss on every token; with them each row is
          ``[BOS] text label EOS`` with the loss on the label (completion) only.
        """
        pairs = self._rows(input_ids, attention_mask, labels, texts, texts_labels)
        if not pairs:
            raise ValueError("step() got no rows.")
        truncated = [self._truncate(ids, lab) for ids, lab in pairs]
        rows = [r for r in truncated if r is not None]
        dropped = [i for i, r in enumerate(truncated) if r is None]
        if not rows:
            raise ValueError(
                f"No row has a loss token left after truncation to max_length={self.max_length} "
                f"(truncation_mode={self.truncation_mode!r}; {len(pairs)} rows); nothing to train on. Raise "
                "max_length, shorten the prompts, or use truncation_mode='keep_end'."
            )
        if dropped:
            logger.warning("step(): dropped %d of %d rows (rows %s) left without a loss token by truncation to "
                           "max_length=%d (truncation_mode=%r).", len(dropped), len(pairs), dropped[:10],
                           self.max_length, self.truncation_mode)  # fmt: skip
        per_step = self.rows_per_micro_batch * self.gradient_accumulation_steps
        stats = [self.run_step(self._batch(rows[i : i + per_step])) for i in range(0, len(rows), per_step)]
        mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0] if k != "step"}
        return {**mean, "step": stats[-1]["step"], "steps": float(len(stats)), "dropped_rows": float(len(dropped))}

    # Rows -------------------------------------------------------------------------------

    def _rows(
        self,
        input_ids: Sequence[Sequence[int]] | None,
        attention_mask: Sequence[Sequence[int]] | None,
        labels: Sequence[Sequence[int]] | None,
        texts: Sequence[str] | None,
        texts_labels: Sequence[str] | None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, labels with -100 for no loss), aligned, for each row."""
        if (input_ids is None) == (texts is None):
            raise ValueError("Pass either input_ids (with optional attention_mask and labels) or texts, not both.")
        if texts is None:
            input_ids = cast(Sequence[Sequence[int]], input_ids)  # given: exactly one of the two is (checked above)
            if texts_labels is not None:
                raise ValueError("texts_labels goes with texts=; with input_ids= pass labels=.")
            _same_count(input_ids, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out = []
            for i, ids in enumerate(input_ids):
                ids_arr = np.asarray(ids, np.int64).reshape(-1)
                lab = ids_arr.copy() if labels is None else np.asarray(labels[i], np.int64).reshape(-1)
                keep = np.ones(len(ids_arr), bool) if attention_mask is None else np.asarray(attention_mask[i]) != 0
                if not (len(lab) == len(keep) == len(ids_arr)):
                    raise ValueError(f"Row {i}: input_ids, attention_mask and labels have different lengths.")
                out.append((ids_arr[keep], lab[keep]))
            return out
        if input_ids is not None or attention_mask is not None or labels is not None:
            raise ValueError("With texts= pass texts_labels=, not input_ids/attention_mask/labels.")
        if isinstance(texts, str) or (texts_labels is not None and isinstance(texts_labels, str)):
            raise ValueError("texts and texts_labels are lists of strings, one per row.")
        if self.tokenizer is None:
            raise ValueError("texts= needs a tokenizer: IterativeSFTTrainer(model, tokenizer, ...).")
        _same_count(texts, texts=texts, texts_labels=texts_labels)
        tok = self.tokenizer
        out = []
        for i, text in enumerate(texts):
            if texts_labels is None:
                plain = np.asarray([*tok.encode_text(text), tok.eos_id], np.int64)
                out.append((plain, plain.copy()))
                continue
            prompt = tok.encode_text(text)
            joined = tok.encode_text(text + texts_labels[i])
            answer = joined[len(prompt) :] if joined[: len(prompt)] == prompt else tok.encode(texts_labels[i])
            joined_ids = np.asarray([*prompt, *answer, tok.eos_id], np.int64)
            lab = joined_ids.copy()
            lab[: len(prompt)] = IGNORE_INDEX
            out.append((joined_ids, lab))
        return out

    def _truncate(self, ids: np.ndarray, lab: np.ndarray) -> dict[str, np.ndarray] | None:
        """Cuts a row to ``max_length + 1`` tokens (``truncation_mode``) and shifts it into
        inputs and labels; None when no loss token is left."""
        limit = self.max_length + 1
        if len(ids) > limit:
            window = slice(0, limit) if self.truncation_mode == "keep_start" else slice(len(ids) - limit, None)
            ids, lab = ids[window], lab[window]
        target = lab[1:]
        mask = target != IGNORE_INDEX
        if len(ids) < 2 or not mask.any():
            return None
        return {
            "token_ids": ids[:-1].astype(np.int32),
            "labels": np.where(mask, target, 0).astype(np.int32),
            "label_mask": mask,
        }

    def _batch(self, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``[K, B, L]`` arrays of ``rows`` (at most K x B), masked rows after them."""
        longest = max(len(r["token_ids"]) for r in rows)
        length = next(b for b in self.length_buckets if b >= longest)
        k, b = self.gradient_accumulation_steps, self.rows_per_micro_batch
        out = {key: np.stack([v] * (k * b)) for key, v in empty_row(length, packed=False).items()}
        for i, row in enumerate(rows):
            n = len(row["token_ids"])
            for key in ("token_ids", "labels", "label_mask"):
                out[key][i, :n] = row[key]
            out["padding_mask"][i, :n] = True
        return {key: v.reshape(k, b, length) for key, v in out.items()}


def _same_count(reference: Sequence[Any], **lists: Sequence[Any] | None) -> None:
    for name, values in lists.items():
        if values is not None and len(values) != len(reference):
            raise ValueError(f"{name} has {len(values)} rows, but there are {len(reference)}.")
