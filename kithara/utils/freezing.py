"""freeze_layers: stop training the variables whose paths match a pattern."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from kithara.utils.keras_model import keras_model_of


def freeze_layers(model: Any, patterns: str | Sequence[str]) -> list[str]:
    """Makes every trainable variable of ``model`` whose path matches one of ``patterns``
    (regular expressions, ``re.search`` over paths such as
    ``transformer_layer_0/self_attention/query/kernel``: ``model.variables.trainable``'s keys)
    non-trainable. A trainer built afterwards computes no gradient for them and gives them no
    optimizer state (its state holds only trainable variables' slots), so they stay exactly as
    they are. Returns the paths frozen now.

    A pattern that matches no variable at all is an error naming the closest paths (one
    that matches only variables already frozen is not), and so are patterns that would freeze
    every trainable variable. Build the trainer after freezing: one
    built before keeps the variables it was built with.

    Example:
        >>> freeze_layers(model, [r"^token_embedding/", r"transformer_layer_[01]/"])
        ['token_embedding/embeddings', 'token_embedding/reverse_embeddings', 'transformer_layer_0/...', ...]
    """
    keras_model = keras_model_of(model)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"patterns must be a regular expression or a list of them, got {patterns!r}.")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"freeze_layers: {pattern!r} is not a regular expression ({error}).") from error
    variables = model.variables
    every_path = [*variables.trainable, *variables.non_trainable]
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.search(path) for path in every_path):
            close = difflib.get_close_matches(pattern, every_path, n=3, cutoff=0.0)
            raise ValueError(
                f"freeze_layers: pattern {pattern!r} matches no variable path of {type(model).__name__}; the "
                f"closest paths are {close} (all of them: model.variables.trainable and .non_trainable)."
            )
    frozen = [path for path in variables.trainable if any(regex.search(path) for regex in compiled)]
    if not frozen:
        return []
    if len(frozen) == len(variables.trainable):
        raise ValueError(
            f"freeze_layers: {patterns} match every trainable variable of {type(model).__name__}, which would "
            "leave nothing to train; narrow the patterns."
        )
    by_path = {v.path: v for v in keras_model.variables}
    for path in frozen:
        by_path[path].trainable = False
    # apply() passes values in the keras model's own variable order: read it back.
    model._trainable_paths = [v.path for v in keras_model.trainable_variables]
    model._non_trainable_paths = [v.path for v in keras_model.non_trainable_variables]
    return frozen
