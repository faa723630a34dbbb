"""Symbolic dims the gradient builder must not see: the ones nothing proves equal.

onnxruntime-training 1.19.2's ``GradientGraphBuilder`` decides at build time over which axes the
gradient of a broadcasting op (Add, Sub, Mul, Div, Pow, Where, Expand, the batch axes of MatMul,
...) is summed. Where both operands have a symbolic dim on an axis it assumes the two symbols are
equal, whatever their names (its "relaxing case"), and sums over nothing. onnx's shape inference,
which the training view needs, names every dim it cannot compute with a fresh symbol
(``unk__0``, ...); so a ``(1, S, D)`` position-embedding row added to ``(N, S, D)`` token
embeddings, whose leading dims are two such symbols, got the ``(N, S, D)`` gradient unreduced;
its Gather gradient then read N*S indices from a buffer of S and wrote rows it did not own. The
gradients were wrong from the first batch (that table's) and garbage or a corrupted heap from the
second on (issue 13: the MiniLM encoder's Fisher differed by a median 36 % between two runs).

`forget_unproven_dims` drops from a training view, wherever they occur, the invented symbols
(none of the graph inputs' own) that meet another symbol or a size other than 1 on a broadcast
axis. A tensor with an unknown dim has no static shape for the builder, which then sums over the
axes onnxruntime's ``BroadcastGradientArgs`` finds at run time: right for any shapes. Clearing a
symbol everywhere matters: onnxruntime infers shapes again when it loads the graph, and would
carry a symbol left upstream back down. Symbols that never meet a different one stay, and with
them the static shapes onnxruntime's fusions need. Two different input symbols meeting on one
axis (``batch`` against ``sequence``) are still taken as equal.
The worker clears every invented symbol after converting a graph down to its opset
(`onnxhq.training.worker_main.forget_invented_dims`): onnx's converter infers shapes again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx

log = logging.getLogger(__name__)

#: Ops whose gradient the builder reduces over broadcast axes it computes from static shapes.
BROADCASTING = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum", "Mean", "PRelu", "Expand"}
)


def forget_unproven_dims(model: onnx.ModelProto) -> int:
    """Clear, in place, the dim symbols no graph input declares that meet, on a broadcast axis,
    another symbol or a size other than 1 (the builder would take them as equal), wherever they
    occur in ``model``'s value_info and outputs. Returns the number of broadcasting nodes with
    such operands (the nodes this protects; logged when any).

    Graph inputs keep their dims (the data's symbols, e.g. the batch axis); numeric dims and the
    other symbols stay, so the rest of the graph keeps its static shapes (and onnxruntime its
    fusions).
    """
    declared = {
        d.dim_param
        for v in model.graph.input
        for d in v.type.tensor_type.shape.dim
        if d.HasField("dim_param")
    }
    risky, symbols = _risky_nodes(model, declared)
    for value in [*model.graph.value_info, *model.graph.output]:
        for dim in _dims(value):
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.Clear()
    if risky:
        log.info(
            "gradient view: %d broadcasting node(s) (first %r) have operand dims not proven "
            "equal; their gradients are reduced over the axes found at run time",
            len(risky),
            risky[0],
        )
    return len(risky)


def _dims(value: onnx.ValueInfoProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
    t = value.type.tensor_type
    if t.HasField("shape"):
        yield from t.shape.dim


def _risky_nodes(model: onnx.ModelProto, declared: set[str]) -> tuple[list[str], set[str]]:
    """Broadcasting nodes with two operands whose dims on one axis may differ at run time while
    the builder would take them as equal: an invented symbol (no input's) against another symbol
    or a size other than 1; and those invented symbols."""
    g = model.graph
    shapes: dict[str, list[onnx.TensorShapeProto.Dimension]] = {
        v.name: list(_dims(v)) for v in [*g.input, *g.value_info, *g.output]
    }
    for t in g.initializer:
        dims = onnx.TensorShapeProto()
        for size in t.dims:
            dims.dim.add().dim_value = size
        shapes[t.name] = list(dims.dim)
    found: list[str] = []
    symbols: set[str] = set()
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Expand":
            names = [node.input[0], node.output[0]]
        elif node.op_type in BROADCASTING or node.op_type == "MatMul":
            names = [n for n in node.input if n]
        else:
            continue
        if not all(n in shapes and all(map(_static, shapes[n])) for n in names):
            continue  # the builder has no static shape here: it broadcasts at run time
        operands = [shapes[n] for n in names]
        if node.op_type == "MatMul":  # only the batch axes broadcast
            operands = [dims[:-2] for dims in operands if len(dims) > 2]
        made = set()
        for i, a in enumerate(operands):
            for b in operands[i + 1 :]:
                made |= _may_differ(a, b, declared)
        if made:
            found.append(node.name or node.output[0])
            symbols |= made
    return found, symbols


def _static(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """Whether the builder reads ``dim`` as a shape (a size > 0 or a symbol)."""
    return dim.dim_value > 0 or dim.HasField("dim_param")


def _may_differ(
    a: list[onnx.TensorShapeProto.Dimension],
    b: list[onnx.TensorShapeProto.Dimension],
    declared: set[str],
) -> set[str]:
    """The invented symbols of ``a`` and ``b`` on axes (right-aligned) where the two may differ."""
    found = set()
    for x, y in zip(reversed(a), reversed(b)):
        made = {d.dim_param for d in (x, y) if d.HasField("dim_param")} - declared
        if made and x != y and 1 not in (x.dim_value, y.dim_value):
            found |= made  # against a 1 the builder reduces, rightly
    return found
