"""Which output a loss reads, and what kind of values it holds.

Three output kinds (`OUTPUT_KINDS`), each with its own Fisher (`onnxhq.hessian.output_fisher`):

``classes``
    Class probabilities or logits of any rank: a softmax over one axis (the last, unless the
    Softmax node says otherwise), every other axis a sample (sequences, CTC, segmentation).
``bernoulli``
    Independent probabilities or logits per entry (sigmoid maps, multi-label).
``real``
    Anything else real-valued (embeddings, regression, boxes).

`resolve_output` finds the output (the first float graph output unless named) and its kind: it
walks back from the output through Identity, Cast, Reshape, Flatten, Squeeze, Unsqueeze and
Transpose to the node that makes the values; a Softmax or LogSoftmax means ``classes``, a Sigmoid
``bernoulli`` (the Fisher then differentiates that node's input, the logits). Without either, a
rank-2 output made by Gemm or MatMul (or a bias Add after one) holds class logits; anything else
is ``real``. ``NAME:KIND`` (`parse_output_spec`) overrides the detection.

`class_score_output` and `logits_tensor` serve the true-label cross-entropy views (rank 2 only);
`projection_output` the Gauss-Newton view of a graph output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .errors import ModelError
from .model import static_shape
from .options.parts import OptionError
from .options.vocabulary import OUTPUT_KINDS

log = logging.getLogger(__name__)

#: Element types a loss can read.
FLOAT_OUTPUT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
#: Ops that move values without changing them: the producer search walks through them.
PASS_THROUGH = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")
#: Ops whose output, rank 2, is read as class logits when no Softmax follows.
_LINEAR = ("Gemm", "MatMul")


@dataclass(frozen=True)
class OutputSpec:
    """An output as the caller names it: ``name`` (None: detect) and ``kind`` (None: detect).

    ``kind`` is one of `OUTPUT_KINDS`. ``str(spec)`` is the ``NAME[:KIND]`` text it parses from.
    """

    name: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not (isinstance(self.name, str) and self.name):
            raise OptionError(f"output={self.name!r} must be a non-empty output name", "output")
        if self.kind is not None and self.kind not in OUTPUT_KINDS:
            raise OptionError(
                f"output kind {self.kind!r} is unknown; choose one of {', '.join(OUTPUT_KINDS)}",
                "output",
            )

    def __str__(self) -> str:
        return f"{self.name or ''}{':' + self.kind if self.kind else ''}"


def parse_output_spec(text: str | OutputSpec | None) -> OutputSpec:
    """``"NAME"``, ``"NAME:KIND"`` or ``":KIND"`` (first float output) as an `OutputSpec`.

    The text after the last colon is a kind only when it is one of `OUTPUT_KINDS`, so names that
    hold colons (``"dense/Softmax:0"``) stay whole. None and an `OutputSpec` pass through.
    """
    if text is None:
        return OutputSpec()
    if isinstance(text, OutputSpec):
        return text
    if not isinstance(text, str) or not text:
        raise OptionError(f"output={text!r} must be NAME or NAME:KIND", "output")
    name, sep, kind = text.rpartition(":")
    if sep and kind in OUTPUT_KINDS:
        return OutputSpec(name or None, kind)
    if sep and not name:
        raise OptionError(
            f"output={text!r}: {kind!r} is no output kind; choose one of {', '.join(OUTPUT_KINDS)}",
            "output",
        )
    return OutputSpec(text, None)


#: One output as the caller names it (``NAME[:KIND]``), or None: detect.
Named = str | OutputSpec | None


def output_list(output: Named | Sequence[str | OutputSpec]) -> list[Named]:
    """The outputs a loss reads, one or several (``["a:classes", "b:real"]``): a list of one
    ``NAME[:KIND]`` (or None, detect) each; an empty or repeated list is an `OptionError`."""
    if output is None or isinstance(output, (str, OutputSpec)):
        return [output]
    named: list[Named] = list(output)
    names = [parse_output_spec(o).name for o in named]
    if not named or len(set(names)) != len(names):
        raise OptionError(
            f"output={[str(o) for o in named]!r} must name each output once, at least one",
            "output",
        )
    return named


@dataclass(frozen=True)
class ModelOutput:
    """A resolved output: graph output ``name``, its ``kind``, the ``tensor`` the Fisher
    differentiates (the logits before a Softmax or Sigmoid, else the output itself), and for
    ``classes`` the class ``axis`` of that tensor (negative counts from the end); ``flat``: the
    classes span every axis from ``axis`` on (a Softmax of opset < 13)."""

    name: str
    kind: str
    tensor: str
    axis: int | None = None
    flat: bool = False


def resolve_output(
    model: onnx.ModelProto | str | os.PathLike, output: str | OutputSpec | None = None
) -> ModelOutput:
    """The output the Fisher reads and its kind (see the module doc); ``output`` is ``NAME[:KIND]``.

    Raises `ModelError` for a name the model lacks, a non-float output, or no float output.
    """
    model = _graph_of(model)
    spec = parse_output_spec(output)
    name = _float_output(model, spec.name)
    node = _head(model, name)
    op = node.op_type if node is not None else None
    kind = spec.kind
    if kind is None:
        if op in ("Softmax", "LogSoftmax"):
            kind = "classes"
        elif op == "Sigmoid":
            kind = "bernoulli"
        else:
            kind = "classes" if _looks_like_logits(model, name, node) else "real"
    tensor, axis, flat = name, None, False
    if kind == "classes":
        axis = -1
        if op in ("Softmax", "LogSoftmax") and node is not None:
            tensor, (axis, flat) = node.input[0], _softmax_axis(model, node)
    elif kind == "bernoulli" and op == "Sigmoid" and node is not None:
        tensor = node.input[0]
    if spec.kind is None:
        log.info(
            "output %r: %s%s",
            name,
            kind,
            f" (the Fisher reads {tensor!r})" if tensor != name else "",
        )
    return ModelOutput(name, kind, tensor, axis, flat)


def reaching(model: onnx.ModelProto, tensor: str, params: Sequence[str]) -> list[str]:
    """Those of ``params`` (in their order) that ``tensor`` depends on in the main graph: the
    weights an output's Fisher can see (a head of another output is not among them)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    seen, todo = set(), [tensor]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None:
            todo.extend(i for i in (*node.input, *_read_by_subgraphs(node)) if i)
    return [p for p in params if p in seen]


def _read_by_subgraphs(node: onnx.NodeProto) -> list[str]:
    """The names the subgraphs of ``node`` (If branches, Loop and Scan bodies) read, their own
    and those of the enclosing scopes alike."""
    names: list[str] = []
    graphs = [g for a in node.attribute for g in (*([a.g] if a.HasField("g") else []), *a.graphs)]
    while graphs:
        graph = graphs.pop()
        for inner in graph.node:
            names.extend(inner.input)
            graphs.extend(
                g for a in inner.attribute for g in (*([a.g] if a.HasField("g") else []), *a.graphs)
            )
    return names


def class_score_output(
    model: onnx.ModelProto | str | os.PathLike, output: str | OutputSpec | None = None
) -> tuple[str, bool]:
    """The output that holds class scores (N, classes), and whether it holds probabilities.

    Default: the first float graph output of rank 2 (or, failing that, of unrecorded rank).
    Probabilities are recognised by a ``Softmax`` node making the output (through the ops of
    `PASS_THROUGH`); `logits_tensor` then takes its input as the logits. A path is read without
    its external data (only the graph counts).
    """
    model = _graph_of(model)
    outputs = [o.name for o in model.graph.output]
    named = parse_output_spec(output).name
    if named is not None:
        if named not in outputs:
            raise ModelError(
                f"the model has no output {named!r}; its outputs are {', '.join(outputs)}"
            )
        chosen = named
    else:
        floats = [o for o in model.graph.output if _is_float(o)]
        ranked = [o.name for o in floats if len(static_shape(o)) == 2]
        # Outputs whose rank the file does not record may be the scores too; the loss checks it.
        ranked = ranked or [o.name for o in floats if not o.type.tensor_type.HasField("shape")]
        if not ranked:
            raise ModelError(
                f"no output of rank 2 (N, classes) among {', '.join(outputs)}; "
                "name the class-score output explicitly"
            )
        chosen = ranked[0]
    producer = _head(model, chosen)
    return chosen, producer is not None and producer.op_type == "Softmax"


def logits_tensor(model: onnx.ModelProto, output: str | OutputSpec | None = None) -> str:
    """The tensor to attach the loss to: the class-score output, or the input of its Softmax."""
    chosen, is_prob = class_score_output(model, output)
    if not is_prob:
        return chosen
    producer = _head(model, chosen)
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


def projection_output(
    model: onnx.ModelProto, output: str | OutputSpec | None = None
) -> tuple[str, int]:
    """The output the Gauss-Newton view projects, and its onnx element type.

    ``output`` if given (it must be a float output), else the first float graph output.
    """
    name = _float_output(model, parse_output_spec(output).name)
    value = next(o for o in model.graph.output if o.name == name)
    return name, value.type.tensor_type.elem_type


def _graph_of(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=False)


def _is_float(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and (
        value.type.tensor_type.elem_type in FLOAT_OUTPUT_TYPES
    )


def _float_output(model: onnx.ModelProto, name: str | None) -> str:
    outputs = {o.name: o for o in model.graph.output}
    if name is None:
        first = next((o.name for o in model.graph.output if _is_float(o)), None)
        if first is None:
            raise ModelError(
                f"no float output among {', '.join(outputs)}; the Hessian needs one to read"
            )
        return first
    if name not in outputs:
        raise ModelError(f"the model has no output {name!r}; its outputs are {', '.join(outputs)}")
    if not _is_float(outputs[name]):
        kind = TensorProto.DataType.Name(outputs[name].type.tensor_type.elem_type)
        raise ModelError(f"output {name!r} has element type {kind}; the Hessian needs a float one")
    return name


def _head(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The node that makes ``tensor``'s values, past the ops of `PASS_THROUGH`."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(tensor)
    while node is not None and node.op_type in PASS_THROUGH and node.input:
        node = producers.get(node.input[0])
    return node


def _looks_like_logits(model: onnx.ModelProto, name: str, node: onnx.NodeProto | None) -> bool:
    """A rank-2 output (N, classes >= 2) made by a linear layer, with or without a bias Add."""
    value = next(o for o in model.graph.output if o.name == name)
    shape = static_shape(value) if value.type.tensor_type.HasField("shape") else None
    if shape is not None and (len(shape) != 2 or shape[1] == 1):
        return False
    if node is None:
        return False
    if node.op_type in _LINEAR:
        return True
    if node.op_type != "Add":
        return False
    producers = {o: n for n in model.graph.node for o in n.output}
    return any(i in producers and producers[i].op_type in _LINEAR for i in node.input)


def _softmax_axis(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[int, bool]:
    """The class axis of a Softmax's input, and whether the classes span every axis from it on
    (opsets below 13 flatten the input there: the same as one axis when it is the last)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    default = -1 if opset >= 13 else 1
    axis = next((a.i for a in node.attribute if a.name == "axis"), default)
    return axis, opset < 13 and axis != -1
