"""The compiled steps: the one ``jax.jit`` site of training and the one of evaluation, with
explicit shardings, the state donated and the frozen variables passed as an argument."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.models.model import ModelVariables
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
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: _mesh_sharding(x, mesh), frozen)
        replicated = sharding_lib.replicated(mesh)
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
            in_shardings=(state_shardings.model, sharding_lib.batch_sharding(mesh), frozen_shardings),
            out_shardings=replicated,
        )
        self._score: Any = jax.jit(
            score,
            in_shardings=(state_shardings.model, sharding_lib.batch_sharding(mesh), frozen_shardings),
            out_shardings=replicated,
        )

    def train(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of ``state`` (donated) on ``[micro_batches, rows, ...]`` arrays."""
        return self._train(state, batch, self.frozen)

    def evaluate(self, variables: ModelVariables, batch: Any) -> LossOutput:
        """The loss sums of one ``[rows, ...]`` batch."""
        return self._eval(variables, batch, self.frozen)

    def score(self, variables: ModelVariables, batch: Any) -> dict[str, jax.Array]:
        """``score_batch`` of one ``[rows, ...]`` batch, replicated on every device."""
        return self._score(variables, batch, self.frozen)

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
