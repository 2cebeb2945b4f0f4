"""What the online-RL trainers share around a rollout: prompts read from rows, completions
sampled on the training mesh, rewards from functions and scoring models, and the fixed-shape
training rows built from them.

Rows of a rollout are group-contiguous: rows ``g*k .. g*k+k-1`` are the ``k`` completions
of prompt ``g``. Every process samples (one global program) and holds every row; reward
functions run on this process's share of the rows and the scores are gathered, so each
group's rewards meet on every process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kithara import sharding as sharding_lib
from kithara.data.reward_data import reward_tokens
from kithara.data.source import RowError, Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.generation import bucket
from kithara.models.model import Model
from kithara.objectives.inputs import as_tokenizer

RewardFunc = Callable[..., Sequence[float | None]]
# Columns a reward function never sees as dataset columns (TRL passes them by these names).
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


@dataclasses.dataclass
class Rollout:
    """One rollout's training rows (``[rows, ...]`` host arrays, group-contiguous) and its
    host metrics; ``index`` numbers rollouts from the start of training."""

    index: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    updates_done: int = 0  # optimizer updates made on it so far

    def encode(self) -> dict[str, Any]:
        """JSON-able (for a checkpoint's data state): the arrays as a base64 ``.npz``."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **self.arrays)  # type: ignore[arg-type]
        arrays = base64.b64encode(buffer.getvalue()).decode()
        return {"index": self.index, "arrays": arrays, "metrics": self.metrics, "updates_done": self.updates_done}

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Rollout:
        with np.load(io.BytesIO(base64.b64decode(data["arrays"]))) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(int(data["index"]), arrays, dict(data["metrics"]), int(data["updates_done"]))


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids (cut from the left to the limit), what reward functions see
    as the prompt (text, or a list of messages), and the row's other columns."""

    ids: list[int]
    value: str | list[dict[str, Any]]
    columns: dict[str, Any]

    @property
    def conversational(self) -> bool:
        return not isinstance(self.value, str)


def read_prompt(row: Mapping[str, Any], where: str, tokenizer: Tokenizer, max_prompt_length: int) -> Prompt:
    """A ``Prompt`` from a row with ``prompt`` (text or messages) or chat ``messages`` (a
    trailing assistant turn is dropped: it is what the policy writes); other fields become
    columns. Raises ``RowError`` naming the row otherwise."""
    if "prompt" in row:
        value, name = row["prompt"], "prompt"
    elif "messages" in row:
        value, name = row["messages"], "messages"
        if (
            isinstance(value, list)
            and value
            and isinstance(value[-1], Mapping)
            and value[-1].get("role") == "assistant"
        ):
            value = value[:-1]
    else:
        raise RowError(where, f"needs a 'prompt' (text or messages) or 'messages' field; it has {sorted(row)}.")
    if isinstance(value, str):
        if not value:
            raise RowError(where, "is empty.", field=name)
        ids = tokenizer.encode_text(value)
    elif isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m for m in value):
        value = [dict(m) for m in value]
        ids, _ = tokenizer.encode_chat(value, add_generation_prompt=True)
    else:
        raise RowError(
            where, f"must be text or a non-empty list of {{'role', 'content'}} messages, got {value!r}.", field=name
        )
    columns = {k: v for k, v in row.items() if k != name}
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise RowError(where, f"has columns {clash}, names the reward functions' own arguments take; rename them.")
    return Prompt(ids[-max_prompt_length:], value, columns)


def read_prompts(source: Source, indices: Sequence[int], tokenizer: Tokenizer, max_prompt_length: int) -> list[Prompt]:
    return [read_prompt(source[int(i)], source.describe(int(i)), tokenizer, max_prompt_length) for i in indices]


def reward_functions(
    funcs: Any,
    tokenizers: Any,
    tokenizer: Tokenizer,
    *,
    sharding: sharding_lib.ShardingStrategy | str | None = None,
    precision: str = "float32",
) -> list[Any]:
    """``reward_funcs`` as a list of callables: Python functions as they are, reward models
    (``kithara.Model``s with ``score``) wrapped in ``ModelReward`` with their entry of
    ``tokenizers`` (``reward_processing_classes``: one per reward model, or one for all) or
    the policy's ``tokenizer``.

    A string (or path) is a local Hugging Face sequence-classification directory, as TRL
    takes a model id: loaded with ``ScalarHeadModel.from_preset`` on ``sharding`` (the
    policy's strategy) in ``precision``, and read with its ``tokenizers`` entry, else the
    directory's own tokenizer when it has one, else the policy's."""
    funcs = list(funcs) if isinstance(funcs, list | tuple) else [funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function or reward model.")
    models = [f for f in funcs if isinstance(f, Model | str | os.PathLike)]
    given = list(tokenizers) if isinstance(tokenizers, list | tuple) else [tokenizers] * len(models)
    if tokenizers is not None and len(given) != len(models):
        raise ValueError(f"reward_processing_classes has {len(given)} entries for {len(models)} reward models.")
    scorers = iter(given)
    out = []
    for f in funcs:
        if isinstance(f, str | os.PathLike):
            entry = as_tokenizer(next(scorers)) if tokenizers is not None else None
            model = _load_reward_model(f, sharding, precision)
            reward = ModelReward(model, entry or _directory_tokenizer(f) or tokenizer)
            reward.__name__ = Path(f).name  # as TRL names a reward model by its id's last part
            out.append(reward)
        elif isinstance(f, Model):
            scorer_tokenizer = as_tokenizer(next(scorers)) if tokenizers is not None else tokenizer
            if scorer_tokenizer is None:
                raise ValueError("reward_processing_classes has None for a reward model; give its tokenizer.")
            out.append(ModelReward(f, scorer_tokenizer))
        elif callable(f):
            out.append(f)
        else:
            raise TypeError(
                "reward_funcs entries are callables, reward models (kithara.ScalarHeadModel) or paths to "
                f"Hugging Face sequence-classification directories, got {type(f).__name__}."
            )
    return out


def _load_reward_model(path: str | os.PathLike[str], sharding: Any, precision: str) -> Model:
    from kithara.models.scalar_head import ScalarHeadModel

    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"reward_funcs names {os.fspath(path)!r}, which is not a local directory: a string reward is a "
            "Hugging Face sequence-classification checkpoint directory (models are not downloaded)."
        )
    model = ScalarHeadModel.from_preset(os.fspath(path), sharding=sharding, precision=precision)
    if model.hf_config is not None and model.hf_config.get("architectures", [""])[0].endswith("ForCausalLM"):
        raise ValueError(
            f"reward_funcs names {os.fspath(path)!r}, a causal LM: a reward model must be a trained "
            "*ForSequenceClassification checkpoint (a causal LM would get an untrained head)."
        )
    return model


def _directory_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer saved with a reward model, if its directory has one."""
    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return Tokenizer.from_pretrained(path)


def reward_name(func: Any) -> str:
    """The name a reward's metrics are logged under: a function's ``__name__``, else its class name."""
    return str(getattr(func, "__name__", None) or type(func).__name__)


class ModelReward:
    """A sequence-scoring model (``score(variables, inputs) -> [rows]``, e.g. a
    ``ScalarHeadModel``) as a reward function of ``(prompts, completions)``: each pair is
    encoded with ``tokenizer`` as ``RewardTrainer`` encodes its rows (text joined and ended
    with EOS, or the chat template over the conversation)
    and scored in one jitted program on the model's mesh (rows and length in buckets).

    A reward model is a global program: every process scores every row.
    """

    runs_on_every_row = True

    def __init__(self, model: Model, tokenizer: Tokenizer, *, batch_size: int = 64) -> None:
        if not callable(getattr(model, "score", None)):
            raise TypeError(
                f"A reward model needs score(variables, inputs) -> one score per row; {type(model).__name__} has none. "
                "Use a kithara.ScalarHeadModel, or pass a Python function."
            )
        labels = getattr(model, "num_labels", 1)
        if labels != 1:
            raise ValueError(
                f"A reward model needs one score per completion, but this {type(model).__name__} has num_labels="
                f"{labels}. Use a num_labels=1 model (a reward model), or wrap it in a function of (prompts, "
                "completions) that turns its scores into one reward."
            )
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.__name__ = getattr(model, "name", None) or type(model).__name__
        mesh = model.mesh
        self._score = jax.jit(
            model.score,  # type: ignore[attr-defined]
            in_shardings=(model.variable_shardings, sharding_lib.batch_sharding(mesh)),
            out_shardings=sharding_lib.replicated(mesh),
        )

    def encode(self, prompt: str | list[dict[str, Any]], completion: str | list[dict[str, Any]]) -> list[int]:
        """The ids ``RewardTrainer`` trains on (``kithara.data.reward_data.reward_tokens``):
        ``[BOS] prompt + completion EOS`` for text, the chat template over the conversation
        for chat, so a trained reward model scores rollouts exactly as it saw its data."""
        if isinstance(prompt, str) and isinstance(completion, list):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return reward_tokens(self.tokenizer, prompt, completion)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        shards = sharding_lib.batch_shards(self.model.mesh)
        size = -(-min(bucket(len(rows), 1), self.batch_size) // shards) * shards
        length = bucket(max(len(r) for r in rows))
        scores: list[float] = []
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            ids = np.zeros((size, length), np.int32)
            mask = np.zeros((size, length), bool)
            for i, r in enumerate(part):
                ids[i, : len(r)], mask[i, : len(r)] = r, True
            mask[len(part) :, 0] = True  # padding rows score one token, then are dropped
            inputs = sharding_lib.global_arrays({"token_ids": ids, "padding_mask": mask}, self.model.mesh)
            out = np.asarray(jax.device_get(self._score(self.model.variables, inputs)))
            scores += [float(s) for s in out[: len(part)]]
        return scores


def score_rewards(
    funcs: Sequence[Any],
    prompts: Sequence[Prompt],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    trainer_state: Any,
) -> np.ndarray:
    """``[rows, functions]`` float64 rewards, NaN where a function returned None.

    Python functions get this process's share of the rows (``prompts``, ``completions``,
    ``completion_ids``, ``trainer_state`` and every other dataset column by name, as in TRL)
    and the shares are gathered; reward models score every row on every process.
    """
    n = len(prompts)
    lo, hi = process_share(n)
    out = np.full((n, len(funcs)), np.nan)
    for j, func in enumerate(funcs):
        every = getattr(func, "runs_on_every_row", False)
        a, b = (0, n) if every else (lo, hi)
        columns = {key: [p.columns.get(key) for p in prompts[a:b]] for key in prompts[0].columns} if n else {}
        values = (
            list(
                func(
                    prompts=[p.value for p in prompts[a:b]],
                    completions=list(completions[a:b]),
                    completion_ids=[list(c) for c in completion_ids[a:b]],
                    trainer_state=trainer_state,
                    **columns,
                )
            )
            if b > a
            else []
        )
        if len(values) != b - a:
            raise ValueError(
                f"Reward function {reward_name(func)!r} returned {len(values)} rewards for {b - a} completions."
            )
        for v in values:
            if v is not None and not (isinstance(v, int | float | np.number) and not isinstance(v, bool)):
                raise TypeError(f"Reward function {reward_name(func)!r} returned {v!r}; rewards are floats or None.")
        column = np.array([np.nan if v is None else float(v) for v in values], np.float64)
        if every:
            out[:, j] = column
        else:
            out[lo:hi, j] = column
            out[:, j] = gather_rows(out[:, j], lo, hi)
    return out


def total_reward(rewards_per_func: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted sum over functions of ``[rows, functions]`` rewards (NaN where no
    function applies), as TRL."""
    weighted = rewards_per_func * weights[None]
    return np.where(np.isnan(rewards_per_func).all(1), np.nan, np.nansum(weighted, axis=1))


def process_share(n: int) -> tuple[int, int]:
    """This process's contiguous share ``[lo, hi)`` of ``n`` rows."""
    count, index = jax.process_count(), jax.process_index()
    return n * index // count, n * (index + 1) // count


def gather_rows(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Every process's ``values[lo:hi]`` share put together (one process: unchanged)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    mine = np.zeros((2, len(values)))  # (value, None) of the rows this process scored
    mine[0, lo:hi] = np.nan_to_num(values[lo:hi])
    mine[1, lo:hi] = np.isnan(values[lo:hi])
    every = np.asarray(multihost_utils.process_allgather(mine)).sum(0)  # shares are disjoint
    return np.where(every[1] > 0, np.nan, every[0])


def training_rows(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    supervised: Sequence[bool],
    length: int,
) -> dict[str, np.ndarray]:
    """``[rows, length]`` arrays of ``prompt + completion`` rows (right-padded, so positions
    match sampling): ``token_ids``, ``padding_mask``, ``labels`` (the next token) and
    ``completion_mask`` (true where the label is a completion token of a ``supervised`` row)."""
    n = len(prompt_ids)
    out = {
        "token_ids": np.zeros((n, length), np.int32),
        "padding_mask": np.zeros((n, length), bool),
        "labels": np.zeros((n, length), np.int32),
        "completion_mask": np.zeros((n, length), bool),
    }
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        row = [*p, *c]
        if len(row) > length:
            raise ValueError(f"A row of {len(row)} tokens does not fit the training length {length}.")
        out["token_ids"][i, : len(row)] = row
        out["padding_mask"][i, : len(row)] = True
        out["labels"][i, : len(row) - 1] = row[1:]
        if supervised[i]:
            out["completion_mask"][i, len(p) - 1 : len(row) - 1] = True
    return out


def completion_stats(lengths: Sequence[int], stopped: Sequence[bool]) -> dict[str, float]:
    """TRL's completion-length metrics."""
    lengths_arr = np.asarray(lengths, np.float64)
    ended = lengths_arr[np.asarray(stopped, bool)]
    return {
        "completions/mean_length": float(lengths_arr.mean()),
        "completions/min_length": float(lengths_arr.min()),
        "completions/max_length": float(lengths_arr.max()),
        "completions/clipped_ratio": float(1.0 - np.mean(stopped)),
        "completions/mean_terminated_length": float(ended.mean()) if ended.size else 0.0,
    }


def reward_stats(
    names: Sequence[str], per_func: np.ndarray, rewards: np.ndarray, num_generations: int
) -> dict[str, float]:
    """TRL's reward metrics: total mean and group std, and each function's mean and std."""
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        column = per_func[:, j]
        out[f"rewards/{name}/mean"] = float(np.nanmean(column)) if np.isfinite(column).any() else math.nan
        out[f"rewards/{name}/std"] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else math.nan
    grouped = rewards.reshape(-1, num_generations)
    out["reward"] = float(np.nanmean(rewards))
    out["reward_std"] = float(np.nanmean(np.nanstd(grouped, axis=1, ddof=1))) if num_generations > 1 else 0.0
    return out
