"""The two sides of cycle training as one ``Model`` for the Trainer's state and checkpoints.

``TwoModels`` holds two separate models (any families, causal or seq2seq, one mesh);
``TwoAdapters`` holds one frozen causal base with two LoRA adapter sets, so its weight memory
is one base plus two adapters.
Either way the pair's variables are one ``ModelVariables`` whose paths carry the side
(``"A/..."``, ``"B/..."``; the shared base of ``TwoAdapters`` keeps its own paths), and
``side_variables`` / ``merge_side`` move one side's variables in and out without copies.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from kithara.models import adapters
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.model import Model, ModelVariables, join_variables, part_of
from kithara.models.model import prefixed as _prefixed
from kithara.models.model import unprefixed as _side_of
from kithara.models.seq2seq_model import KerasHubSeq2SeqModel

SIDES = ("A", "B")
SideModel = KerasHubModel | KerasHubSeq2SeqModel  # what runs one side: a causal or a seq2seq LM


class CyclePair(Model):
    """Two models (or two adapters) seen as one; subclasses say how the sides are stored."""

    @abc.abstractmethod
    def side_model(self, side: str) -> SideModel:
        """The model whose layers run ``side`` (the shared base for adapters)."""

    def submodels(self) -> list[Model]:
        return list({id(m): m for m in (self.side_model("A"), self.side_model("B"))}.values())

    @property
    def supports_chunked_loss(self) -> bool:
        return all(m.supports_chunked_loss for m in self.submodels())

    @abc.abstractmethod
    def side_variables(self, variables: ModelVariables, side: str) -> ModelVariables:
        """``side``'s variables (its own paths) picked out of the pair's, no copies."""

    @abc.abstractmethod
    def merge_side(self, variables: ModelVariables, side: str, side_variables: ModelVariables) -> ModelVariables:
        """The pair's variables with ``side``'s replaced; the other side's arrays untouched."""

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise TypeError("A cycle pair has two forward passes: use side_model(side).apply(side_variables(...), ...).")

    @property
    def mesh(self) -> Mesh:
        return self.side_model("A").mesh

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        return sum(self.side_model(s).flops_per_token(sequence_length, training=training) for s in SIDES) / 2


class TwoModels(CyclePair):
    """Two separate models, ``{"A": model_a, "B": model_b}`` (families may differ), on one mesh."""

    def __init__(self, models: Mapping[str, SideModel]) -> None:
        if set(models) != set(SIDES):
            raise ValueError(f"models must be {{'A': ..., 'B': ...}}, got keys {sorted(models)}.")
        if models["A"] is models["B"]:
            raise ValueError("models['A'] and models['B'] are one model; pass two, or one LoRA model for adapters.")
        if models["A"].mesh != models["B"].mesh:
            raise ValueError("Both models must live on the same device mesh (same devices and axes).")
        self.models = dict(models)

    def side_model(self, side: str) -> SideModel:
        return self.models[side]

    @property
    def variables(self) -> ModelVariables:
        return join_variables({s: self.models[s].variables for s in SIDES})

    @variables.setter
    def variables(self, values: ModelVariables) -> None:
        for side in SIDES:
            self.models[side].variables = self.side_variables(values, side)

    @property
    def variable_shardings(self) -> ModelVariables:
        return join_variables({s: self.models[s].variable_shardings for s in SIDES})

    def side_variables(self, variables: ModelVariables, side: str) -> ModelVariables:
        return part_of(variables, side)

    def merge_side(self, variables: ModelVariables, side: str, side_variables: ModelVariables) -> ModelVariables:
        return ModelVariables(
            {**variables.trainable, **_prefixed(side_variables.trainable, side)},
            {**variables.non_trainable, **_prefixed(side_variables.non_trainable, side)},
        )


class TwoAdapters(CyclePair):
    """One frozen base model with LoRA adapters ``"A"`` and ``"B"``.

    Both adapters start from the model's own (``b = 0``, so both equal the base). The keras
    model itself carries adapter ``"A"``; ``adapter("B")`` gives the other set, and
    ``adapters.with_adapter(model.variables, pair.adapter("B"))`` generates with it.
    """

    def __init__(self, model: KerasHubModel) -> None:
        if model.lora is None:
            raise ValueError("The one-model cycle mode needs a model built with lora=LoraConfig(...).")
        if any(not adapters.is_lora_path(p) for p in model.variables.trainable):
            raise ValueError("With LoRA only the adapters may be trainable.")
        self.model = model
        start = model.variables.trainable
        # A real copy: the trainer donates its state, and one buffer may not appear twice.
        self._adapters = {"A": dict(start), "B": {p: v.copy() for p, v in start.items()}}

    def side_model(self, side: str) -> SideModel:
        return self.model

    def adapter(self, side: str) -> adapters.AdapterSet:
        """The current adapter set of ``side`` (set by training; see ``variables``)."""
        return dict(self._adapters[side])

    @property
    def variables(self) -> ModelVariables:
        base = self.model.variables
        self._adapters["A"] = dict(base.trainable)
        trainable = {k: v for s in SIDES for k, v in _prefixed(self._adapters[s], s).items()}
        return ModelVariables(trainable, base.non_trainable)

    @variables.setter
    def variables(self, values: ModelVariables) -> None:
        self._adapters = {s: _side_of(values.trainable, s) for s in SIDES}
        self.model.variables = self.side_variables(values, "A")

    @property
    def variable_shardings(self) -> ModelVariables:
        own = self.model.variable_shardings
        trainable = {k: v for s in SIDES for k, v in _prefixed(own.trainable, s).items()}
        return ModelVariables(trainable, own.non_trainable)

    def side_variables(self, variables: ModelVariables, side: str) -> ModelVariables:
        return ModelVariables(_side_of(variables.trainable, side), variables.non_trainable)

    def merge_side(self, variables: ModelVariables, side: str, side_variables: ModelVariables) -> ModelVariables:
        return ModelVariables(
            {**variables.trainable, **_prefixed(side_variables.trainable, side)}, variables.non_trainable
        )


def per_side(transforms: Mapping[str, optax.GradientTransformation]) -> optax.GradientTransformation:
    """One optimizer state per side over the pair's trainable dict: ``{"A": ..., "B": ...}``,
    each keyed by the side's prefixed paths (so state shardings follow the parameters)."""

    def init(params: Mapping[str, Any]) -> dict[str, Any]:
        return {s: transforms[s].init({k: v for k, v in params.items() if k.startswith(f"{s}/")}) for s in SIDES}

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        out, new_state = {}, {}
        for s in SIDES:
            pick = lambda tree, s=s: None if tree is None else {k: v for k, v in tree.items() if k.startswith(f"{s}/")}  # noqa: E731
            side_updates, new_state[s] = transforms[s].update(pick(updates), state[s], pick(params))
            out.update(side_updates)
        return out, new_state

    return optax.GradientTransformation(init, update)


def on_side(transform: optax.GradientTransformation, side: str) -> optax.GradientTransformation:
    """``transform`` for one side's unprefixed parameters, keeping its state keyed by the
    prefixed paths that ``per_side`` created."""

    def init(params: Mapping[str, Any]) -> Any:
        return transform.init(_prefixed(params, side))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new_updates, new_state = transform.update(
            _prefixed(updates, side), state, None if params is None else _prefixed(params, side)
        )
        return _side_of(new_updates, side), new_state

    return optax.GradientTransformation(init, update)
