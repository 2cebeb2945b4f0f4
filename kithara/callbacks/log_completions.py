"""Completions of fixed prompts during training, written to TensorBoard text and a JSONL file."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from etils import epath

from kithara.callbacks.base import Callback, StepInfo
from kithara.models.model import ModelVariables, part_of
from kithara.models.sampling import check_sampling

logger = logging.getLogger(__name__)

# Event files are named by the second they were opened in: writers opened together in one
# directory (the trainer's TensorBoardLogger, these callbacks) need a suffix each, or they
# write one file over another.
_WRITERS = itertools.count()

# A prompt: plain text, or a conversation (a list of {"role", "content"} messages) for the chat template.
Prompt = str | Sequence[Mapping[str, Any]]


class LogCompletionsCallback(Callback):
    """Every ``every`` steps, continues fixed prompts with the weights of exactly that step
    and writes a ``step | prompt | completion`` table to TensorBoard (text, tag
    ``completions``) and rows ``{"step", "prompt", "completion"}`` to a JSONL file.
    TRL's ``LogCompletionsCallback``, with the prompts given here instead of read from the
    trainer's eval dataset; only process 0 writes (every process generates: the decode
    runs on the whole mesh).

    Args:
        model: the model being trained (anything with ``generate(token_ids, ...,
            variables=)``, such as a ``KerasHubModel``); its weights are read from the
            training state, never from the model.
        tokenizer: a ``kithara.Tokenizer`` (``None``: ``model.tokenizer``).
        prompts: text prompts, or conversations (lists of messages) rendered with the
            tokenizer's chat template and its generation prompt.
        every: steps between logs (TRL's ``freq``); ``None``: at every evaluation
            (``on_eval_end``) instead. The last step is logged at the end of training too.
        num_prompts: use only the first this many prompts.
        max_new_tokens, temperature, top_k, top_p: the decoding (``temperature=0``, the
            default, is greedy; sampling uses the seed ``seed + step``).
        log_dir: the TensorBoard directory; default the trainer's (``info.log_dir``).
        jsonl_path: the JSONL file (appended to); default ``{log_dir}/completions.jsonl``.

    All rows are kept in ``table`` as ``(step, prompt, completion)`` tuples as well.

    Example:
        >>> callback = LogCompletionsCallback(model, tokenizer, ["2 + 2 =", "The sky is"], every=100)
        >>> kithara.Trainer(model, "adamw", loader, steps=1000, callbacks=[callback]).train()
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        every: int | None = None,
        num_prompts: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        log_dir: str | None = None,
        jsonl_path: str | None = None,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (or None: at each evaluation), got {every!r}.")
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
        self.every = every
        self.log_dir = log_dir
        self.jsonl_path = jsonl_path
        self.table: list[tuple[int, str, str]] = []
        self._writer: Any = None
        self._jsonl: str | None = None
        self._logged_steps: set[int] = set()

    def on_train_begin(self, info: StepInfo) -> None:
        self._logged_steps.clear()  # another run (a new trainer) counts its steps anew
        log_dir = self.log_dir or info.log_dir
        self._jsonl = self.jsonl_path or (os.path.join(log_dir, "completions.jsonl") if log_dir else None)
        if log_dir is None and self.jsonl_path is None:
            raise ValueError(
                "LogCompletionsCallback has nowhere to write: the trainer has no TensorBoard directory. Pass "
                "log_dir= or jsonl_path= (or give the trainer tensorboard_dir / args.logging_dir)."
            )
        if log_dir is not None and self._writer is None and jax.process_index() == 0:
            self._writer = summary_writer(log_dir, "completions")

    def needs_sync(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def on_step_end(self, info: StepInfo) -> None:
        if self.needs_sync(info.step):
            self._log(info)

    def on_eval_end(self, info: StepInfo) -> None:
        if self.every is None:
            self._log(info)

    def on_train_end(self, info: StepInfo) -> None:
        try:
            if info.error is None and info.step and info.state is not None and info.step not in self._logged_steps:
                self._log(info)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _log(self, info: StepInfo) -> None:
        if info.step in self._logged_steps:
            return
        self._logged_steps.add(info.step)
        completions = self.generation(state_variables(self.generation.model, info), info.step)
        rows = [
            (info.step, prompt, completion)
            for prompt, completion in zip(self.generation.texts, completions, strict=True)
        ]
        self.table.extend(rows)
        if jax.process_index() != 0:
            return
        if self._writer is not None:
            self._writer.add_text("completions", markdown_table(("step", "prompt", "completion"), rows), info.step)
            self._writer.flush()
        if self._jsonl is not None:
            lines = "".join(
                json.dumps({"step": s, "prompt": p, "completion": c}, ensure_ascii=False) + "\n" for s, p, c in rows
            )
            append_text(self._jsonl, lines)


class CompletionGenerator:
    """Fixed prompts, encoded once, continued with given variables: what the generation
    callbacks share. ``texts`` are the prompts as the model reads them (a conversation
    rendered with the chat template)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        *,
        num_prompts: int | None,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int,
        where: str,
    ) -> None:
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"{where}: model must be a kithara model with generate(), got {type(model).__name__}.")
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{where} needs a kithara.Tokenizer: pass tokenizer= or set model.tokenizer.")
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"{where}: prompts must be a non-empty list of strings or conversations, got {prompts!r}.")
        if num_prompts is not None:
            if not isinstance(num_prompts, int) or num_prompts < 1:
                raise ValueError(f"{where}: num_prompts must be a positive int, got {num_prompts!r}.")
            prompts = list(prompts)[:num_prompts]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be a positive int, got {max_new_tokens!r}.")
        try:
            check_sampling(temperature, top_k, top_p)
        except ValueError as error:  # now, not at the first log deep into training
            raise ValueError(f"{where}: {error}") from None
        self.model, self.tokenizer = model, tokenizer
        self.prompts = list(prompts)
        self.texts: list[str] = []
        self.token_ids: list[list[int]] = []
        for i, prompt in enumerate(self.prompts):
            if isinstance(prompt, str):
                self.texts.append(prompt)
                self.token_ids.append(tokenizer.encode_text(prompt))
            elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
                self.texts.append(
                    str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
                )
                self.token_ids.append(list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)))
            else:
                raise TypeError(
                    f"{where}: prompts[{i}] is a {type(prompt).__name__}; give a string or a list of "
                    '{"role": ..., "content": ...} messages.'
                )
        self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed = (
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        )

    def __call__(self, variables: ModelVariables, step: int) -> list[str]:
        """The completion of each prompt with ``variables`` (cut before EOS, special tokens
        dropped); sampling uses the seed ``seed + step``."""
        eos = self.tokenizer.eos_id
        rows = self.model.generate(
            self.token_ids,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop_token_ids=[eos],
            seed=self.seed + step,
            variables=variables,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def state_variables(model: Any, info: StepInfo) -> ModelVariables:
    """``model``'s variables in the training state of ``info``: the whole state's, or its
    ``policy/`` part when the trainer trains the model joined with another (a value model)."""
    state = info.state
    if state is None:
        raise RuntimeError(f"No training state at step {info.step} to read {type(model).__name__}'s weights from.")
    variables: ModelVariables = state.model
    own = model.variable_shardings
    if set(variables.trainable) == set(own.trainable) and set(variables.non_trainable) == set(own.non_trainable):
        return variables
    policy = part_of(variables, "policy")
    if set(policy.trainable) == set(own.trainable) and set(policy.non_trainable) == set(own.non_trainable):
        return policy
    raise ValueError(
        f"The training state's variables are not those of this {type(model).__name__} (e.g. "
        f"{sorted(variables.trainable)[:3]}); give the callback the model the Trainer trains."
    )


def summary_writer(log_dir: str, name: str) -> Any:
    """A tensorboardX ``SummaryWriter`` on ``log_dir`` (local or ``gs://``, as
    ``TensorBoardLogger`` writes it), in an event file of its own (suffix ``name`` and a count)."""
    from tensorboardX import SummaryWriter, record_writer

    from kithara.callbacks.tensorboard import _check_gcs_client, _GcsEventFiles

    if str(log_dir).startswith("gs://"):
        _check_gcs_client(str(log_dir))
        record_writer.register_writer_factory("gs", _GcsEventFiles())
    return SummaryWriter(log_dir, filename_suffix=f".{name}.{os.getpid()}.{next(_WRITERS)}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (TensorBoard renders text summaries as Markdown); cell text is
    escaped so pipes and newlines stay inside their cell."""

    def cell(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_text(path: str, text: str) -> None:
    """Appends ``text`` to a local file, or rewrites a URL's object (GCS cannot append)."""
    target = epath.Path(path)
    if "://" in path:
        target.write_text((target.read_text() if target.exists() else "") + text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)
