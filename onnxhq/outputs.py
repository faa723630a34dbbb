"""Which output a loss reads: the class scores of a classifier, or the float output to project.

The cross-entropy views (gradients, Fisher, pruning, fine-tuning, accuracy) read class scores of
shape (N, classes); the Gauss-Newton view reads any float output. These functions pick that
output from the graph, or check the one the caller names.
"""

from __future__ import annotations

import logging
import os

import onnx
from onnx import TensorProto

from .errors import ModelError
from .model import static_shape

log = logging.getLogger(__name__)

#: Element types a loss can read.
FLOAT_OUTPUT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def class_score_output(
    model: onnx.ModelProto | str | os.PathLike, output: str | None = None
) -> tuple[str, bool]:
    """The output that holds class scores, and whether it holds probabilities rather than logits.

    Default: the first float graph output of rank 2 (or, failing that, of unrecorded rank).
    Probabilities are recognised by a producing ``Softmax`` node; `logits_tensor` then takes the
    Softmax input as the logits. A path is read without its external data (only the graph counts).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    if output is not None:
        if output not in outputs:
            raise ModelError(
                f"the model has no output {output!r}; its outputs are {', '.join(outputs)}"
            )
        chosen = output
    else:
        floats = [
            o
            for o in model.graph.output
            if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in FLOAT_OUTPUT_TYPES
        ]
        ranked = [o.name for o in floats if len(static_shape(o)) == 2]
        # Outputs whose rank the file does not record may be the scores too; the loss checks it.
        ranked = ranked or [o.name for o in floats if not o.type.tensor_type.HasField("shape")]
        if not ranked:
            raise ModelError(
                f"no output of rank 2 (N, classes) among {', '.join(outputs)}; "
                "name the class-score output explicitly"
            )
        chosen = ranked[0]
    producer = _producer(model, chosen)
    return chosen, producer is not None and producer.op_type == "Softmax"


def logits_tensor(model: onnx.ModelProto, output: str | None = None) -> str:
    """The tensor to attach the loss to: the class-score output, or the input of its Softmax."""
    chosen, is_prob = class_score_output(model, output)
    if not is_prob:
        return chosen
    producer = _producer(model, chosen)
    assert producer is not None  # class_score_output found it
    axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
    if axis not in (-1, 1):
        raise ModelError(
            f"output {chosen!r} is a Softmax over axis {axis}; onnxhq needs class scores on axis 1"
        )
    log.info(
        "output %r holds probabilities; using the Softmax input %r as logits",
        chosen,
        producer.input[0],
    )
    return producer.input[0]


def projection_output(model: onnx.ModelProto, output: str | None = None) -> tuple[str, int]:
    """The output the Gauss-Newton view projects, and its onnx element type.

    ``output`` if given (it must be a float output), else the first float graph output.
    """
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    if output is not None:
        if output not in outputs:
            raise ModelError(
                f"the model has no output {output!r}; its outputs are {', '.join(outputs)}"
            )
        if outputs[output] not in FLOAT_OUTPUT_TYPES:
            kind = TensorProto.DataType.Name(outputs[output])
            raise ModelError(
                f"output {output!r} has element type {kind}; the Gauss-Newton Hessian needs a "
                "float output"
            )
        return output, outputs[output]
    for name, elem in outputs.items():
        if elem in FLOAT_OUTPUT_TYPES:
            return name, elem
    raise ModelError(
        f"no float output among {', '.join(outputs)}; the Gauss-Newton Hessian needs one"
    )


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)
