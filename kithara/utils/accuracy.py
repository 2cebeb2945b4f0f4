"""compute_accuracy: TRL's accuracy of reward-model (and PRM) eval predictions."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels of positions that are not scored (TRL's, and transformers')


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """TRL's ``compute_accuracy``: the accuracy of a reward model's (or a PRM's) predictions.

    ``eval_pred`` is ``(predictions, labels)`` or an object with ``predictions`` and
    ``label_ids`` (transformers' ``EvalPrediction``):

    - ``predictions`` ``[rows, 2]`` holds each pair's two rewards (chosen, rejected) and
      ``labels`` ``[rows]`` the index of the preferred one (0 in TRL's reward trainer). A pair
      whose two rewards are equal is left out (TRL warns and leaves it out too); accuracy is the
      fraction of the rest where the preferred reward is the larger.
    - ``predictions`` ``[rows, length, classes]`` are per-token logits (PRM): their argmax is
      compared with ``labels`` ``[rows, length]`` where the label is not -100.

    Returns ``{"accuracy": float}``; NaN when nothing is left to score.

    Example:
        >>> compute_accuracy((np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]), np.zeros(3, int)))
        {'accuracy': 0.5}
    """
    if isinstance(eval_pred, tuple | list):
        if len(eval_pred) != 2:
            raise ValueError(f"eval_pred must be (predictions, labels), got {len(eval_pred)} items.")
        predictions, labels = eval_pred
    else:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim == 3:
        if labels.shape != predictions.shape[:2]:
            raise ValueError(
                f"Token predictions {predictions.shape} need labels of shape {predictions.shape[:2]}, "
                f"got {labels.shape}."
            )
        scored = labels != IGNORE_INDEX
        hits = np.argmax(predictions, axis=-1)[scored] == labels[scored]
    elif predictions.ndim == 2 and predictions.shape[1] == 2:
        if labels.shape != predictions.shape[:1]:
            raise ValueError(
                f"Pair predictions {predictions.shape} need labels of shape {predictions.shape[:1]}, "
                f"got {labels.shape}."
            )
        ties = predictions[:, 0] == predictions[:, 1]
        if ties.any():
            logger.warning(
                "%d of %d pairs have equal rewards for both options; they are left out of the accuracy.",
                int(ties.sum()),
                len(ties),
            )
        hits = np.argmax(predictions[~ties], axis=1) == labels[~ties]
    else:
        raise ValueError(
            f"predictions must be [rows, 2] rewards of pairs or [rows, length, classes] token logits, "
            f"got shape {predictions.shape}."
        )
    return {"accuracy": float(hits.mean()) if hits.size else float("nan")}
