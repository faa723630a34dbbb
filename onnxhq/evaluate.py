"""Accuracy on labels, and fidelity to the original: a model's outputs under onnxruntime.

`accuracy` reads the class-score output against labels. `reference_outputs` runs the original
once over the eval inputs (every float output, its kind detected or given), and `fidelity`
compares a compressed model with it by output kind (`onnxhq.fidelity`), label-free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset
from .errors import DataError, ModelError
from .fidelity import measure
from .outputs import (
    FLOAT_OUTPUT_TYPES,
    OutputSpec,
    class_score_output,
    output_list,
    parse_output_spec,
    resolve_output,
)
from .runtime import make_session, run_batched

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class OutputKind:
    """How an output is compared (`onnxhq.fidelity.measure`): ``kind`` (classes, bernoulli,
    real) and the class ``axis`` (logits or probabilities are told from the values)."""

    kind: str
    axis: int = -1


@dataclass(frozen=True)
class Reference:
    """The original model's float outputs on the eval inputs, their kinds, and the labels."""

    outputs: dict[str, np.ndarray]
    kinds: dict[str, OutputKind]
    labels: np.ndarray | None

    def accuracy(self, name: str) -> float | None:
        """Top-1 accuracy of the original on output ``name``, where labels fit it; else None."""
        return _accuracy(self.outputs[name], self.kinds[name], self.labels)


def reference_outputs(
    model: onnx.ModelProto,
    data: Dataset,
    *,
    output: str | OutputSpec | Sequence[str | OutputSpec] | None = None,
    batch_size: int = 500,
) -> Reference:
    """Run the original ``model`` on ``data`` once: every float output, and each one's kind.

    ``output`` (``NAME[:KIND]``, `onnxhq.outputs.parse_output_spec`, or a list of them) may
    name outputs' kinds; the others are detected (`detect_kind`).
    """
    names = float_outputs(model)
    told: dict[str, str | None] = {}
    for spec in map(parse_output_spec, output_list(output)):
        name = spec.name or (names[0] if names else None)
        if name is not None and name not in names:
            raise ModelError(f"the model has no float output {name!r}; its float outputs are "
                             f"{', '.join(names)}")  # fmt: skip
        if name is not None:
            told[name] = spec.kind
    values = run_batched(make_session(model), data.inputs, names, batch_size=batch_size)
    kinds = {n: detect_kind(model, n, told.get(n)) for n in names}
    for n, k in kinds.items():  # a Softmax axis past a reshape: the class axis is the last
        rank = values[n].ndim
        if k.kind == "classes" and not (-rank <= k.axis < rank and k.axis % rank):
            kinds[n] = OutputKind("classes", -1)
    return Reference(values, kinds, data.labels)


def fidelity(
    reference: Reference,
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset,
    *,
    blank: int = 0,
    batch_size: int = 500,
) -> dict[str, dict[str, float]]:
    """output name -> {metric: value} of ``model`` against the original (`Reference`) on
    ``data``, by output kind (`onnxhq.fidelity.measure`); ``accuracy`` where labels fit."""
    session = make_session(model)
    values = run_batched(session, data.inputs, list(reference.outputs), batch_size=batch_size)
    out = {}
    for name, original in reference.outputs.items():
        k = reference.kinds[name]
        labels = _fitting_labels(original, k, reference.labels)
        out[name] = measure(
            k.kind, original, values[name], axis=k.axis, blank=blank, logits=None, labels=labels
        )
    return out


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the model's float graph outputs, in graph order."""
    return [
        o.name
        for o in model.graph.output
        if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in FLOAT_OUTPUT_TYPES
    ]


def detect_kind(model: onnx.ModelProto, name: str, kind: str | None = None) -> OutputKind:
    """How output ``name`` is compared: its kind (``kind``, or `onnxhq.outputs.resolve_output`'s
    detection) and class axis; logits or probabilities are told from the values."""
    try:
        found = resolve_output(model, f"{name}:{kind}" if kind else name)
    except ModelError as exc:  # an output the Fisher could not read is still compared as values
        log.warning("output %r is compared as real values: %s", name, exc)
        return OutputKind("real")
    return OutputKind(found.kind, -1 if found.axis is None else found.axis)


def _fitting_labels(values: np.ndarray, kind: OutputKind, labels: np.ndarray | None):
    """``labels`` when they label every position of a classes output, else None."""
    if labels is None or kind.kind != "classes":
        return None
    shape = np.delete(np.array(values.shape), kind.axis % values.ndim)
    return labels if tuple(labels.shape) == tuple(shape) else None


def _accuracy(values: np.ndarray, kind: OutputKind, labels: np.ndarray | None) -> float | None:
    fit = _fitting_labels(values, kind, labels)
    if fit is None:
        return None
    return float(np.mean(values.argmax(axis=kind.axis) == fit))
