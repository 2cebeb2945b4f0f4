"""keras_model_of: the keras model whose variables a kithara model holds."""

from __future__ import annotations

from typing import Any

import keras

from kithara.models.keras_variables import KerasVariables

_ATTRIBUTES = ("causal_lm", "seq2seq_lm", "keras_model")  # KerasHubModel, KerasHubSeq2SeqModel, scalar heads


def keras_model_of(model: Any) -> keras.Model:
    """The keras model ``model`` computes with and indexes its variables from (a
    ``KerasHubModel``'s causal LM, a seq2seq model's LM, a scalar-head model's keras model)."""
    if not isinstance(model, KerasVariables):
        raise TypeError(
            "model must be a kithara model built on keras (KerasHubModel, KerasHubSeq2SeqModel, a scalar-head "
            f"model), got {type(model).__name__}."
        )
    paths = set(model._by_path)
    for name in _ATTRIBUTES:
        candidate = getattr(model, name, None)
        if isinstance(candidate, keras.Model) and {v.path for v in candidate.variables} == paths:
            return candidate
    raise TypeError(f"{type(model).__name__} keeps its keras model under none of {_ATTRIBUTES}.")
