"""The compiled steps: the one ``jax.jit`` site of training and the one of evaluation, with
explicit shardings, the state donated and the frozen variables passed as an argument."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.models.model import ModelVariables
from kithara.trainer import offload
from kithara.trainer import step as step_lib
from kithara.trainer.losses import LossOutput
from kithara.trainer.state import TrainState

TrainStep = Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]
ComputeLoss = Callable[..., tuple[LossOutput, Any]]  # (variables, batch, rng, frozen)
Score = Callable[[ModelVariables, Any, Any], dict[str, jax.Array]]  # (variables, batch, frozen)


class StepPrograms:
    """``train_step(state, batch, frozen)``, ``compute_loss`` and ``score_batch`` jitted once each.

    Args:
        train_step: the pure update (an objective's ``train_step`` hook).
        compute_loss: the pure loss (its ``compute_loss`` hook), evaluated without gradients.
        score: per-row quantities without gradients (its ``score_batch`` hook: log-probs of
            the policy and the reference at rollout time, values), returned replicated.
        state_shardings: where every leaf of the train state lives.
        mesh: the model's device mesh; batches are sharded over its batch axes.
        frozen: arrays both steps read and never train (or None), placed on ``mesh``.
    """

    def __init__(
        self,
        train_step: TrainStep,
        compute_loss: ComputeLoss,
        score: Score,
        state_shardings: TrainState,
        mesh: Mesh,
        frozen: Any,
    ) -> None:
        self.frozen = frozen
        self._release: list[jax.Array] = []  # see release_after_next_step
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: _mesh_sharding(x, mesh), frozen)
        replicated = sharding_lib.replicated(mesh)
        if offload.is_offloaded(state_shardings):  # host-memory leaves: moved to device inside the step
            train_step = offload.step_in_device_memory(train_step)
        model_shardings = offload.device_shardings(state_shardings.model)  # eval and score read device memory
        self._train: Any = jax.jit(
            train_step,
            in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh, leading_dims=1), frozen_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        self._eval: Any = jax.jit(
            lambda variables, batch, frozen: step_lib.eval_step(
                variables, batch, loss_fn=functools.partial(compute_loss, frozen=frozen)
            ),
            in_shardings=(model_shardings, sharding_lib.batch_sharding(mesh), frozen_shardings),
            out_shardings=replicated,
        )
        self._score: Any = jax.jit(
            score,
            in_shardings=(model_shardings, sharding_lib.batch_sharding(mesh), frozen_shardings),
            out_shardings=replicated,
        )

    def replace_frozen(self, variables: Any, live_state: Any, *, who: str) -> None:
        """Replaces the frozen variables the steps are passed (no recompilation): same tree
        structure, shapes and dtypes, placed on the shardings the steps were compiled with;
        arrays sharing memory with ``live_state`` (the train state the next step donates)
        are copied. ``who`` names the trainer in errors."""
        current = self.frozen
        if current is None:
            raise ValueError(
                f"{who} passes no frozen variables to its steps (frozen_variables() returned None: "
                "say, a reference that is the model with its LoRA adapters off, or precomputed log-probs), so "
                "there is nothing to replace."
            )
        old, treedef = jax.tree_util.tree_flatten_with_path(current)
        new, new_treedef = jax.tree_util.tree_flatten_with_path(variables)
        treedef, new_treedef = cast(Any, treedef), cast(Any, new_treedef)
        if new_treedef != treedef:
            old_paths = [jax.tree_util.keystr(p) for p, _ in old]
            new_paths = [jax.tree_util.keystr(p) for p, _ in new]
            missing = sorted(set(old_paths) - set(new_paths), key=old_paths.index)
            extra = sorted(set(new_paths) - set(old_paths), key=new_paths.index)
            detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else "another container"
            raise ValueError(
                f"The new frozen variables must have the tree structure of the current ones ({len(old)} arrays); "
                f"got {len(new)} arrays, {detail}. Build them from trainer.frozen (jax.tree.map)."
            )
        live = _buffers(live_state) if live_state is not None else set()
        placed = []
        for (path, was), (_, value) in zip(old, new, strict=True):
            shape, dtype = tuple(np.shape(value)), np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
            if shape != tuple(was.shape) or dtype != was.dtype:
                raise ValueError(
                    f"Frozen variable {jax.tree_util.keystr(path)}: got {dtype.name}{list(shape)}, the steps were "
                    f"compiled for {np.dtype(was.dtype).name}{list(was.shape)}; cast or reshape it to match."
                )
            aliased = isinstance(value, jax.Array) and not _buffers(value).isdisjoint(live)
            placed.append(jax.device_put(value, was.sharding, may_alias=False if aliased else None))
        self.frozen = jax.tree_util.tree_unflatten(treedef, placed)

    def release_after_next_step(self, arrays: list[jax.Array]) -> None:
        """Deletes ``arrays`` once the next update has run: device copies a host-offloaded state
        replaced, which stay readable (callbacks at train begin) until the step that would
        have donated them."""
        self._release = list(arrays)

    def train(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of ``state`` (donated) on ``[micro_batches, rows, ...]`` arrays."""
        out = self._train(state, batch, self.frozen)
        for array in self._release:
            array.delete()
        self._release = []
        return out

    def evaluate(self, variables: ModelVariables, batch: Any) -> LossOutput:
        """The loss sums of one ``[rows, ...]`` batch."""
        return self._eval(offload.device_copy(variables), batch, self.frozen)

    def score(self, variables: ModelVariables, batch: Any) -> dict[str, jax.Array]:
        """``score_batch`` of one ``[rows, ...]`` batch, replicated on every device."""
        return self._score(offload.device_copy(variables), batch, self.frozen)

    def lower_train(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        return self._train.lower(state, batch, self.frozen)

    @property
    def compilations(self) -> dict[str, int]:
        return {
            "train_step": self._train._cache_size(),
            "eval_step": self._eval._cache_size(),
            "score": self._score._cache_size(),
        }


def _mesh_sharding(x: Any, mesh: Mesh) -> jax.sharding.Sharding:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh != mesh:
        raise ValueError(
            "frozen_variables() must return arrays placed on the model's mesh (NamedSharding over "
            f"model.mesh); got one with sharding {sharding}. Place it with jax.device_put or the "
            "frozen model's own variable_shardings on the same mesh."
        )
    return sharding


def _buffers(tree: Any) -> set[int]:
    """The device buffers (addresses of this process's shards) of a pytree's arrays."""
    return {
        shard.data.unsafe_buffer_pointer()
        for leaf in jax.tree.leaves(tree)
        if isinstance(leaf, jax.Array) and not leaf.is_deleted()
        for shard in leaf.addressable_shards
    }
