"""disable_dropout: every dropout rate of a keras model to zero (TRL's ``disable_dropout_in_model``)."""

from __future__ import annotations

from typing import Any

import keras

from kithara.utils.keras_model import keras_model_of


def disable_dropout(model: Any) -> int:
    """Sets the rate of every ``keras.layers.Dropout`` in ``model`` to 0, and the dropout
    settings layers keep for their config (keras-hub's ``dropout``, ``attention_dropout``, ...)
    to 0.0, so a training-mode forward pass is deterministic and saved configs say so.

    Call it before building the trainer: a step already compiled keeps the rates it was
    traced with. Returns the number of ``Dropout`` layers that had a rate above 0.

    TRL's ``disable_dropout_in_model`` (and its configs' ``disable_dropout=True``) does this to
    a torch model; kithara's trainers that take ``disable_dropout`` run the model with
    ``training=False`` instead, which this makes unnecessary.

    Example:
        >>> model = KerasHubModel.from_config("llama3", ..., num_layers=2, dropout=0.1)
        >>> disable_dropout(model)  # attention and residual dropout of each layer
        4
    """
    changed = 0
    for layer in keras_model_of(model)._flatten_layers(include_self=True):
        if isinstance(layer, keras.layers.Dropout):
            changed += int(layer.rate > 0)
            layer.rate = 0.0
        for name, value in list(vars(layer).items()):
            is_rate = isinstance(value, int | float) and not isinstance(value, bool)
            if is_rate and (name == "dropout" or name.endswith("_dropout")):
                setattr(layer, name, 0.0)
    return changed
