"""The model contract the Trainer relies on."""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from kithara.models.logprobs import logps_and_entropy, token_stats


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelVariables:
    """A model's variables as two ``{variable path: array}`` dicts.

    Only ``trainable`` receives gradients and optimizer state; ``non_trainable`` holds frozen
    weights (the base weights under LoRA) and layer state such as dropout seeds.
    """

    trainable: dict[str, Any]  # arrays; the same structure also carries shardings or shapes
    non_trainable: dict[str, Any]


class Model(abc.ABC):
    """What the Trainer needs from a model.

    A model owns its variables, already placed on ``mesh`` with ``variable_shardings``, and
    a pure ``apply`` that maps variables and inputs to logits. Training takes the variables,
    updates them functionally, and hands them back through the ``variables`` setter.
    """

    @property
    @abc.abstractmethod
    def mesh(self) -> Mesh:
        """The device mesh the variables live on."""

    @property
    @abc.abstractmethod
    def variables(self) -> ModelVariables:
        """Current variable values."""

    @variables.setter
    @abc.abstractmethod
    def variables(self, values: ModelVariables) -> None: ...

    @property
    @abc.abstractmethod
    def variable_shardings(self) -> ModelVariables:
        """A ``ModelVariables`` of ``NamedSharding`` with the same structure as ``variables``."""

    @abc.abstractmethod
    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure forward pass: returns ``(logits_BxLxV, new_non_trainable)``.

        ``inputs`` holds ``token_ids`` and ``padding_mask`` (``[batch, length]``), and for packed
        batches also ``segment_ids`` and ``positions`` (see ``supports_packing``).
        Must be traceable by ``jax.jit`` and must not read or write any Python state.
        """

    def token_logps(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Pure: ``(logps_BxL, entropy_BxL, new_non_trainable)``, the float32 log-probability
        of ``labels_BxL`` under ``log_softmax(logits)`` at each position and the entropy
        ``-sum p log p`` of that distribution (labels outside ``[0, vocab)`` get 0).

        This default runs ``apply`` and so holds the full ``[batch, length, vocab]`` logits;
        ``chunk_size`` is ignored. Models that can split off their output head override it
        to compute the same values ``chunk_size`` positions at a time (``KerasHubModel``
        does, see ``kithara.models.logprobs``).
        """
        del chunk_size
        logits_BxLxV, new_non_trainable = self.apply(variables, inputs, training=training)
        logps_BxL, entropy_BxL = logps_and_entropy(logits_BxLxV, labels_BxL)
        return logps_BxL, entropy_BxL, new_non_trainable

    def token_stats(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        stats: Sequence[str] = ("logps",),
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Pure: ``({name: [B, L]}, new_non_trainable)``, the per-position ``stats`` of
        ``log_softmax(logits)`` at ``labels_BxL`` that losses need, names from
        ``kithara.models.logprobs.STATS``: ``logps`` (as ``token_logps``), ``entropy``,
        ``correct`` (the label's logit is the largest) and ``logit_mean``; float32.

        This default runs ``apply`` and so holds the full ``[batch, length, vocab]`` logits;
        the chunk sizes are ignored. Models that can split off their output head override it
        to compute the same values ``chunk_size`` positions (and ``vocab_chunk_size`` tokens
        of the vocabulary) at a time: ``TrainingConfig.loss_chunk_size`` (docs/scale.md).
        """
        del chunk_size, vocab_chunk_size
        logits_BxLxV, new_non_trainable = self.apply(variables, inputs, training=training)
        return token_stats(logits_BxLxV, labels_BxL, stats), new_non_trainable

    @abc.abstractmethod
    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        """Model FLOPs for one token at this sequence length (forward, or forward+backward)."""

    @property
    def supports_packing(self) -> bool:
        """Whether ``apply`` accepts packed rows (several examples per row).

        A model that returns True must honour ``segment_ids`` (``[batch, length]`` ints, ``1, 2, ...``
        per example, ``0`` for padding: attention never crosses a segment boundary) and ``positions``
        (``[batch, length]`` ints restarting at 0 for each example, used for position encodings) when
        they are in ``apply``'s inputs, so each example's logits equal those of the example run alone.
        A model that returns False must reject inputs carrying ``segment_ids``.
        """
        return False

    def submodels(self) -> list[Model]:
        """The models this one is made of (PPO's policy and value model, a cycle pair's sides), each
        once; ``[]`` for a single model. Options that belong to each model (``gradient_checkpointing``)
        reach them through this."""
        return []

    @property
    def supports_chunked_loss(self) -> bool:
        """Whether ``token_stats`` / ``token_logps`` honour their chunk sizes (an LM head that can
        run on a slice of the positions); ``TrainingConfig.loss_chunk_size`` is refused otherwise."""
        return False

    @property
    def num_params(self) -> int:
        """Total parameter count (trainable plus frozen)."""
        v = self.variables
        return sum(math.prod(x.shape) for x in (*v.trainable.values(), *v.non_trainable.values()))

    @property
    def num_trainable_params(self) -> int:
        return sum(math.prod(x.shape) for x in self.variables.trainable.values())


def prefixed(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``tree`` with every path under ``name/``."""
    return {f"{name}/{p}": v for p, v in tree.items()}


def unprefixed(tree: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The entries of ``tree`` under ``name/``, with their own paths."""
    head = f"{name}/"
    return {p[len(head) :]: v for p, v in tree.items() if p.startswith(head)}


def join_variables(parts: Mapping[str, ModelVariables]) -> ModelVariables:
    """One ``ModelVariables`` of several models' (or their shardings), each part's paths
    under its name: how a pair of models is one train state."""
    return ModelVariables(
        {k: v for name, part in parts.items() for k, v in prefixed(part.trainable, name).items()},
        {k: v for name, part in parts.items() for k, v in prefixed(part.non_trainable, name).items()},
    )


def part_of(variables: ModelVariables, name: str) -> ModelVariables:
    """The part ``name`` of ``join_variables``' result, under its own paths (no copies)."""
    return ModelVariables(unprefixed(variables.trainable, name), unprefixed(variables.non_trainable, name))
