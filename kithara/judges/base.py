"""TRL's judge interfaces: a judge returns one verdict per prompt.

``BaseJudge`` is the root; ``BasePairwiseJudge`` picks the better of two completions (0 or 1),
``BaseRankJudge`` ranks any number of completions, ``BaseBinaryJudge`` says whether one
completion meets a constraint (1 or 0), and ``AllTrueJudge`` combines binary judges (CGPO's
mixture of judges). A verdict of -1 means the judge could not decide (a failed call to an
external model, an unreadable reply); callers handle it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any


class BaseJudge(abc.ABC):
    """A judge of completions; subclasses implement ``judge`` (TRL's ``BaseJudge``)."""

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[Any], shuffle_order: bool = True) -> list[Any]:
        """One verdict per prompt."""


class BasePairwiseJudge(BaseJudge):
    """A judge of completion pairs (TRL's ``BasePairwiseJudge``): ``judge`` returns, per
    prompt, the index (0 or 1) of the better completion of its pair, or -1 where the judge
    could not decide (a failed call to an external model, say).

    Example:
        >>> class Shorter(BasePairwiseJudge):
        ...     def judge(self, prompts, completions, shuffle_order=True):
        ...         return [int(len(b) < len(a)) for a, b in completions]
        >>> Shorter().judge(["hi"], [["hello there", "hey"]])
        [1]
    """

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[int]:
        """Per prompt, the index of the better of its two completions.

        Args:
            prompts: the prompts (strings, or chat message lists).
            completions: one pair ``[first, second]`` per prompt.
            shuffle_order: present each pair in a random order, against position bias.
        """


class BaseRankJudge(abc.ABC):
    """A judge that ranks each prompt's completions (TRL's ``BaseRankJudge``): ``judge``
    returns, per prompt, the indices of its completions from best to worst (``[1, 2, 0]``:
    the second is best, then the third, then the first).

    Example:
        >>> class ShortestFirst(BaseRankJudge):
        ...     def judge(self, prompts, completions, shuffle_order=True):
        ...         check_ranked(prompts, completions, "ShortestFirst")
        ...         return [sorted(range(len(c)), key=lambda i: len(c[i])) for c in completions]
        >>> ShortestFirst().judge(["capital of France:"], [[" Paris!", " Lyon", " Paris"]])
        [[1, 2, 0]]
    """

    @abc.abstractmethod
    def judge(self, prompts: list[Any], completions: list[list[Any]], shuffle_order: bool = True) -> list[list[int]]:
        """Per prompt, its completions' indices, best first.

        Args:
            prompts: the prompts (strings, or chat message lists).
            completions: per prompt, a list of its completions (any number, at least one).
            shuffle_order: present each prompt's completions in a random order, against
                position bias.
        """


class BaseBinaryJudge(BaseJudge):
    """A judge of whether each completion meets a constraint (TRL's ``BaseBinaryJudge``, the
    CGPO paper's binary judges, section 4.1.4): ``judge`` returns per prompt 1 (met), 0 (not
    met) or -1 (the judge could not decide).

    Example:
        >>> class EndsWithPeriod(BaseBinaryJudge):
        ...     def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        ...         return [int(c.endswith(".")) for c in completions]
        >>> EndsWithPeriod().judge(["a", "b"], ["Yes.", "no"])
        [1, 0]
    """

    @abc.abstractmethod
    def judge(  # type: ignore[override]  # TRL: gold_completions comes before shuffle_order
        self,
        prompts: list[Any],
        completions: list[Any],
        gold_completions: list[Any] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Per prompt, whether its completion meets the constraint: 1, 0, or -1 (failed).

        Args:
            prompts: the prompts (strings, or chat message lists).
            completions: one completion per prompt.
            gold_completions: a reference completion per prompt, for judges that compare.
            shuffle_order: present inputs in a random order, against position bias.
        """


class AllTrueJudge(BaseBinaryJudge):
    """Binary judges combined (TRL's ``AllTrueJudge``, CGPO's mixture of judges): per prompt 1
    when every judge says 1, -1 when any judge failed (-1), else 0.

    Args:
        judges: the ``BaseBinaryJudge`` instances to combine (at least one).

    Example:
        >>> class Short(BaseBinaryJudge):
        ...     def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        ...         return [int(len(c) < 8) for c in completions]
        >>> class Polite(BaseBinaryJudge):
        ...     def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        ...         return [int("please" in c) for c in completions]
        >>> AllTrueJudge([Short(), Polite()]).judge(["", "", ""], ["please", "please do it", "hm"])
        [1, 0, 0]
    """

    def __init__(self, judges: Sequence[BaseBinaryJudge]):
        judges = list(judges)
        if not judges:
            raise ValueError("AllTrueJudge needs at least one judge in judges=[...].")
        for i, judge in enumerate(judges):
            if not isinstance(judge, BaseBinaryJudge):
                raise TypeError(
                    f"AllTrueJudge combines binary judges (kithara.judges.BaseBinaryJudge); judges[{i}] is a "
                    f"{type(judge).__name__}."
                )
        self.judges = judges

    def judge(  # type: ignore[override]  # TRL: gold_completions comes before shuffle_order
        self,
        prompts: list[Any],
        completions: list[Any],
        gold_completions: list[Any] | None = None,
        shuffle_order: bool = True,
    ) -> list[int]:
        """Per prompt 1 if all judges say 1, -1 if any says -1, else 0."""
        check_completions(prompts, completions, "AllTrueJudge")
        if gold_completions is not None and len(gold_completions) != len(prompts):
            raise ValueError(f"AllTrueJudge got {len(prompts)} prompts and {len(gold_completions)} gold_completions.")
        verdicts = []
        for judge in self.judges:
            out = list(judge.judge(prompts, completions, gold_completions, shuffle_order))
            name = type(judge).__name__
            if len(out) != len(prompts):
                raise ValueError(f"{name} returned {len(out)} verdicts for {len(prompts)} prompts.")
            bad = [v for v in out if v not in (0, 1, -1)]
            if bad:
                raise ValueError(f"{name} returned {bad[0]!r}; a binary judge returns 1, 0 or -1 per prompt.")
            verdicts.append(out)
        combined = []
        for row in zip(*verdicts, strict=True):
            combined.append(-1 if -1 in row else int(all(v == 1 for v in row)))
        return combined


def check_completions(prompts: Sequence[Any], completions: Sequence[Any], who: str) -> None:
    """Raise ``ValueError`` unless there is one completion (or group of them) per prompt."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"{who}.judge got {len(prompts)} prompts and {len(completions)} completions; give one per prompt."
        )


def check_pairs(prompts: Sequence[Any], completions: Sequence[Any], who: str) -> None:
    """Raise ``ValueError`` unless ``completions`` holds one pair ``[first, second]`` per prompt."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"{who}.judge got {len(prompts)} prompts and {len(completions)} completion pairs; give one pair per prompt."
        )
    for i, pair in enumerate(completions):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"completions[{i}] must be a pair [first, second] ({who} compares two completions per prompt), "
                f"got {pair!r:.80}."
            )


def check_ranked(prompts: Sequence[Any], completions: Sequence[Any], who: str) -> None:
    """Raise ``ValueError`` unless ``completions`` holds a non-empty list of completions per prompt."""
    check_completions(prompts, completions, who)
    for i, group in enumerate(completions):
        if isinstance(group, str) or not isinstance(group, Sequence) or not group:
            raise ValueError(
                f"completions[{i}] must be a non-empty list of completions ({who} ranks them), got {group!r:.80}."
            )
