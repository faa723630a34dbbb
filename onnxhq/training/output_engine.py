"""The engine of the output-kind Fisher: the tensors the outputs' distributions are made from,
and projected gradients of them.

Every Fisher of `onnxhq.hessian.output_fisher` is ``E (J^T r)^2`` for the Jacobian ``J`` of one
tensor ``t`` (the logits before a Softmax or Sigmoid, or a real output itself) and a residual
``r`` drawn from the model's own distribution over ``t``. So one view serves them all: the
projection ``sum(r * t)`` of `onnxhq.training.graph.build_projection_model`, whose gradient is
``J^T r``, and a forward session that reads ``t``. Several outputs share one view: the loss
``sum_k sum(r_k * t_k)`` (gradient ``sum_k J_k^T r_k``; a zero ``r_k`` leaves output ``k`` out)
and one forward session that reads every ``t_k`` in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, ModelError
from ..model import read_initializers
from ..outputs import ModelOutput, OutputSpec, reaching, resolve_output
from ..runtime import make_session
from .engine import gradient_session
from .graph import (
    InputShapes,
    build_forward_model,
    build_projection_model,
    grad_name,
    projection_name,
)

if TYPE_CHECKING:
    import onnx

Arrays = Mapping[str, np.ndarray]
Named = str | OutputSpec | ModelOutput | None


class OutputEngine:
    """Projected gradients ``sum_k J_k^T r_k`` of the tensors behind one or several outputs of
    ``model``, from one gradient session.

    Parameters
    ----------
    model : the model (weights as initializers).
    params : the initializers to differentiate; each must reach at least one output.
    output : ``NAME[:KIND]``, an `OutputSpec` or a resolved `ModelOutput` (None: detect, see
        `onnxhq.outputs.resolve_output`), or a list of several.
    input_shapes : dims to pin in the gradient view (the data's, batch axis None).
    threads : onnxruntime threads (0: its choice).

    Attributes: ``outputs`` (resolved, in order), ``output`` (the first), ``reached`` (per
    output, the ``params`` it depends on, `onnxhq.outputs.reaching`; all of them for one output).

    Raises `ModelError` when the gradient graph cannot be built (the op and node named), or, of
    several outputs, when a parameter reaches none of them.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        params: list[str],
        *,
        output: Named | Sequence[Named] = None,
        input_shapes: InputShapes | None = None,
        threads: int = 0,
    ) -> None:
        named: list[Named] = (
            list(output)
            if isinstance(output, Sequence) and not isinstance(output, str)
            else [output]
        )
        self.outputs = [_resolved(model, o) for o in named]
        self.params = list(params)
        if len(self.outputs) == 1:  # the gradient builder says what one output cannot reach
            self.reached = [list(self.params)]
        else:
            self.reached = [reaching(model, o.tensor, self.params) for o in self.outputs]
            _check_reached(self.params, self.reached, self.outputs)
        self.values = read_initializers(model, self.params)
        tensors = [o.tensor for o in self.outputs]
        view = build_projection_model(model, self.params, tensor=tensors, input_shapes=input_shapes)
        self._grad_session = gradient_session(view, self.params, threads=threads)
        self._tensors = list(dict.fromkeys(tensors))  # an output's tensor read once
        self._forward_session = make_session(
            build_forward_model(model, [], self._tensors), threads=threads
        )

    @property
    def output(self) -> ModelOutput:
        """The first output (the only one of a single-output engine)."""
        return self.outputs[0]

    def forward(self, inputs: Arrays) -> list[np.ndarray]:
        """The tensors ``t_k`` (logits, or the real output), one per output, for ``inputs``: one
        forward pass for all."""
        found = dict(zip(self._tensors, self._forward_session.run(self._tensors, dict(inputs))))
        return [found[o.tensor] for o in self.outputs]

    def projected_gradients(
        self,
        inputs: Arrays,
        projection: np.ndarray | Sequence[np.ndarray],
        *,
        params: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """``sum_k J_k^T r_k`` for each of ``params`` (default all; same shapes), summed over the
        batch. ``projection``: ``r`` like ``t`` for one output, else one ``r_k`` per output."""
        rs = [projection] if isinstance(projection, np.ndarray) else list(projection)
        if len(rs) != len(self.outputs):
            raise ConfigError(
                f"{len(rs)} projections for {len(self.outputs)} outputs; give one each"
            )
        fetch = self.params if params is None else list(params)
        feed = {**dict(inputs), **self.values}
        feed.update((projection_name(i), r) for i, r in enumerate(rs))
        grads = self._grad_session.run([grad_name(p) for p in fetch], feed)
        return dict(zip(fetch, grads))


def _resolved(model: onnx.ModelProto, output: Named) -> ModelOutput:
    return output if isinstance(output, ModelOutput) else resolve_output(model, output)


def _check_reached(params: list[str], reached: list[list[str]], outputs: list[ModelOutput]) -> None:
    unseen = [p for p in params if not any(p in r for r in reached)]
    if unseen:
        names = ", ".join(repr(o.name) for o in outputs)
        raise ModelError(
            f"weight {unseen[0]!r} does not affect the outputs {names} the Hessian reads; name "
            "the outputs it feeds too (--output-name, once per output)"
        )
