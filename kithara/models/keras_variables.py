"""A keras model's variables as the Trainer sees them: by path, placed on the mesh.

``KerasHubModel`` (causal) and ``KerasHubSeq2SeqModel`` both keep their keras variables
this way; this base holds the indexing, placement and the ``variables`` /
``variable_shardings`` half of the ``Model`` contract once.

A model built inside ``unallocated()`` is abstract: nothing is allocated and its
``variables`` are ``jax.ShapeDtypeStruct``s carrying their shardings, enough to lower and
compile a train step ahead of time for a size that would not fit here (bench/scale.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import keras
import numpy as np
from jax.sharding import NamedSharding
from keras.src.backend.common import global_state

from kithara import sharding as sharding_lib
from kithara.models.model import Model, ModelVariables


class KerasVariables(Model):
    """``Model`` whose variables are a keras model's, indexed by path and sharded by a strategy.

    Subclasses set ``self.strategy`` and ``self._mesh`` and call ``_index_variables`` once
    their keras model is complete (after LoRA is enabled, say).
    """

    strategy: sharding_lib.ShardingStrategy
    _mesh: Any

    def _index_variables(self, keras_model: keras.Model) -> None:
        """Indexes ``keras_model``'s variables by path and moves each onto its sharding."""
        self._trainable_paths = [v.path for v in keras_model.trainable_variables]
        self._non_trainable_paths = [v.path for v in keras_model.non_trainable_variables]
        self._by_path = {v.path: v for v in keras_model.variables}
        if len(self._by_path) != len(keras_model.variables):
            raise ValueError(f"{type(keras_model).__name__} has variables with duplicate paths.")
        shapes = {path: tuple(v.shape) for path, v in self._by_path.items()}
        self._shardings = sharding_lib.param_shardings(self.strategy, self._mesh, shapes)
        place_variables(self._by_path, self._shardings)

    def state_mapping(self, variables: ModelVariables) -> list[tuple[keras.Variable, Any]]:
        """``(keras variable, value)`` pairs of ``variables`` for ``keras.StatelessScope``:
        calling the keras layers inside that scope computes with these values."""
        return [(self._by_path[p], v) for p, v in {**variables.trainable, **variables.non_trainable}.items()]

    @property
    def variables(self) -> ModelVariables:
        return ModelVariables(
            trainable={p: self._value(p) for p in self._trainable_paths},
            non_trainable={p: self._value(p) for p in self._non_trainable_paths},
        )

    @variables.setter
    def variables(self, values: ModelVariables) -> None:
        for expected, given in (
            (self._trainable_paths, values.trainable),
            (self._non_trainable_paths, values.non_trainable),
        ):
            if set(expected) != set(given):
                missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
                raise ValueError(f"Variables do not match the model: missing {missing[:5]}, unexpected {extra[:5]}.")
        for path, value in {**values.trainable, **values.non_trainable}.items():
            variable = self._by_path[path]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"Variable {path}: shape {tuple(value.shape)} does not match {tuple(variable.shape)}.")
            variable.assign(value)

    def _value(self, path: str) -> Any:
        """The variable's array, or for one built in ``unallocated()`` its shape, dtype and sharding."""
        variable = self._by_path[path]
        if not is_allocated(variable):
            return jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype, sharding=self._shardings[path])
        return variable.value

    @property
    def variable_shardings(self) -> ModelVariables:
        return ModelVariables(
            trainable={p: self._shardings[p] for p in self._trainable_paths},
            non_trainable={p: self._shardings[p] for p in self._non_trainable_paths},
        )


def place_variables(by_path: Mapping[str, Any], shardings: Mapping[str, NamedSharding]) -> None:
    """Moves every keras variable onto its sharding, one device shard at a time (those built
    in ``unallocated()`` stay unallocated)."""
    for path, variable in by_path.items():
        if not is_allocated(variable):
            continue
        sharding = shardings[path]
        value = variable.value
        if getattr(value, "sharding", None) == sharding:
            continue
        host = np.asarray(value)
        variable.assign(jax.make_array_from_callback(host.shape, sharding, host.__getitem__))


@contextlib.contextmanager
def unallocated() -> Iterator[None]:
    """Keras variables created inside are never allocated, so a model whose backbone is
    built here (an 8B shape on a small host, say) is abstract: its ``variables`` are
    ``jax.ShapeDtypeStruct``s with their shardings, for ``jax.jit(...).lower(...).compile()``
    ahead of time (``memory_analysis()``, on a TPU topology's devices even without a TPU).
    Such a model cannot run eagerly, generate, take new variable values or be saved.
    Build only the backbone inside: keras-hub's task constructor makes a concrete variable.

    Example:
        >>> with unallocated():
        ...     backbone = keras_hub.models.Llama3Backbone(vocabulary_size=128256, num_layers=32, ...)
        >>> model = KerasHubModel(keras_hub.models.Llama3CausalLM(backbone, preprocessor=None))
    """
    pending = global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True)
    before = len(pending)
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        # keras would initialize (allocate) them when the next outermost stateless scope
        # closes, which every traced stateless_call opens: forget them instead.
        del pending[before:]


def is_allocated(variable: keras.Variable) -> bool:
    """False for a variable created in ``unallocated()`` (keras holds its initializer, no value)."""
    return getattr(variable, "_value", None) is not None
