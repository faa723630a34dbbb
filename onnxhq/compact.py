"""Short names in the written graph: exporters' value and node names cost more than small weights.

An exported CNN names every value and node after its framework's layers
(``conv10_depthwise_weights``, ``p2o.BatchNormalization.47``, ``/encoder/layer.0/...``): on a
small model those names are a third of the compressed graph file. `name_plan` gives every
internal value and every named node of a model a base-36 counter instead (graph inputs and
outputs, and names that subgraphs or onnxhq's own tensors use, keep theirs); `compact_graph`
applies it to the rewritten model, with doc strings, inner values' shape annotations and
attributes that hold their default value dropped (the same maths: the schemas define them; also a
convolution's ``kernel_shape``, which must be its weight's shape), and renames the names onnxhq
derives from a quantized weight's (its index tensor, its own codebook, its dequantize node) after
the weight's new name, so the graph still leaves them out (`encode.strip_derived_names`). The
sidecar's streams are named from the same plan (`stream_name`), so graph and sidecar agree and
``decode`` of the pair gives a model whose outputs are the compressed model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import naming
from .graphfile import all_graphs

if TYPE_CHECKING:
    from .coding.layout import StreamLayout
    from .report import LayerRow
    from .sidecar import IndexStream

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class NamePlan:
    """New names: ``values`` (old value name -> new) and ``nodes`` (old node name -> new)."""

    values: Mapping[str, str] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)

    def value(self, name: str) -> str:
        """The new name of value ``name`` (itself where the plan keeps it)."""
        return self.values.get(name, name)


def base36(number: int) -> str:
    """``number`` >= 0 in base 36, lower case: 0, 1, ..., z, 10, ..."""
    digits = ""
    while True:
        number, rest = divmod(number, 36)
        digits = _DIGITS[rest] + digits
        if number == 0:
            return digits


def name_plan(model: onnx.ModelProto) -> NamePlan:
    """Short names for ``model``'s main-graph values and nodes, in order of first use.

    Kept: graph inputs and outputs, every name a subgraph (If, Loop, Scan bodies) or a sparse
    initializer uses, the tensors read by onnxhq's own nodes (a model compressed twice), and
    initializers no node reads.
    """
    graph = model.graph
    keep = {v.name for v in [*graph.input, *graph.output]}
    keep |= {t.values.name for t in graph.sparse_initializer}
    for sub in list(all_graphs(graph))[1:]:
        keep |= set(_names_in(sub))
    keep |= {name for n in graph.node if n.domain == naming.DOMAIN for name in n.input}
    values: dict[str, str] = {}
    fresh = _counter(keep)
    for node in graph.node:
        for name in [*node.input, *node.output]:
            if name and name not in keep and name not in values:
                values[name] = next(fresh)
    nodes: dict[str, str] = {}
    fresh_node = _counter(set())
    for node in graph.node:
        if node.name and node.name not in nodes:
            nodes[node.name] = next(fresh_node)
    return NamePlan(values, nodes)


def compact_graph(model: onnx.ModelProto, plan: NamePlan) -> onnx.ModelProto:
    """A copy of (rewritten) ``model`` with ``plan``'s names, without doc strings, default
    attributes and the shape annotations of inner values (``value_info``).

    Names the plan does not know stay, but for the shape tensors of packed indices. A dequantize
    node's index tensor, own codebook and node name, where they are the ones `naming` derives
    from its weight, are derived from the weight's new name.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    full = dict(plan.values)
    for node in graph.node:
        if node.domain == naming.DOMAIN and node.output:
            full.update(_derived(node.output[0], plan.value(node.output[0])))
    full.update(_shape_names(graph, full))
    for node in graph.node:
        weight = node.output[0] if node.domain == naming.DOMAIN and node.output else None
        if weight is not None and node.name == naming.dequantize_node(weight):
            node.name = naming.dequantize_node(plan.value(weight))
        elif node.name:
            node.name = plan.nodes.get(node.name, node.name)
        _rename(node.input, full)
        _rename(node.output, full)
        node.doc_string = ""
        if node.domain in ("", "ai.onnx"):
            _drop_default_attributes(node)
    for item in graph.initializer:
        item.name = full.get(item.name, item.name)
        item.doc_string = ""
    del graph.value_info[:]  # shapes of inner values: onnxruntime infers them
    out.doc_string = ""
    graph.doc_string = ""
    for v in [*graph.input, *graph.output]:
        v.doc_string = ""
    return out


def _shape_names(graph: onnx.GraphProto, full: Mapping[str, str]) -> dict[str, str]:
    """Short names for the shape tensors of packed dequantize nodes (`naming.shape_tensor`), which
    decode reads by position, not by name; one per shape, shared by its nodes."""
    prefix = naming.shape_tensor(())
    shapes = [t.name for t in graph.initializer if t.name.startswith(prefix)]
    if not shapes:
        return {}
    taken = set(_names_in(graph)) | set(full.values())
    fresh = _counter(taken)
    return {name: next(fresh) for name in shapes}


def stream_name(plan: NamePlan | None, weight: str) -> str:
    """Name of the sidecar stream of quantized weight ``weight`` under ``plan`` (None: kept)."""
    return naming.index_tensor(weight if plan is None else plan.value(weight))


def rename_streams(streams: Iterable[IndexStream], plan: NamePlan) -> list[IndexStream]:
    """``streams`` (named `naming.index_tensor` of their weights) named as ``plan`` says."""
    back = {naming.index_tensor(old): naming.index_tensor(new) for old, new in plan.values.items()}
    return [replace(s, name=back.get(s.name, s.name)) for s in streams]


def weight_rows(
    indices: Mapping[str, np.ndarray], layouts: Iterable[StreamLayout], plan: NamePlan
) -> tuple[LayerRow, ...]:
    """`report.layer_rows` of weights whose streams ``plan`` renamed, under their own names."""
    from .report import layer_rows

    rows = layer_rows({plan.value(w): idx for w, idx in indices.items()}, layouts)
    return tuple(replace(row, name=w) for row, w in zip(rows, indices))


def _derived(weight: str, new: str) -> dict[str, str]:
    book, new_book = naming.codebook_tensor(weight), naming.codebook_tensor(new)
    return {
        naming.index_tensor(weight): naming.index_tensor(new),
        book: new_book,
        naming.codebook_size_tensor(book): naming.codebook_size_tensor(new_book),
    }


#: Attribute defaults that no opset changed: (op, attribute) -> value. Spelled out rather than
#: read from `onnx.defs`, whose defaults of some attributes (Softmax's axis) depend on the opset.
_DEFAULTS: dict[tuple[str, str], object] = {
    **{(op, "group"): 1 for op in ("Conv", "ConvTranspose")},
    **{(op, "auto_pad"): b"NOTSET" for op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool")},
    ("MaxPool", "ceil_mode"): 0,
    ("MaxPool", "storage_order"): 0,
    ("AveragePool", "ceil_mode"): 0,
    ("HardSigmoid", "alpha"): np.float32(0.2),
    ("HardSigmoid", "beta"): np.float32(0.5),
    ("LeakyRelu", "alpha"): np.float32(0.01),
    ("Gemm", "alpha"): 1.0,
    ("Gemm", "beta"): 1.0,
    ("Gemm", "transA"): 0,
    ("Gemm", "transB"): 0,
}
#: Per-axis attributes whose default is all ones (strides, dilations) or all zeros (pads).
_SPATIAL = {"dilations": 1, "strides": 1, "pads": 0}
_WINDOWED = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")
_CONVOLUTIONS = ("Conv", "ConvTranspose")


def _drop_default_attributes(node: onnx.NodeProto) -> None:
    """Remove, in place, the attributes of standard op ``node`` that hold their default value (and
    a convolution's kernel_shape, which its weight's shape gives)."""
    kept = [a for a in node.attribute if not _is_default(node.op_type, a)]
    if len(kept) < len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(kept)


def _is_default(op: str, a: onnx.AttributeProto) -> bool:
    if op in _CONVOLUTIONS and a.name == "kernel_shape":
        return True  # it must equal the weight's spatial dims, which the schema infers it from
    value = onnx.helper.get_attribute_value(a)
    if op in _WINDOWED and a.name in _SPATIAL and a.type == a.INTS:
        return all(v == _SPATIAL[a.name] for v in value)
    default = _DEFAULTS.get((op, a.name))
    return default is not None and type(value) is not list and value == default


def _rename(names, full: Mapping[str, str]) -> None:
    for i, name in enumerate(names):
        if name in full:
            names[i] = full[name]


def _names_in(graph: onnx.GraphProto) -> Iterator[str]:
    yield from (v.name for v in [*graph.input, *graph.output, *graph.value_info])
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield from node.input
        yield from node.output


def _counter(taken: set[str]) -> Iterator[str]:
    number = 0
    while True:
        name = base36(number)
        number += 1
        if name not in taken:
            yield name
