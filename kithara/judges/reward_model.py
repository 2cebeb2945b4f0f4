"""A reward model as a pairwise judge: the completion with the higher reward wins (the role of
TRL's ``PairRMJudge``, with a kithara ``ScalarHeadModel``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kithara.data.tokenizer import Tokenizer, as_tokenizer
from kithara.judges.base import BasePairwiseJudge, check_pairs
from kithara.models.scalar_head import ScalarHeadModel
from kithara.objectives.rollouts import ModelReward


class RewardModelJudge(BasePairwiseJudge):
    """A reward model as a pairwise judge (TRL's ``PairRMJudge`` role): each completion is
    scored on its own, encoded as ``RewardTrainer`` trains on it (``[BOS] prompt + completion
    EOS``, or the chat template over the conversation), and the higher reward wins; a tie goes
    to index 0. A reward model sees one completion at a time, so the order of a pair cannot
    bias it: ``shuffle_order`` is accepted for TRL's API and changes nothing.

    ``return_scores=True`` returns, per prompt, the probability that the first completion is
    the better one: ``sigmoid((r_0 - r_1) / temperature)`` (PairRM's softmax over the two
    scores). Called as a function ``judge(prompts, completions)`` with one completion per
    prompt, it returns their rewards: a GRPO / PPO reward function scored as the model was
    trained.

    Args:
        model: a ``ScalarHeadModel`` with one label, or a directory for
            ``ScalarHeadModel.from_preset`` (a ``*ForSequenceClassification`` checkpoint).
        tokenizer: a ``kithara.Tokenizer`` or ``transformers`` tokenizer; loaded from
            ``model`` when that is a directory and none is given.
        batch_size: rows scored per compiled call.

    Example:
        >>> judge = RewardModelJudge(trainer.model, tokenizer)
        >>> judge.judge(["sort cab ="], [[" abc", " cba"]])
        [0]
        >>> judge.judge(["sort cab ="], [[" abc", " cba"]], return_scores=True)
        [0.93...]
    """

    # A global program on the model's mesh: every process scores every pair (online trainers
    # and rollouts read this, as they do for ``ModelReward``).
    runs_on_every_row = True

    def __init__(self, model: ScalarHeadModel | str | os.PathLike, tokenizer: Any = None, *, batch_size: int = 64):
        tokenizer = as_tokenizer(tokenizer)
        if isinstance(model, str | os.PathLike):
            path = os.fspath(model)
            model = ScalarHeadModel.from_preset(path)
            tokenizer = tokenizer or Tokenizer.from_pretrained(path)
        if not isinstance(model, ScalarHeadModel):
            raise TypeError(
                f"RewardModelJudge needs a reward model (kithara.ScalarHeadModel) or its directory, got "
                f"{type(model).__name__}; train one with RewardTrainer or load one with ScalarHeadModel.from_preset."
            )
        if model.num_labels != 1:
            raise ValueError(
                f"RewardModelJudge needs a reward model with num_labels=1 (one score per sequence); this one has "
                f"num_labels={model.num_labels}."
            )
        if tokenizer is None:
            raise ValueError("RewardModelJudge needs tokenizer= (the reward model's tokenizer).")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.__name__ = "RewardModelJudge"
        self._scorer = ModelReward(model, tokenizer, batch_size=batch_size)

    def judge(
        self,
        prompts: list[Any],
        completions: list[list[Any]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[Any]:
        """Per prompt, the index of the better completion (ties: 0), or with ``return_scores``
        the probability that the first is better."""
        del shuffle_order  # scores are per completion: the order of a pair cannot bias them
        check_pairs(prompts, completions, "RewardModelJudge")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not prompts:
            return []
        flat_prompts = [p for p in prompts for _ in range(2)]
        scores = np.asarray(self.score(flat_prompts, [c for pair in completions for c in pair])).reshape(-1, 2)
        if return_scores:
            return [float(p) for p in 1.0 / (1.0 + np.exp(-(scores[:, 0] - scores[:, 1]) / temperature))]
        return [int(second > first) for first, second in scores]

    def score(self, prompts: list[Any], completions: list[Any]) -> list[float]:
        """The reward of each completion of its prompt."""
        if len(prompts) != len(completions):
            raise ValueError(f"score got {len(prompts)} prompts and {len(completions)} completions.")
        return self._scorer(prompts, completions)

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        """The rewards of ``completions`` (a GRPO / PPO reward function)."""
        return self.score(prompts, completions)
