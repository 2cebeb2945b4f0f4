"""Batched, jitted, KV-cached decoding for keras-hub encoder-decoder models (BART, T5Gemma).

The source is encoded once (with the decoder prefix) by keras-hub's ``_build_cache``; then
``call_decoder_with_cache`` writes one token per ``lax.while_loop`` iteration. The two
families' cache APIs differ, so each has a small ``start`` / ``next`` pair in ``CACHE_API``.
Sources, new-token counts and the batch are padded to power-of-two buckets
(``generation.bucket``), so repeated calls reuse one compiled program per bucket, and any
variables of the model's structure go in without recompiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kithara.models.generation import DecodePrograms, bucket, cut_at_stop, put_rows
from kithara.models.model import ModelVariables
from kithara.models.sampling import choose_tokens

if TYPE_CHECKING:
    from kithara.models.seq2seq_model import KerasHubSeq2SeqModel

# (index, decoder token ids, family cache state, rows done, rng) carried through the loop.
_Carry = tuple[jax.Array, jax.Array, Any, jax.Array, jax.Array]


def _bart_start(
    lm: Any, encoder_ids: jax.Array, encoder_mask: jax.Array, decoder_ids: jax.Array, prefix: jax.Array
) -> Any:
    """BART: encoder states, its cross-attention cache and the decoder's self-attention cache
    (slots past the prefix are overwritten before they are attended to)."""
    del prefix
    _, encoder_states, self_cache, cross_cache = lm._build_cache(encoder_ids, encoder_mask, decoder_ids)
    return self_cache, cross_cache, encoder_states, encoder_mask


def _bart_next(lm: Any, state: Any, token_Bx1: jax.Array, index: jax.Array) -> tuple[jax.Array, Any]:
    self_cache, cross_cache, encoder_states, encoder_mask = state
    logits, _, self_cache, _ = lm.call_decoder_with_cache(
        encoder_hidden_states=encoder_states,
        encoder_padding_mask=encoder_mask,
        decoder_token_ids=token_Bx1,
        self_attention_cache=self_cache,
        self_attention_cache_update_index=index,
        cross_attention_cache=cross_cache,
        cross_attention_cache_update_index=None,  # reuse the encoder's keys/values
    )
    return logits, (self_cache, cross_cache, encoder_states, encoder_mask)


def _t5gemma_start(
    lm: Any, encoder_ids: jax.Array, encoder_mask: jax.Array, decoder_ids: jax.Array, prefix: jax.Array
) -> Any:
    """T5Gemma: its cache (self and cross attention) and the encoder output; the decoder
    mask covers the prefix, as in keras-hub's own ``generate_step``."""
    decoder_mask = (jnp.arange(decoder_ids.shape[1])[None] < prefix).astype(jnp.int32)
    decoder_mask = jnp.broadcast_to(decoder_mask, decoder_ids.shape)
    _, cache, (encoder_states, encoder_mask) = lm._build_cache(encoder_ids, encoder_mask, decoder_ids, decoder_mask)
    return cache, encoder_states, encoder_mask


def _t5gemma_next(lm: Any, state: Any, token_Bx1: jax.Array, index: jax.Array) -> tuple[jax.Array, Any]:
    cache, encoder_states, encoder_mask = state
    logits, _, cache = lm.call_decoder_with_cache(token_Bx1, None, cache, index, encoder_states, encoder_mask)
    return logits, (cache, encoder_states, encoder_mask)


# family -> (start, next): ``start`` runs the encoder and fills the caches; ``next`` feeds the
# token at ``index`` and returns the logits of the one after it.
CACHE_API = {"bart": (_bart_start, _bart_next), "t5gemma": (_t5gemma_start, _t5gemma_next)}


class Seq2SeqGenerator(DecodePrograms):
    """Decodes with one ``KerasHubSeq2SeqModel``; one jitted program per sampling mode."""

    model: KerasHubSeq2SeqModel

    def __call__(
        self,
        sources: Sequence[Sequence[int]],
        decoder_start: Sequence[int],
        max_new_tokens: int,
        *,
        variables: ModelVariables,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop_token_ids: Sequence[int],
        rng: jax.Array,
        min_p: float | None = None,
    ) -> list[list[int]]:
        """Up to ``max_new_tokens`` decoder tokens per source after ``decoder_start``, each
        row cut before its first stop token."""
        longest = max(len(s) for s in sources)
        prefix = len(decoder_start)
        table = self.model.max_sequence_length
        limit = table if table is not None else 2**31 - 1
        if longest > limit or prefix + max_new_tokens > limit:
            raise ValueError(
                f"A source of {longest} tokens or {prefix} + {max_new_tokens} decoder tokens exceeds the "
                f"model's max_sequence_length={limit}."
            )
        mesh = self.model.mesh
        rows = len(sources)
        padded_rows = self._padded_rows(rows)
        # Buckets never pass the position table; padding beyond a row's length is masked anyway.
        source_len = min(bucket(longest), limit)
        total = min(bucket(prefix) + bucket(max_new_tokens), limit)
        encoder_ids = np.zeros((padded_rows, source_len), np.int32)
        encoder_mask = np.zeros((padded_rows, source_len), np.int32)
        for i in range(padded_rows):
            source = sources[i if i < rows else 0]
            encoder_ids[i, : len(source)] = source
            encoder_mask[i, : len(source)] = 1
        decoder_ids = np.zeros((padded_rows, total), np.int32)
        decoder_ids[:, :prefix] = list(decoder_start)
        inputs = [*(put_rows(a, mesh, by_row=True) for a in (encoder_ids, encoder_mask, decoder_ids)),
                  jnp.int32(prefix), jnp.int32(prefix + max_new_tokens)]  # fmt: skip
        out = self._run(variables, inputs, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        stop_token_ids=stop_token_ids, rng=rng)  # fmt: skip
        return [cut_at_stop(out[i, prefix : prefix + max_new_tokens].tolist(), stop_token_ids) for i in range(rows)]

    def _decode(  # type: ignore[override]
        self,
        variables: ModelVariables,
        encoder_ids_BxS: jax.Array,
        encoder_mask_BxS: jax.Array,
        decoder_ids_BxT: jax.Array,
        start: jax.Array,
        end: jax.Array,
        stop_ids_K: jax.Array,
        rng: jax.Array,
        temperature: jax.Array,
        top_k: jax.Array,
        top_p: jax.Array,
        min_p: jax.Array,
        *,
        greedy: bool,
        filtered: bool,
    ) -> jax.Array:
        """The decoder ids with positions ``start .. end - 1`` written (rows that stopped keep
        zeros after their stop token)."""
        lm = self.model.seq2seq_lm
        mapping = self.model.state_mapping(variables)
        batch = decoder_ids_BxT.shape[0]
        start_fn, next_fn = CACHE_API[self.model.family]
        with keras.StatelessScope(state_mapping=mapping):
            cache = start_fn(lm, encoder_ids_BxS, encoder_mask_BxS, decoder_ids_BxT, start)

        def body(carry: _Carry) -> _Carry:
            index, ids_BxT, cache, done_B, rng = carry
            last_Bx1 = jax.lax.dynamic_slice(ids_BxT, (0, index - 1), (batch, 1))
            with keras.StatelessScope(state_mapping=mapping):
                logits_Bx1xV, cache = next_fn(lm, cache, last_Bx1, index - 1)
            rng, key = jax.random.split(rng)
            chosen_B = choose_tokens(
                logits_Bx1xV[:, 0], key, temperature, top_k, top_p, min_p, greedy=greedy, filtered=filtered
            )
            ids_BxT = ids_BxT.at[:, index].set(jnp.where(done_B, ids_BxT[:, index], chosen_B))
            stopped_B = (chosen_B[:, None] == stop_ids_K[None]).any(-1)
            done_B = done_B | stopped_B | (index + 1 >= end)
            return index + 1, ids_BxT, cache, done_B, rng

        def cond(carry: _Carry) -> jax.Array:
            index, _, _, done_B, _ = carry
            return (index < end) & ~done_B.all()

        carry = (start, decoder_ids_BxT, cache, jnp.zeros((batch,), bool), rng)
        return jax.lax.while_loop(cond, body, carry)[1]
