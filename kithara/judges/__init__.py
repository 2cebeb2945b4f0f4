"""Judges: verdicts on completions (TRL's judge API).

Interfaces (``base``): ``BaseJudge``, ``BasePairwiseJudge`` (which of two completions is
better), ``BaseRankJudge`` (rank any number), ``BaseBinaryJudge`` (does a completion meet a
constraint) and ``AllTrueJudge`` (binary judges combined). Judges: ``RewardModelJudge`` (a
kithara reward model, TRL's ``PairRMJudge`` role), ``ModelPairwiseJudge`` (a local kithara
chat model asked which is better, TRL's ``HfPairwiseJudge`` role) and ``OpenAIPairwiseJudge``
(an OpenAI-compatible server). ``prompts`` holds what the model-asking judges share.
"""

from __future__ import annotations

from typing import Any

from kithara.judges.base import (
    AllTrueJudge,
    BaseBinaryJudge,
    BaseJudge,
    BasePairwiseJudge,
    BaseRankJudge,
    check_completions,
    check_pairs,
    check_ranked,
)
from kithara.judges.model_judge import ModelPairwiseJudge
from kithara.judges.prompts import (
    PAIRWISE_SYSTEM_PROMPT,
    as_text,
    pairwise_request,
    parse_pairwise,
    shuffled_pairs,
    unflip,
)
from kithara.judges.reward_model import RewardModelJudge

__all__ = [
    "PAIRWISE_SYSTEM_PROMPT",
    "AllTrueJudge",
    "BaseBinaryJudge",
    "BaseJudge",
    "BasePairwiseJudge",
    "BaseRankJudge",
    "ModelPairwiseJudge",
    "OpenAIPairwiseJudge",
    "RewardModelJudge",
    "as_text",
    "check_completions",
    "check_pairs",
    "check_ranked",
    "pairwise_request",
    "parse_pairwise",
    "shuffled_pairs",
    "unflip",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: the OpenAI judge needs the optional ``openai`` client.
    if name == "OpenAIPairwiseJudge":
        from kithara.judges.openai_judge import OpenAIPairwiseJudge

        return OpenAIPairwiseJudge
    raise AttributeError(f"module 'kithara.judges' has no attribute {name!r}")
