"""Load-time graph clean-up: weights that exporters hide become plain initializers.

`onnxhq.model.load_model` runs these passes, in place, on every model it loads: constant subgraphs
(``Constant``, ``ConstantOfShape`` and data-movement ops on constants) folded into initializers,
graph inputs that only restate an initializer dropped, and ``Identity(initializer)`` bypassed.
Each returns how much it changed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .graphfile import all_graphs

log = logging.getLogger(__name__)


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that an initializer of the same name backs, in place; returns how many.

    Old exporters (IR < 4) list every weight as a graph input too. As inputs they could be fed at
    run time, so they are not constants to quantize; in practice nobody feeds them.
    """
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        log.info("treating %d initializers that are also graph inputs as constants", dropped)
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)  # IR 3 required initializers to be inputs
    return dropped


def bypass_initializer_identities(model: onnx.ModelProto) -> int:
    """Let consumers of ``Identity(initializer)`` read the initializer itself, in place.

    Some exporters route weights through Identity nodes, which would hide them from the weight
    slots of Conv/Gemm/MatMul. Identities that produce a graph output are kept. Returns how many
    were removed.
    """
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Identity"
        and n.domain in ("", "ai.onnx")
        and n.input
        and n.input[0] in inits
        and n.output[0] not in outputs
    }
    if not alias:
        return 0
    keep = [
        n
        for n in model.graph.node
        if not (n.op_type == "Identity" and n.output and n.output[0] in alias)
    ]
    for node in keep:
        for pos, name in enumerate(node.input):
            if name in alias:
                node.input[pos] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


#: Ops that only move or retype data: folded when all their inputs are constant, so a weight an
#: exporter stores as e.g. Reshape(ConstantOfShape(...)) or Transpose(W) becomes one initializer.
FOLDABLE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast")


def materialize_constants(model: onnx.ModelProto) -> int:
    """Turn constant subgraphs into initializers, in place; returns the number of nodes replaced.

    ``Constant`` and ``ConstantOfShape`` nodes become initializers, and so do the ops in
    `FOLDABLE_OPS` once all their inputs are initializers (also those old exporters list as graph
    inputs too, which `load_model` treats as weights). Exporters (and the onnx backend test models)
    carry weights this way; as initializers they can be quantized. Initializers only the folded
    nodes read are dropped.
    """
    graph = model.graph
    known = {t.name: t for t in graph.initializer}
    keep, replaced, folded_inputs = [], 0, set()
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr["value"].t)
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in known:
            shape = numpy_helper.to_array(known[node.input[0]]).astype(np.int64)
            fill = np.zeros(1, np.float32)
            for a in node.attribute:
                if a.name == "value":
                    fill = numpy_helper.to_array(a.t)
            tensor = numpy_helper.from_array(
                np.full(tuple(shape), fill.reshape(-1)[0], dtype=fill.dtype)
            )
            folded_inputs.add(node.input[0])
        elif (
            node.op_type in FOLDABLE_OPS
            and node.domain in ("", "ai.onnx")
            and len(node.output) == 1
            and node.input
            and all(name in known for name in node.input if name)
        ):
            tensor = _evaluate(node, known, model.opset_import)
            if tensor is not None:
                folded_inputs.update(name for name in node.input if name)
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        known[tensor.name] = tensor
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(keep)
        _drop_unread_initializers(model, folded_inputs)
    return replaced


def _evaluate(node: onnx.NodeProto, known: dict, opsets) -> onnx.TensorProto | None:
    """``node``'s output on constant inputs, by onnx's reference evaluator; None if it fails."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: numpy_helper.to_array(known[name]) for name in node.input if name}
    try:
        (value,) = ReferenceEvaluator(node, opsets={o.domain: o.version for o in opsets}).run(
            None, feeds
        )
    except Exception:  # an op this onnx cannot evaluate: leave the node in the graph
        return None
    return numpy_helper.from_array(np.asarray(value))


def _drop_unread_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the ``candidates`` nothing reads any more, and the graph inputs of those names."""
    read = {name for g in all_graphs(model.graph) for node in g.node for name in node.input}
    read |= {o.name for o in model.graph.output}
    unread = candidates - read
    for field in (model.graph.initializer, model.graph.input):
        kept = [item for item in field if item.name not in unread]
        del field[:]
        field.extend(kept)
