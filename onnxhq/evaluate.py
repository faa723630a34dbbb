"""Top-1 accuracy of a model's class-score output under onnxruntime."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset
from .errors import DataError
from .outputs import class_score_output
from .runtime import make_session, run_batched

if TYPE_CHECKING:
    import onnx


def predict_scores(
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset,
    *,
    output: str | None = None,
    batch_size: int = 500,
) -> np.ndarray:
    """Class scores (N, C) of ``model`` on ``data``: logits or probabilities, as given."""
    name, _ = class_score_output(model, output)
    session = make_session(model)
    return run_batched(session, data.inputs, name, batch_size=batch_size)


def accuracy(
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset,
    *,
    output: str | None = None,
    batch_size: int = 500,
) -> float:
    """Fraction in [0, 1] of samples whose argmax class equals the label."""
    if data.labels is None:
        raise DataError("accuracy needs labels: add an integer 'labels' array to the data file")
    scores = predict_scores(model, data, output=output, batch_size=batch_size)
    if scores.ndim != 2:
        raise DataError(f"the class-score output has shape {scores.shape}; expected (N, classes)")
    if data.labels.max() >= scores.shape[1]:
        raise DataError(
            f"labels go up to {data.labels.max()} but the model scores {scores.shape[1]} classes"
        )
    return float(np.mean(scores.argmax(axis=1) == data.labels))
