"""The engine of the output-kind Fisher: the tensor an output's distribution is made from, and
projected gradients of it.

Every Fisher of `onnxhq.hessian.output_fisher` is ``E (J^T r)^2`` for the Jacobian ``J`` of one
tensor ``t`` (the logits before a Softmax or Sigmoid, or a real output itself) and a residual
``r`` drawn from the model's own distribution over ``t``. So one view serves them all: the
projection ``sum(r * t)`` of `onnxhq.training.graph.build_projection_model`, whose gradient is
``J^T r``, and a forward session that reads ``t``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..model import read_initializers
from ..outputs import ModelOutput, OutputSpec, resolve_output
from ..runtime import make_session
from .engine import gradient_session
from .graph import PROJECTION, InputShapes, build_forward_model, build_projection_model, grad_name

if TYPE_CHECKING:
    import onnx

Arrays = Mapping[str, np.ndarray]


class OutputEngine:
    """Projected gradients ``J^T r`` of the tensor behind one output of ``model``.

    Parameters
    ----------
    model : the model (weights as initializers).
    params : the initializers to differentiate.
    output : ``NAME[:KIND]``, an `OutputSpec` or a resolved `ModelOutput` (None: detect, see
        `onnxhq.outputs.resolve_output`).
    input_shapes : dims to pin in the gradient view (the data's, batch axis None).
    threads : onnxruntime threads (0: its choice).

    Raises `ModelError` when the gradient graph cannot be built (the op and node named).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        params: list[str],
        *,
        output: str | OutputSpec | ModelOutput | None = None,
        input_shapes: InputShapes | None = None,
        threads: int = 0,
    ) -> None:
        self.output = output if isinstance(output, ModelOutput) else resolve_output(model, output)
        self.params = list(params)
        self.values = read_initializers(model, self.params)
        tensor = self.output.tensor
        view = build_projection_model(model, self.params, tensor=tensor, input_shapes=input_shapes)
        self._grad_outputs = [grad_name(p) for p in self.params]
        self._grad_session = gradient_session(view, self.params, threads=threads)
        self._forward_session = make_session(
            build_forward_model(model, [], tensor), threads=threads
        )

    def forward(self, inputs: Arrays) -> np.ndarray:
        """The tensor ``t`` (logits, or the real output) for ``inputs``."""
        return self._forward_session.run([self.output.tensor], dict(inputs))[0]

    def projected_gradients(self, inputs: Arrays, projection: np.ndarray) -> dict[str, np.ndarray]:
        """``J^T r`` for every parameter (same shapes), summed over the batch; ``r`` like ``t``."""
        feed = {**dict(inputs), **self.values, PROJECTION: projection}
        return dict(zip(self.params, self._grad_session.run(self._grad_outputs, feed)))
