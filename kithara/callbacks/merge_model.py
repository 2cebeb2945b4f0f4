"""With each checkpoint, a Hugging Face copy of the model: LoRA merged, optionally mixed with its start."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kithara.callbacks.base import Callback, StepInfo
from kithara.callbacks.checkpointer import Checkpointer
from kithara.callbacks.log_completions import state_variables
from kithara.models.hf import export
from kithara.models.hf.weight_map import weight_map
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import ModelVariables

logger = logging.getLogger(__name__)

MERGE_METHODS = ("linear", "slerp")
_MERGEKIT_ONLY = ("ties", "dare_ties")
_SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: closer to colinear than this, slerp falls back to lerp
_SLERP_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """How ``MergeModelCallback`` mixes the policy with the target (the model's starting
    weights), tensor by tensor in the Hugging Face layout, as mergekit's methods of these
    names do (TRL's ``MergeConfig``, where the policy is the trained checkpoint and the
    target the base model).

    Args:
        method: ``"linear"``: ``(wp * policy + wt * target) / (wp + wt)`` (without the
            division when ``normalize`` is False). ``"slerp"``: spherical interpolation from
            the policy (``t_values=0``) to the target (``t_values=1``) of each tensor as one
            vector (linear where the two are nearly parallel). TIES and DARE-TIES need mergekit:
            run it on the directories this callback writes.
        policy_model_weight, target_model_weight: ``wp`` and ``wt`` of ``"linear"``.
        normalize: divide ``"linear"``'s sum by ``wp + wt``.
        t_values: the interpolation point of ``"slerp"``.

    Example:
        >>> MergeConfig("linear", policy_model_weight=0.7, target_model_weight=0.3)
    """

    method: str = "linear"
    policy_model_weight: float = 0.5
    target_model_weight: float = 0.5
    normalize: bool = True
    t_values: float = 0.5

    def __post_init__(self) -> None:
        if self.method in _MERGEKIT_ONLY:
            raise ValueError(
                f"MergeConfig method {self.method!r} is mergekit's, which kithara does not bundle; kithara merges "
                f"{MERGE_METHODS}. Pass merge_config=None (the trained model alone) and run mergekit on "
                "{output_dir}/checkpoint-{step}/merged and the base model."
            )
        if self.method not in MERGE_METHODS:
            raise ValueError(f"MergeConfig method must be one of {MERGE_METHODS}, got {self.method!r}.")
        if self.normalize and self.policy_model_weight + self.target_model_weight == 0:
            raise ValueError("MergeConfig: policy_model_weight + target_model_weight is 0, so normalize divides by 0.")
        if not 0.0 <= self.t_values <= 1.0:
            raise ValueError(f"MergeConfig t_values must be in [0, 1], got {self.t_values}.")

    def merge(self, policy: np.ndarray, target: np.ndarray) -> np.ndarray:
        """One merged tensor (float32) of the policy's and the target's."""
        policy, target = policy.astype(np.float32), target.astype(np.float32)
        if self.method == "slerp":
            return slerp(self.t_values, policy, target)
        merged = self.policy_model_weight * policy + self.target_model_weight * target
        if self.normalize:
            merged = merged / (self.policy_model_weight + self.target_model_weight)
        return merged


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit's ``slerp``: the angle between ``v0`` and ``v1`` (each flattened, as one
    vector) interpolated at ``t``; ``(1 - t) v0 + t v1`` when they are nearly colinear."""
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > _SLERP_EPS else v0
    u1 = v1 / n1 if n1 > _SLERP_EPS else v1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > _SLERP_DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta_0 = np.arccos(dot)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / np.sin(theta_0)
    s1 = np.sin(theta_t) / np.sin(theta_0)
    return s0 * v0 + s1 * v1


class MergeModelCallback(Callback):
    """Writes the model of a step as a Hugging Face checkpoint: at each checkpoint save
    (``merge_at_every_checkpoint``) and at the end of training, to
    ``{output_dir}/checkpoint-{step}/merged`` (TRL's layout), with LoRA adapters merged into
    the weights and full precision by default; ``transformers.AutoModelForCausalLM`` loads
    it. With a ``merge_config`` the written weights are the policy mixed with the model's
    starting weights (TRL's ``MergeModelCallback`` runs mergekit for that; kithara does
    ``linear`` and ``slerp`` itself).

    The checkpoint steps come from ``checkpointer`` (its ``save_interval``) or
    ``save_steps`` (``args.save_steps`` when the trainer saves to ``args.output_dir``).
    Every process takes part (each gathers its shards); process 0 writes.

    Args:
        model: the ``KerasHubModel`` being trained (its weights are read from the training
            state of each step).
        output_dir: where the ``checkpoint-{step}/merged`` directories go (local or ``gs://``).
        tokenizer: a ``kithara.Tokenizer`` whose files are written next to the weights.
        merge_config: a ``MergeConfig`` to mix the policy with its starting weights (with
            LoRA, the base model: adapters start at zero). That keeps a copy of the starting
            trainable variables in device memory (small under LoRA). ``None``: the policy alone.
        merge_at_every_checkpoint: merge at every checkpoint step; ``False``: only at the end
            of training (TRL's default, where this is False).
        checkpointer: the ``Checkpointer`` whose saves to follow.
        save_steps: instead of ``checkpointer``: the steps between saves.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the written tensors.
        max_shard_size: the largest safetensors file to write.

    Example:
        >>> ckpt = kithara.Checkpointer("runs/exp1/ckpt", save_interval=500)
        >>> merge = MergeModelCallback(model, "runs/exp1", tokenizer=tokenizer, checkpointer=ckpt)
        >>> kithara.Trainer(model, "adamw", loader, steps=2000, checkpointer=ckpt, callbacks=[merge]).train()
        >>> # runs/exp1/checkpoint-500/merged, ..., checkpoint-2000/merged
    """

    def __init__(
        self,
        model: KerasHubModel,
        output_dir: str,
        *,
        tokenizer: Any = None,
        merge_config: MergeConfig | None = None,
        merge_at_every_checkpoint: bool = True,
        checkpointer: Checkpointer | None = None,
        save_steps: int | None = None,
        dtype: str = "float32",
        max_shard_size: int | str = "5GB",
    ) -> None:
        if not isinstance(model, KerasHubModel):
            raise TypeError(f"MergeModelCallback writes KerasHubModel checkpoints, got {type(model).__name__}.")
        if merge_config is not None and not isinstance(merge_config, MergeConfig):
            raise TypeError(f"merge_config must be a kithara MergeConfig, got {type(merge_config).__name__}.")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}.")
        export.parse_size(max_shard_size)  # refuses a bad size now, not at the first save
        if save_steps is not None and (not isinstance(save_steps, int) or save_steps < 1):
            raise ValueError(f"save_steps must be a positive int, got {save_steps!r}.")
        if checkpointer is not None and not isinstance(checkpointer, Checkpointer):
            raise TypeError(f"checkpointer must be a kithara.Checkpointer, got {type(checkpointer).__name__}.")
        if checkpointer is not None and save_steps is not None and save_steps != checkpointer.save_interval:
            raise ValueError(
                f"save_steps={save_steps} differs from the checkpointer's save_interval={checkpointer.save_interval}; "
                "pass one of them."
            )
        interval = checkpointer.save_interval if checkpointer is not None else save_steps
        if merge_at_every_checkpoint and interval is None:
            raise ValueError(
                "merge_at_every_checkpoint=True needs the checkpoint schedule: pass checkpointer= (the trainer's "
                "Checkpointer, trainer.checkpointer) or save_steps= (args.save_steps); or "
                "merge_at_every_checkpoint=False to write the merged model once, at the end of training."
            )
        if not merge_at_every_checkpoint and interval is not None:
            raise ValueError(
                "checkpointer / save_steps only set when to merge with merge_at_every_checkpoint=True; with False "
                "the model is merged once, at the end of training. Drop them or set merge_at_every_checkpoint=True."
            )
        self.model = model
        self.output_dir = str(output_dir)
        self.tokenizer = tokenizer
        self.merge_config = merge_config
        self.merge_at_every_checkpoint = merge_at_every_checkpoint
        self.save_steps = interval
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.merged_steps: list[int] = []  # every step written, across runs
        self._written: set[int] = set()  # the steps of this run written
        self._reference: dict[str, Any] | None = None  # starting trainable variables, for merge_config

    def merged_dir(self, step: int) -> str:
        """The directory the model of ``step`` is written to."""
        if "://" in self.output_dir:
            return f"{self.output_dir.rstrip('/')}/checkpoint-{step}/merged"
        return os.path.join(self.output_dir, f"checkpoint-{step}", "merged")

    def on_train_begin(self, info: StepInfo) -> None:
        self._written.clear()
        if self.merge_config is not None and self._reference is None:
            # The model's own variables are its starting weights (a resumed run restores into
            # the trainer's state, not the model); the first step donates them, so copy now.
            shardings = self.model.variable_shardings.trainable
            copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)
            self._reference = copy(self.model.variables.trainable)

    def needs_sync(self, step: int) -> bool:
        return self.save_steps is not None and step % self.save_steps == 0

    def on_step_end(self, info: StepInfo) -> None:
        if self.needs_sync(info.step):
            self._write(info)

    def on_train_end(self, info: StepInfo) -> None:
        if info.error is None and info.state is not None and info.step and info.step not in self._written:
            self._write(info)

    def _write(self, info: StepInfo) -> None:
        if info.step in self._written:
            return
        policy = state_variables(self.model, info)
        reference = None
        if self.merge_config is not None:
            if self._reference is None:
                raise RuntimeError("MergeModelCallback wrote a merge before on_train_begin copied the reference.")
            reference = ModelVariables(self._reference, policy.non_trainable)
        path = self.merged_dir(info.step)
        export.save_in_hf_format(
            self.model,
            path,
            max_shard_size=self.max_shard_size,
            dtype=self.dtype,
            tokenizer=self.tokenizer,
            tensors=merged_tensors(self.model, policy, reference, self.merge_config),
        )
        self._written.add(info.step)
        self.merged_steps.append(info.step)
        logger.info("Merged model of step %d written to %s", info.step, path)


def merged_tensors(
    model: KerasHubModel,
    policy: ModelVariables,
    reference: ModelVariables | None = None,
    merge_config: MergeConfig | None = None,
) -> Callable[[Mapping[str, Any], Any], Iterator[tuple[str, np.ndarray]]]:
    """``save_in_hf_format``'s ``tensors``: the Hugging Face tensors of ``policy`` (a
    variables set of ``model``), LoRA adapters merged, each mixed with ``reference``'s by
    ``merge_config`` when both are given."""

    def tensors(config: Mapping[str, Any], dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
        adapters = export._merged_kernels(model)
        policy_values = {**policy.trainable, **policy.non_trainable}
        reference_values = {**reference.trainable, **reference.non_trainable} if reference is not None else None
        for entry in weight_map(model.backbone, config):
            value = entry.to_hf(_merged_value(policy_values, entry.variable_path, adapters))
            if reference_values is not None and merge_config is not None:
                target = entry.to_hf(_merged_value(reference_values, entry.variable_path, adapters))
                value = merge_config.merge(value, target)
            yield entry.hf_key, value.astype(dtype)

    return tensors


def _merged_value(values: Mapping[str, Any], path: str, adapters: Mapping[str, tuple[str, str, float]]) -> np.ndarray:
    """The float32 host value of variable ``path``, its LoRA adapter (if any) folded in."""
    value = export.host_value(values[path]).astype(np.float32)
    if path in adapters:
        a_path, b_path, scale = adapters[path]
        a = export.host_value(values[a_path]).astype(np.float32)
        b = export.host_value(values[b_path]).astype(np.float32)
        value = value + scale * (a @ b)
    return value
