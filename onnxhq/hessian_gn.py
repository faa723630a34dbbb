"""A training view for Gauss-Newton diagonals of any float output: loss = ``sum(r * y)``.

The output ``y`` of a regression or embedding model is not a class distribution, so the
cross-entropy view of `onnxhq.gradients` does not apply. Here a projection ``r`` shaped like ``y``
is fed as an input and the loss is ``sum(r * y)``; its gradient is ``J^T r`` (``J`` the Jacobian of
``y`` for the parameters). With Rademacher ``r``, ``E[(J^T r)^2] = diag(J^T J)``: the Gauss-Newton
diagonal of the squared error ``1/2 ||y(w) - y(w0)||^2`` at ``w0``, which is also its exact Hessian
there because the residual is zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper

from .errors import ModelError
from .gradients import (LOSS, SessionEngine, add_gradient_outputs, build_gradient_model,
                        frozen_batchnorm_as_affine, grad_name)
from .model import initializer_map
from .runtime import make_session

log = logging.getLogger(__name__)

PROJECTION = "onnxhq_projection"
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)


def projection_output(model: onnx.ModelProto, output: str | None = None) -> tuple[str, int]:
    """The output to project and its element type: ``output``, or the first float graph output."""
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    if output is not None:
        if output not in outputs:
            raise ModelError(f"the model has no output {output!r}; its outputs are {', '.join(outputs)}")
        if outputs[output] not in _FLOATS:
            raise ModelError(f"output {output!r} has element type "
                             f"{TensorProto.DataType.Name(outputs[output])}; the Gauss-Newton Hessian needs a "
                             "float output")
        return output, outputs[output]
    for name, elem in outputs.items():
        if elem in _FLOATS:
            return name, elem
    raise ModelError(f"no float output among {', '.join(outputs)}; the Gauss-Newton Hessian needs one")


def build_projection_model(model: onnx.ModelProto, params: Iterable[str], *, output: str | None = None
                           ) -> onnx.ModelProto:
    """The model with ``params`` as graph inputs, an input ``onnxhq_projection`` and loss ``sum(r * y)``."""
    params = list(params)
    m = onnx.inliner.inline_local_functions(model) if model.functions else _copy(model)
    frozen_batchnorm_as_affine(m)
    chosen, elem = projection_output(m, output)
    inits = initializer_map(m)
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(f"cannot differentiate {missing[0]!r}: it is not an initializer of the model")
    moved = set(params)
    keep = [t for t in m.graph.initializer if t.name not in moved]
    moved_tensors = [inits[p] for p in params]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for t in moved_tensors:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.graph.input.append(helper.make_tensor_value_info(PROJECTION, elem, None))
    projected = f"{PROJECTION}__product"
    m.graph.node.extend([
        helper.make_node("Mul", [chosen, PROJECTION], [projected], name="onnxhq_projection_mul"),
        helper.make_node("ReduceSum", [projected], [LOSS], name="onnxhq_projection_sum", keepdims=0),
    ])
    add_gradient_outputs(m)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(LOSS, elem, []))
    return m


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@dataclass
class ProjectionEngine(SessionEngine):
    """Gradients ``J^T r`` of ``sum(r * y)`` for output ``y`` of ``model``, w.r.t. ``params``.

    ``params`` default as in `onnxhq.gradients.GradientEngine`; ``output`` defaults to the first
    float graph output.
    """

    def __post_init__(self) -> None:
        self._bind_params()
        self.output, _ = projection_output(self.model, self.output)
        view = build_projection_model(self.model, self.params, output=self.output)
        self._grad_session = make_session(build_gradient_model(view, self.params), threads=self.threads)
        self._grad_outputs = [grad_name(p) for p in self.params]
        self._forward_session = make_session(self.model, threads=self.threads)
        self._shapes: dict[tuple, tuple[tuple[int, ...], np.dtype]] = {}

    def output_shape(self, inputs: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the projected output for ``inputs`` (one forward pass per input shape)."""
        key = tuple((k, v.shape) for k, v in sorted(inputs.items()))
        if key not in self._shapes:
            y = self._forward_session.run([self.output], dict(inputs))[0]
            self._shapes[key] = (y.shape, y.dtype)
        return self._shapes[key]

    def projected_gradients(self, inputs: Mapping[str, np.ndarray], projection: np.ndarray) -> dict[str, np.ndarray]:
        """``J^T r`` for every parameter (same shapes), summed over the whole batch."""
        feed = dict(inputs)
        feed.update(self.values)
        feed[PROJECTION] = projection
        return dict(zip(self.params, self._grad_session.run(self._grad_outputs, feed)))
