"""The linear head of ``ScalarHeadModel`` and the reading of scores at each row's last token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import keras

# The head's layer name: its kernel is ``score/kernel``, as Hugging Face's
# ``*ForSequenceClassification`` call theirs ``score.weight`` (transposed: [num_labels, hidden] there).
HEAD_NAME = "score"
INPUTS = ("token_ids", "padding_mask")
# What the model was made as (Hugging Face's ``*ForSequenceClassification`` or ``*ForTokenClassification``);
# the computation is the same, only the exported architecture differs.
TASKS = ("sequence_classification", "token_classification")


class ScoreHead(keras.layers.Layer):
    """``hidden @ kernel`` with a ``[hidden, num_labels]`` kernel (and, with ``use_bias``, a
    ``[num_labels]`` bias, as Hugging Face's token classifiers have), computed in float32.

    The kernel is stored in the layer's variable dtype (the backbone's precision) and
    initialised ``normal(0, stddev)``, the bias to zeros; the matmul always runs in float32
    so scores are float32 whatever the compute dtype.
    """

    def __init__(
        self, stddev: float, seed: int = 0, num_labels: int = 1, use_bias: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(autocast=False, **kwargs)  # autocast would round the kernel to bf16 on read
        self.stddev = float(stddev)
        self.seed = int(seed)
        self.num_labels = int(num_labels)
        self.use_bias = bool(use_bias)
        self.bias: keras.Variable | None = None

    def build(self, input_shape: Any) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-1]), self.num_labels),
            initializer=keras.initializers.RandomNormal(mean=0.0, stddev=self.stddev, seed=self.seed),
        )
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.num_labels,), initializer="zeros")

    def call(self, hidden: Any) -> Any:
        scores = keras.ops.matmul(keras.ops.cast(hidden, "float32"), keras.ops.cast(self.kernel, "float32"))
        return scores if self.bias is None else scores + keras.ops.cast(self.bias, "float32")

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "stddev": self.stddev,
            "seed": self.seed,
            "num_labels": self.num_labels,
            "use_bias": self.use_bias,
        }


def last_token_scores(scores_BxL: jax.Array, padding_mask: jax.Array) -> jax.Array:
    """``scores_BxL`` (or ``scores_BxLxN``) at each row's last position where ``padding_mask`` is
    set: ``[B]`` (or ``[B, N]``); 0 for empty rows."""
    mask = jnp.asarray(padding_mask).astype(bool)
    length = mask.shape[1]
    last_B = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    index = last_B.reshape((-1, 1) + (1,) * (scores_BxL.ndim - 2))
    picked = jnp.take_along_axis(scores_BxL, index, axis=1)[:, 0]
    present = mask.any(axis=1).reshape((-1,) + (1,) * (picked.ndim - 1))
    return jnp.where(present, picked, jnp.zeros_like(picked))


def check_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "ScalarHeadModel inputs must be a mapping with 'token_ids' and 'padding_mask', "
            f"got {type(inputs).__name__}."
        )
    missing = [name for name in INPUTS if name not in inputs]
    if missing:
        raise ValueError(
            f"ScalarHeadModel inputs lack {missing}: it needs 'token_ids' and 'padding_mask' ([batch, length]); "
            "the padding mask says which token each row's score is read at."
        )
    if "segment_ids" in inputs:
        raise ValueError("ScalarHeadModel does not support packed sequences (segment_ids); set packing off.")
    token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
    if len(token_ids.shape) != 2 or tuple(padding_mask.shape) != tuple(token_ids.shape):
        raise ValueError(
            f"token_ids and padding_mask must both be [batch, length]; got shapes {tuple(token_ids.shape)} and "
            f"{tuple(padding_mask.shape)}."
        )
    return {"token_ids": token_ids, "padding_mask": padding_mask}
