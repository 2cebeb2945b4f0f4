"""A local chat model as a pairwise judge: asked which of two completions is better, it answers
0 or 1 (the role of TRL's ``HfPairwiseJudge``, with a kithara model instead of an API)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kithara import sharding as sharding_lib
from kithara.data.tokenizer import Tokenizer, as_tokenizer
from kithara.judges.base import BasePairwiseJudge, check_pairs
from kithara.judges.prompts import PAIRWISE_SYSTEM_PROMPT, pairwise_request, parse_pairwise, shuffled_pairs, unflip
from kithara.models.generation import bucket, default_stop_ids
from kithara.models.keras_hub_model import KerasHubModel

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat templates: a reply ends at them, as at EOS.


class ModelPairwiseJudge(BasePairwiseJudge):
    """A local chat model as a pairwise judge (TRL's ``HfPairwiseJudge`` role): each pair is
    put to the model as ``system_prompt`` filled with the prompt and the two completions (one
    user turn through the tokenizer's chat template, or plain text when it has none), the rows
    are decoded greedily in one batched ``generate`` call per ``batch_size`` rows, and each
    reply is read by
    ``parse_pairwise``. A reply with no clear 0 or 1 gives -1 (as TRL's judges do) and a
    logged warning quoting it.

    With ``shuffle_order=True`` (the default) a random half of the pairs is shown swapped and
    their verdicts are mapped back (``shuffled_pairs`` / ``unflip``), so a model that favours
    one position is not systematically wrong.

    Args:
        model: a ``kithara.KerasHubModel`` (any object with its ``generate(token_ids,
            max_new_tokens=..., stop_token_ids=...)`` works), or a model directory for
            ``KerasHubModel.from_preset``.
        tokenizer: a ``kithara.Tokenizer`` or ``transformers`` tokenizer; default
            ``model.tokenizer``, or the one in ``model``'s directory.
        system_prompt: the request template with ``{prompt}``, ``{response0}`` and
            ``{response1}``; default ``PAIRWISE_SYSTEM_PROMPT`` (TRL's).
        max_new_tokens: reply tokens to generate at most (the verdict is usually the first).
        batch_size: rows per ``generate`` call.
        stop_token_ids: where a reply ends; default the tokenizer's EOS, the model's
            ``generation_config.json`` EOS ids and the tokenizer's end-of-turn token.
        seed: seeds the order shuffling (None: fresh entropy each judge; with several
            processes keep an int, so every process shows the same pairs swapped).

    Example:
        >>> judge = ModelPairwiseJudge("path/to/Qwen2.5-0.5B-Instruct")
        >>> judge.judge(["What is 2 + 2?"], [["5", "4"]])
        [1]
        >>> judge.judge(["What is 2 + 2?"], [["5", "4"]], return_scores=True)  # P(first is better)
        [0.02...]
    """

    # ``generate`` is a global program on the model's mesh: every process judges every pair,
    # with the same ``seed`` so that all show the same pairs swapped.
    runs_on_every_row = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = 8,
        batch_size: int = 64,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = 0,
    ):
        tokenizer = as_tokenizer(tokenizer)
        if isinstance(model, str | os.PathLike):
            path = os.fspath(model)
            model = KerasHubModel.from_preset(path)
            tokenizer = tokenizer or Tokenizer.from_pretrained(path)
        if not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"ModelPairwiseJudge needs a chat model (kithara.KerasHubModel) or its directory, got "
                f"{type(model).__name__}."
            )
        tokenizer = tokenizer or as_tokenizer(getattr(model, "tokenizer", None))
        if tokenizer is None:
            raise ValueError(
                "ModelPairwiseJudge needs tokenizer= (the judge model's tokenizer), or set model.tokenizer."
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.system_prompt = system_prompt or PAIRWISE_SYSTEM_PROMPT
        pairwise_request("", "", "", self.system_prompt)  # check the placeholders now, not at the first judge call
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        if stop_token_ids is None:
            stop_token_ids = default_stop_ids(tokenizer, getattr(model, "hf_generation_config", None))
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self._rng = np.random.default_rng(seed)
        self._choice_logits: Any = None  # jitted on the first return_scores call
        if not tokenizer.chat_template:
            logger.info("ModelPairwiseJudge: the tokenizer has no chat template; the judge model gets plain text.")

    def encode(self, prompt: Any, first: Any, second: Any) -> list[int]:
        """The token ids the model is given to judge ``first`` (as 0) against ``second`` (as 1)."""
        request = pairwise_request(prompt, first, second, self.system_prompt)
        if self.tokenizer.chat_template:
            return self.tokenizer.encode_chat([{"role": "user", "content": request}], add_generation_prompt=True)[0]
        return self.tokenizer.encode_text(request)

    def judge(
        self,
        prompts: list[Any],
        completions: list[list[Any]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[Any]:
        """Per prompt, the index of the better completion of its pair, or -1 where the model's
        reply names neither (or both).

        Args:
            prompts: the prompts (strings, or chat message lists).
            completions: one pair ``[first, second]`` per prompt (strings or message lists).
            shuffle_order: show a random half of the pairs swapped, against position bias.
            return_scores: instead, per prompt the probability that the first completion is
                the better one: the softmax, over the tokens ``"0"`` and ``"1"`` only, of the
                model's logits for the first reply token divided by ``temperature`` (TRL's
                ``PairRMJudge`` soft judge). One forward pass, no generation; needs a
                ``KerasHubModel`` and single-token ``"0"`` and ``"1"``.
            temperature: divides those two logits (``return_scores`` only).
        """
        check_pairs(prompts, completions, "ModelPairwiseJudge")
        if return_scores and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not prompts:
            return []
        if shuffle_order:
            shown, flipped = shuffled_pairs(completions, self._rng)
        else:
            shown, flipped = [list(pair) for pair in completions], [False] * len(completions)
        rows = [self.encode(prompt, first, second) for prompt, (first, second) in zip(prompts, shown, strict=True)]
        if return_scores:
            first_better = self._first_better(rows, temperature)
            return [float(1.0 - p if flip else p) for p, flip in zip(first_better, flipped, strict=True)]
        replies = []
        for start in range(0, len(rows), self.batch_size):
            out = self.model.generate(
                rows[start : start + self.batch_size],
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=self.stop_token_ids,
            )
            replies += [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
        verdicts = []
        for i, reply in enumerate(replies):
            verdict = parse_pairwise(reply)
            if verdict is None:
                logger.warning(
                    "ModelPairwiseJudge: no verdict (0 or 1) in the reply to pair %d: %r; judged -1.", i, reply
                )
            verdicts.append(-1 if verdict is None else verdict)
        return unflip(verdicts, flipped)

    def _first_better(self, rows: list[list[int]], temperature: float) -> np.ndarray:
        """Per row, softmax over the first reply token's logits for "0" and "1", at index 0."""
        model = self.model
        if not all(hasattr(model, name) for name in ("hidden_states", "lm_head", "mesh", "variable_shardings")):
            raise TypeError(
                f"return_scores=True reads the model's logits: it needs a kithara.KerasHubModel, got "
                f"{type(model).__name__}."
            )
        choices = []
        for digit in ("0", "1"):
            ids = self.tokenizer.encode_text(digit)[len(self.tokenizer.encode_text("")) :]
            if len(ids) != 1:
                raise ValueError(
                    f"return_scores=True needs {digit!r} to be one token; this tokenizer makes it {ids}. "
                    "Judge without return_scores."
                )
            choices.append(ids[0])
        if self._choice_logits is None:
            mesh = model.mesh
            self._choice_logits = jax.jit(
                functools.partial(choice_logits, model),
                in_shardings=(model.variable_shardings, sharding_lib.batch_sharding(mesh), None),
                out_shardings=sharding_lib.replicated(mesh),
            )
        shards = sharding_lib.batch_shards(model.mesh)
        size = -(-min(bucket(len(rows), 1), self.batch_size) // shards) * shards
        length = bucket(max(len(r) for r in rows))
        logits = []
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            ids = np.zeros((size, length), np.int32)
            mask = np.zeros((size, length), bool)
            for i, r in enumerate(part):
                ids[i, : len(r)], mask[i, : len(r)] = r, True
            mask[len(part) :, 0] = True  # padding rows read one token, then are dropped
            inputs = sharding_lib.global_arrays({"token_ids": ids, "padding_mask": mask}, model.mesh)
            out = self._choice_logits(model.variables, inputs, np.asarray(choices, np.int32))
            logits.append(np.asarray(jax.device_get(out), np.float64)[: len(part)])
        scaled = np.concatenate(logits) / temperature
        return 1.0 / (1.0 + np.exp(scaled[:, 1] - scaled[:, 0]))


def choice_logits(model: Any, variables: Any, inputs: Mapping[str, jax.Array], choice_ids: jax.Array) -> jax.Array:
    """``[rows, len(choice_ids)]`` float32 logits of ``choice_ids`` for the token after each
    row's last real token (rows right-padded, ``padding_mask`` marking the real ones)."""
    hidden_BxLxH, _ = model.hidden_states(variables, inputs, training=False)
    last_B = jnp.sum(inputs["padding_mask"], axis=1).astype(jnp.int32) - 1
    last_Bx1xH = jnp.take_along_axis(hidden_BxLxH, last_B[:, None, None], axis=1)
    logits_BxV = model.lm_head(variables, last_Bx1xH)[:, 0]
    return logits_BxV[:, choice_ids].astype(jnp.float32)
