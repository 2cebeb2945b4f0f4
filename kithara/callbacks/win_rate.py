"""The policy's win rate against its reference on fixed prompts, as a pairwise judge sees it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kithara.callbacks.base import Callback, StepInfo
from kithara.callbacks.log_completions import CompletionGenerator, Prompt, state_variables, summary_writer
from kithara.models.model import ModelVariables

logger = logging.getLogger(__name__)


class WinRateCallback(Callback):
    """At every evaluation (and every ``every`` steps, if set), continues the prompts with
    the current weights and asks ``judge`` which is better, the reference's completion or
    the policy's: ``eval_win_rate`` is the share of prompts the policy wins (TRL's
    ``WinRateCallback``, whose formula this keeps: a verdict of -1, undecided, counts as a
    loss). The reference completions are generated once, when training begins; the first
    entry of ``history`` is the reference judged against itself at the starting step (TRL's
    baseline: 0.5 from an unbiased judge with ``shuffle_order``, else the judge's position bias).

    A callback cannot add to the trainer's evaluation metrics, so each value is logged, kept
    in ``history`` as ``(step, win_rate)`` and written to TensorBoard as ``eval/win_rate``
    (with ``use_soft_judge``, also ``eval/avg_win_prob``, in ``soft_history``). Every process
    generates and judges (the decode runs on the whole mesh; a kithara model judge does too);
    only process 0 writes.

    Args:
        judge: a pairwise judge (``kithara.judges.BasePairwiseJudge``): ``judge(prompts,
            [[reference, policy], ...], shuffle_order)`` returns per prompt 0 (reference),
            1 (policy) or -1.
        model: the model being trained (its weights are read from the training state).
        tokenizer: a ``kithara.Tokenizer`` (``None``: ``model.tokenizer``).
        prompts: the evaluation prompts: text, or conversations for the chat template. The
            judge gets them as given.
        reference_variables: the reference's variables; default the model's own variables
            when training begins (its starting weights; with LoRA, adapters that start at
            zero, so the base model).
        every: also judge every this many steps; ``None``: at evaluations only.
        num_prompts: use only the first this many prompts.
        max_new_tokens, temperature, top_k, top_p, seed: the decoding of both sides
            (``temperature=0``, the default, is greedy).
        shuffle_order: passed to the judge: present each pair in a random order.
        use_soft_judge: ask the judge for the probability that the reference's completion
            is better (``return_scores=True``, as ``RewardModelJudge`` gives); a probability
            above 0.5 is a reference win, and ``1 - mean(probability)`` is ``avg_win_prob``.
        log_dir: the TensorBoard directory; default the trainer's (``info.log_dir``).

    Example:
        >>> win_rate = WinRateCallback(judge, model, tokenizer, eval_prompts, max_new_tokens=32)
        >>> kithara.DPOTrainer(model, ..., callbacks=[win_rate]).train()
        >>> win_rate.history  # [(0, 0.5), (100, 0.56), ...]
    """

    def __init__(
        self,
        judge: Any,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        reference_variables: ModelVariables | None = None,
        every: int | None = None,
        num_prompts: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        shuffle_order: bool = True,
        use_soft_judge: bool = False,
        log_dir: str | None = None,
    ) -> None:
        if not callable(getattr(judge, "judge", None)):
            raise TypeError(
                f"judge must be a pairwise judge (kithara.judges.BasePairwiseJudge) with a judge() method, got "
                f"{type(judge).__name__}."
            )
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (or None: at evaluations only), got {every!r}.")
        self.judge = judge
        self.generation = CompletionGenerator(
            model,
            tokenizer,
            prompts,
            num_prompts=num_prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            where=type(self).__name__,
        )
        self.reference_variables = reference_variables
        self.every = every
        self.shuffle_order = shuffle_order
        self.use_soft_judge = use_soft_judge
        self.log_dir = log_dir
        self.ref_completions: list[str] | None = None
        self.completions: list[str] = []  # the policy's, at the last judged step
        self.winner_indices: list[int] = []  # the judge's verdicts at the last judged step
        self.history: list[tuple[int, float]] = []
        self.soft_history: list[tuple[int, float]] = []
        self._writer: Any = None
        self._judged: set[int] = set()

    def on_train_begin(self, info: StepInfo) -> None:
        self._judged.clear()  # another run (a new trainer) counts its steps anew
        log_dir = self.log_dir or info.log_dir
        if log_dir is not None and self._writer is None and jax.process_index() == 0:
            self._writer = summary_writer(log_dir, "win_rate")
        if self.ref_completions is None:
            variables = self.reference_variables
            if variables is None:
                variables = self.generation.model.variables
            # The same seed as the policy's decode at the starting step.
            self.ref_completions = self.generation(variables, info.start_step)
        self._record(info.start_step, self.ref_completions)

    def needs_sync(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def on_step_end(self, info: StepInfo) -> None:
        if self.needs_sync(info.step) and info.step not in self._judged:
            self._record(info.step, self.generation(state_variables(self.generation.model, info), info.step))

    def on_eval_end(self, info: StepInfo) -> None:
        if info.step not in self._judged:
            self._record(info.step, self.generation(state_variables(self.generation.model, info), info.step))

    def on_train_end(self, info: StepInfo) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _record(self, step: int, completions: list[str]) -> None:
        """Judges ``completions`` against the reference's at ``step`` and records the result."""
        if self.ref_completions is None:
            raise RuntimeError("WinRateCallback judged before on_train_begin generated the reference completions.")
        self._judged.add(step)
        pairs = [[ref, completion] for ref, completion in zip(self.ref_completions, completions, strict=True)]
        prompts = self.generation.prompts
        soft: float | None = None
        if self.use_soft_judge:
            probabilities = [float(p) for p in self.judge.judge(prompts, pairs, self.shuffle_order, return_scores=True)]
            self._check(probabilities, "probabilities", lambda p: 0.0 <= p <= 1.0)
            winners = [0 if p > 0.5 else 1 for p in probabilities]
            soft = 1.0 - sum(probabilities) / len(probabilities)
        else:
            verdicts = list(self.judge.judge(prompts, pairs, self.shuffle_order))
            self._check(verdicts, "verdicts", _is_verdict)
            winners = [int(w) for w in verdicts]
        rate = win_rate(winners)
        self.completions, self.winner_indices = completions, winners
        self.history.append((step, rate))
        if soft is not None:
            self.soft_history.append((step, soft))
        logger.info(
            "eval_win_rate at step %d: %.4f%s", step, rate, "" if soft is None else f" (avg_win_prob {soft:.4f})"
        )
        if self._writer is not None:
            self._writer.add_scalar("eval/win_rate", rate, step)
            if soft is not None:
                self._writer.add_scalar("eval/avg_win_prob", soft, step)
            self._writer.flush()

    def _check(self, values: list[Any], what: str, valid: Any) -> None:
        name = type(self.judge).__name__
        if len(values) != len(self.generation.prompts):
            raise ValueError(f"{name}.judge returned {len(values)} {what} for {len(self.generation.prompts)} prompts.")
        bad = [v for v in values if not valid(v)]
        if bad:
            allowed = "probabilities in [0, 1]" if what == "probabilities" else "0, 1 or -1 (undecided)"
            raise ValueError(f"{name}.judge returned {bad[:3]}; a pairwise judge returns {allowed}.")


def _is_verdict(value: Any) -> bool:
    """0, 1 or -1 as an int (not a bool, not a float a soft judge would return)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value in (-1, 0, 1)


def win_rate(winner_indices: Sequence[int]) -> float:
    """The share of verdicts that are 1 (the second completion, the policy's, won), over all
    verdicts: TRL's formula, where -1 (undecided) counts as a loss."""
    return sum(w == 1 for w in winner_indices) / len(winner_indices)
