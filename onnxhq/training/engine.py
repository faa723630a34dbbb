"""Session engines: loss, gradients and projected gradients of a model, via onnxruntime.

An engine builds its training view once (`onnxhq.training.graph`), opens a forward and a backward
session on it, and keeps the parameters' current values; every call may override them. Arrays in,
arrays out: callers never see the graph.

`GradientEngine` serves the cross-entropy views (Fisher, Hutchinson, pruning, fine-tuning): labels
are given, or sampled from the model's own softmax. `ProjectionEngine` serves the Gauss-Newton
view of any float output.

Gradient sessions run in onnxruntime-training's worker process (`onnxhq.training.worker`), so the
user's own onnxruntime serves the forward sessions and is never replaced; a graph above the
training build's opset or IR version is converted down there, for the worker only. With
``ONNXHQ_TRAINING_INPROCESS=1`` and this interpreter's onnxruntime the training build, they run in
this process instead (the benchmark's baseline, `tools/bench_worker.py`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError, NumericalError
from ..model import read_initializers
from ..outputs import logits_tensor, projection_output
from ..runtime import make_session
from . import worker
from .graph import (
    LABELS,
    LOSS,
    PROJECTION,
    build_forward_model,
    build_gradient_model,
    build_projection_model,
    build_training_model,
    default_params,
    grad_name,
    gradient_build_error,
)

if TYPE_CHECKING:
    import onnx

Arrays = Mapping[str, np.ndarray]

#: Set to 1 to build and run gradient sessions in this process (its onnxruntime must be the
#: training build); otherwise they run in the worker.
ENV_INPROCESS = "ONNXHQ_TRAINING_INPROCESS"


def in_process() -> bool:
    """Whether gradient sessions run in this process (``ONNXHQ_TRAINING_INPROCESS=1``)."""
    if os.environ.get(ENV_INPROCESS, "") in ("", "0"):
        return False
    if not worker.has_training_build():
        raise worker.TrainingUnavailable(
            f"{ENV_INPROCESS}=1 but this interpreter's onnxruntime is not onnxruntime-training; "
            f"unset {ENV_INPROCESS} to use the gradient worker"
        )
    return True


def gradient_session(training_model: onnx.ModelProto, params: list[str], *, threads: int = 0):
    """A session on the gradient graph of ``training_model``: loss and ``<param>_grad`` outputs.

    Used like an ``onnxruntime.InferenceSession`` (``run(fetch, feed)``). Raises
    `worker.TrainingUnavailable` when no onnxruntime-training is reachable, `ModelError` when the
    graph cannot be built (one line, also when the builder aborts the worker).
    """
    if in_process():
        return make_session(build_gradient_model(training_model, params), threads=threads)
    opset = next((o.version for o in training_model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        session = worker.gradient_session(
            training_model.SerializeToString(),
            LOSS,
            params,
            threads=threads,
            opset=opset,
            ir_version=training_model.ir_version,
        )
    except worker.BuildRefused as exc:
        raise gradient_build_error(str(exc), training_model) from None
    missing = [p for p in params if grad_name(p) not in session.output_names]
    if missing:
        raise ModelError(
            f"no gradient flows to {missing[0]!r}; it does not influence the output the loss reads"
        )
    return session


@dataclass
class SessionEngine:
    """What the gradient views share: the model, the parameters they differentiate (initializer
    names; default `onnxhq.training.graph.default_params`), their current values, and a forward
    and a backward session."""

    model: onnx.ModelProto
    params: list[str] | None = None
    output: str | None = None
    threads: int = 0
    values: dict[str, np.ndarray] = field(init=False, repr=False)
    _grad_session: Any = field(init=False, repr=False)
    _forward_session: Any = field(init=False, repr=False)

    def _bind_params(self) -> list[str]:
        params = default_params(self.model) if self.params is None else list(self.params)
        self.params = params
        self.values = read_initializers(self.model, params)
        return params

    def with_values(self, values: Arrays) -> None:
        """Make ``values`` the default parameter values for later calls (e.g. after training)."""
        self.values = {**self.values, **{k: np.asarray(v) for k, v in values.items()}}

    def _feed(self, inputs: Arrays, params: Arrays | None) -> dict[str, np.ndarray]:
        feed = dict(inputs)
        feed.update(self.values if params is None else {**self.values, **params})
        return feed


@dataclass
class GradientEngine(SessionEngine):
    """Mean cross-entropy of ``model``'s class scores and its gradients for ``params``.

    The forward session gives logits (for sampling labels), the backward one the loss and its
    gradients. ``output`` names the class-score output (default: see
    `onnxhq.outputs.class_score_output`).
    """

    logits_name: str = field(init=False)

    def __post_init__(self) -> None:
        params = self._bind_params()
        training = build_training_model(self.model, params, output=self.output)
        self._grad_outputs = [LOSS] + [grad_name(p) for p in params]
        self._grad_session = gradient_session(training, params, threads=self.threads)
        self.logits_name = logits_tensor(self.model, self.output)
        forward = build_forward_model(self.model, params, self.logits_name)
        self._forward_session = make_session(forward, threads=self.threads)

    def logits(self, inputs: Arrays, params: Arrays | None = None) -> np.ndarray:
        """Class scores (N, C) before any softmax, at the current values (or ``params``)."""
        return self._forward_session.run([self.logits_name], self._feed(inputs, params))[0]

    def sample_labels(
        self, inputs: Arrays, rng: np.random.Generator, params: Arrays | None = None
    ) -> np.ndarray:
        """Labels (N,) int64 drawn from the model's own softmax at the current (or given) values."""
        z = self.logits(inputs, params).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random((len(p), 1))
        return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1).astype(np.int64)

    def loss_and_gradients(
        self, inputs: Arrays, labels: np.ndarray, params: Arrays | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy over the batch and its gradient for every parameter (same shapes)."""
        feed = self._feed(inputs, params)
        feed[LABELS] = np.asarray(labels, dtype=np.int64)
        out = self._grad_session.run(self._grad_outputs, feed)
        loss = float(out[0])
        if not np.isfinite(loss):
            raise NumericalError(
                f"the loss is {loss}; check the inputs' scaling and the labels' range"
            )
        return loss, dict(zip(self.params or [], out[1:]))


@dataclass
class ProjectionEngine(SessionEngine):
    """Gradients ``J^T r`` of ``sum(r * y)`` for output ``y`` of ``model``, w.r.t. ``params``.

    ``params`` default as in `GradientEngine`; ``output`` defaults to the first float graph output
    (`onnxhq.outputs.projection_output`).
    """

    def __post_init__(self) -> None:
        params = self._bind_params()
        self.output, _ = projection_output(self.model, self.output)
        view = build_projection_model(self.model, params, output=self.output)
        self._grad_session = gradient_session(view, params, threads=self.threads)
        self._grad_outputs = [grad_name(p) for p in params]
        self._forward_session = make_session(self.model, threads=self.threads)
        self._shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]] = {}

    def output_shape(self, inputs: Arrays) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the projected output for ``inputs`` (one forward pass per shape)."""
        key = tuple((k, v.shape) for k, v in sorted(inputs.items()))
        if key not in self._shapes:
            y = self._forward_session.run([self.output], dict(inputs))[0]
            self._shapes[key] = (y.shape, y.dtype)
        return self._shapes[key]

    def projected_gradients(self, inputs: Arrays, projection: np.ndarray) -> dict[str, np.ndarray]:
        """``J^T r`` for every parameter (same shapes), summed over the whole batch."""
        feed = self._feed(inputs, None)
        feed[PROJECTION] = projection
        return dict(zip(self.params or [], self._grad_session.run(self._grad_outputs, feed)))
