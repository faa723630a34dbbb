"""Equal-valued rewrites of ops that onnxruntime-training 1.19.2 cannot differentiate.

Its ``GradientGraphBuilder`` stops at the first op without a registered gradient ("The gradient
builder has not been registered: HardSigmoid for node ..."); some ops get a gradient graph that
the CPU build cannot run (ConvTranspose, Resize) or that computes wrongly (pools over symbolic
dims). Before the gradient graph is built, `make_differentiable` replaces such nodes by
subgraphs computing the same values up to float rounding; the rules, one per op, are in
`onnxhq.differentiable_ops`.

Models below opset 14 are converted to opset 17 first (Clip's gradient needs opset-12 ops, and
onnx infers run-time Reshape ranks only from opset 14), and the result carries onnx's inferred
``value_info``: the builder needs the shape of every Concat input.

Nodes a rule cannot handle (an unknown rank, Dropout in training mode) are kept; `unsupported_ops`
lists what would still stop the builder so the error can name the op and the node.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

from .differentiable_ops import REWRITES
from .errors import ModelError

log = logging.getLogger(__name__)

#: Models below this opset are converted to `TARGET_OPSET` first (see `make_differentiable`).
MIN_OPSET = 14
TARGET_OPSET = 17
#: Ops the gradient builder of onnxruntime-training 1.19.2 refuses (probed one by one); those in
#: `REWRITES` are handled by `make_differentiable`.
NO_GRADIENT = frozenset(
    {
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "Elu",
        "Selu",
        "Celu",
        "PRelu",
        "ThresholdedRelu",
        "BatchNormalization",
        "Dropout",
        "Sum",
        "Mean",
        "LRN",
        "ConvTranspose",
        "Resize",  # these two build, but the CPU build has no kernel for the grad
        "InstanceNormalization",
        "LpNormalization",
        "GlobalMaxPool",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
        "ReduceL1",
        "DepthToSpace",
        "SpaceToDepth",
        "Einsum",
        "CumSum",
        "Atan",
        "Shrink",
        "Hardmax",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
    }
)
_BUILDER_ERROR = re.compile(r"has not been registered:\s*(\S+) for node (.*?)\s*$", re.M)


def make_differentiable(
    model: onnx.ModelProto, *, input_shapes: Mapping[str, Sequence[int | None]] | None = None
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every rewritable node replaced; and the number of nodes replaced.

    A model below opset `MIN_OPSET` is first converted to `TARGET_OPSET` (values unchanged):
    onnx infers the ranks of run-time Reshape outputs only from opset 14 on, and the builder
    needs them. If the conversion fails, the model is rewritten at its own opset. Only the main
    graph is rewritten (the builder does not differentiate If/Loop bodies). Values equal the
    original's up to float rounding; ``model`` is not changed.

    ``input_shapes`` pins the dims of the named graph inputs (None keeps a dim symbolic, as the
    batch axis should stay): onnxruntime-training 1.19.2's MaxPool gradient is wrong (or
    crashes) when the pooled spatial dims are symbolic, so pin them to the data's shape.
    """
    out = _upgraded(model)
    if input_shapes:
        _pin_inputs(out, input_shapes)
    ctx = RewriteContext(out)
    nodes, replaced = [], 0
    for node in out.graph.node:
        rule = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        new = rule(node, ctx) if rule else None
        if new is None:
            nodes.append(node)
            continue
        nodes.extend(new)
        replaced += 1
    if replaced:
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    # Best effort: without value_info the builder may still succeed.
    with contextlib.suppress(Exception):
        out = onnx.shape_inference.infer_shapes(out, data_prop=True)
    return out, replaced


def _pin_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | None]]) -> None:
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ModelError(
                f"cannot pin the shape of {name!r}: the model has no such input; "
                f"its inputs are {', '.join(inputs)}"
            )
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ModelError(
                f"cannot pin input {name!r} of rank {len(dims)} to shape "
                f"{tuple(shape)}; give one size (or None) per axis"
            )
        for dim, size in zip(dims, shape):
            if size is not None:
                dim.Clear()
                dim.dim_value = int(size)
    del model.graph.value_info[:]  # stale symbolic shapes would shadow the pinned ones


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        try:
            return onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:  # the converter lacks an adapter for some op: keep the opset
            log.info(
                "gradient view stays at opset %d: conversion to %d failed (%s)",
                opset,
                TARGET_OPSET,
                str(exc)[:200],
            )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def unsupported_ops(
    model: onnx.ModelProto,
    params: Iterable[str] | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> list[tuple[str, str]]:
    """``(op_type, node name)`` of the nodes the builder would still refuse after the rewrites.

    Best effort: nodes on a float path from ``params`` (default: every float initializer with
    more than one element) to a graph output whose op is in `NO_GRADIENT` or outside the
    default domain, and pools whose gradient 1.19.2 computes wrongly: a MaxPool whose input has
    symbolic spatial dims, an AveragePool left with any symbolic dim (pin ``input_shapes`` as
    in `make_differentiable`). A node without a name is shown by its first output.
    """
    rewritten, _ = make_differentiable(model, input_shapes=input_shapes)
    graph = rewritten.graph
    types = _value_types(rewritten)
    if params is None:
        params = [
            t.name
            for t in graph.initializer
            if t.data_type in _FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > 1
        ]
    reached = set(params)
    on_path = []
    for node in graph.node:  # nodes are topologically sorted
        if any(name in reached for name in node.input):
            reached.update(
                o for o in node.output if o not in types or types[o].elem_type in _FLOAT_TYPES
            )
            on_path.append(node)
    needed = {o.name for o in graph.output}
    found = []
    for node in reversed(on_path):
        if not any(o in needed for o in node.output):
            continue
        needed.update(node.input)
        foreign = node.domain not in ("", "ai.onnx")
        symbolic_pool = node.op_type in ("MaxPool", "AveragePool") and not _static_dims(
            types.get(node.input[0]), first=2 if node.op_type == "MaxPool" else 0
        )
        if foreign or node.op_type in NO_GRADIENT or symbolic_pool:
            found.append((node.op_type, node.name or node.output[0]))
    return found[::-1]


def parse_builder_error(message: str) -> tuple[str, str] | None:
    """``(op_type, node name)`` from the builder's "has not been registered" error, else None."""
    match = _BUILDER_ERROR.search(message)
    return (match.group(1), match.group(2)) if match else None


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    """Tensor name -> its recorded tensor type (inputs, value_info, outputs, initializers)."""
    g = model.graph
    types = {
        v.name: v.type.tensor_type
        for v in [*g.input, *g.value_info, *g.output]
        if v.type.HasField("tensor_type")
    }
    types.update(
        {
            t.name: helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type
            for t in g.initializer
        }
    )
    return types


def _static_dims(t: onnx.TypeProto.Tensor | None, *, first: int) -> bool:
    """Whether the dims of ``t`` from axis ``first`` on are all known numbers."""
    if t is None or not t.HasField("shape") or len(t.shape.dim) < 3:
        return False
    return all(d.HasField("dim_value") for d in t.shape.dim[first:])


class RewriteContext:
    """What the rules need: fresh names, typed constants, opset, inferred ranks and types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        names = {n.name for n in model.graph.node}
        names |= {x for n in model.graph.node for x in (*n.input, *n.output)}
        g = model.graph
        names |= {v.name for v in [*g.input, *g.output, *g.initializer]}
        self._taken = names
        self._constants = {t.name: t for t in g.initializer}
        self._constants.update(
            {
                n.output[0]: a.t
                for n in g.node
                if n.op_type == "Constant"
                for a in n.attribute
                if a.name == "value"
            }
        )
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # no ranks or types known: rules that need a rank leave their node
            inferred = model
        self._types = _value_types(inferred)

    def builder(self, node: onnx.NodeProto) -> NodeBuilder:
        """A builder of the nodes that replace ``node``."""
        return NodeBuilder(node, self)

    def attr(self, node: onnx.NodeProto, name: str, default):
        """The value of attribute ``name`` of ``node`` (strings as bytes), else ``default``."""
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output ``name``; None if not constant."""
        if name in self._constants:
            return numpy_helper.to_array(self._constants[name])
        return None

    def fresh(self, base: str, tag: str) -> str:
        """The one naming function of this module: ``<base>/onnxhq_<tag>``, made unique."""
        name, i = f"{base}/onnxhq_{tag}", 1
        while name in self._taken:
            name, i = f"{base}/onnxhq_{tag}_{i}", i + 1
        self._taken.add(name)
        return name

    def rank(self, name: str) -> int | None:
        t = self._types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def dim(self, name: str, axis: int) -> int | None:
        t = self._types.get(name)
        if t is None or not t.HasField("shape") or len(t.shape.dim) <= axis:
            return None
        d = t.shape.dim[axis]
        return d.dim_value if d.HasField("dim_value") else None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        t = self._types.get(name)
        if t is None or not t.HasField("shape"):
            return None
        dims = t.shape.dim
        known = all(d.HasField("dim_value") for d in dims)
        return tuple(d.dim_value for d in dims) if known else None

    def dtype(self, name: str) -> np.dtype:
        t = self._types.get(name)
        elem = t.elem_type if t is not None and t.elem_type else TensorProto.FLOAT
        return helper.tensor_dtype_to_np_dtype(elem)


class NodeBuilder:
    """Collects the replacement nodes of one rewritten node; the last one writes its output."""

    def __init__(self, node: onnx.NodeProto, ctx: RewriteContext) -> None:
        self.node, self.ctx = node, ctx
        self.nodes: list[onnx.NodeProto] = []
        self.base = node.name or node.output[0]
        self.dtype = ctx.dtype(node.input[0])

    def const(self, value, dtype: npt.DTypeLike | None = None) -> str:
        out = self.ctx.fresh(self.base, "c")
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=out, value=numpy_helper.from_array(array, out)
            )
        )
        return out

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.ctx.fresh(self.base, op_type.lower())
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), [out], name=self.ctx.fresh(self.base, op_type), **attrs
            )
        )
        return out

    def finish(self, op_type: str, *inputs: str, **attrs) -> list[onnx.NodeProto]:
        self.op(op_type, *inputs, out=self.node.output[0], **attrs)
        return self.nodes
