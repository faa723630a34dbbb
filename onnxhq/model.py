"""ONNX model I/O: load, validate, list the quantizable weights, save.

This module and `rewrite`/`decode` are the only places that touch protobuf. The rest of onnxhq
sees weights as plain numpy arrays keyed by initializer name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ._io import atomic_write_bytes
from .errors import ModelError

log = logging.getLogger(__name__)

#: Highest default-domain opset the bundled onnxruntime-training build runs.
MAX_OPSET = 21

#: op type -> positions of its inputs that are weights (the ones onnxhq quantizes by default).
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
}
#: Extra op types a user may opt into with ``extra_ops``.
OPTIONAL_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Gather": (0,),  # embedding tables
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
    "Einsum": (0, 1, 2),
}
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


@dataclass(frozen=True)
class WeightInfo:
    """One quantizable initializer.

    ``consumers`` lists ``(node name, op type, input position)`` for every node reading it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    consumers: tuple[tuple[str, str, int], ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def load_model(source: str | os.PathLike | bytes | onnx.ModelProto, *, convert_opset: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data beside it included), bytes, or a ModelProto.

    Constant and ConstantOfShape weights are turned into initializers; an opset above
    ``MAX_OPSET`` is converted down, or refused with `ModelError` saying why.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist; pass the path of an .onnx file")
        model = _parse(path.read_bytes(), str(path))
        if _has_external_data(model):
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            except Exception as exc:  # onnx raises OSError, ValueError or its checker's ValidationError
                raise ModelError(f"{path}: cannot read its external data files ({exc}); keep them beside the model") from None
    if _has_external_data(model):
        raise ModelError("the model keeps tensors in external data files; load it from its path, not from bytes")
    if not model.graph.node:
        raise ModelError("the model has no nodes; is this an ONNX model file?")
    model = _check_opset(model, convert=convert_opset)
    materialize_constants(model)
    drop_initializer_inputs(model)
    bypass_initializer_identities(model)
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like or ValueError
        raise ModelError(f"{where} is not an ONNX model (protobuf parse failed: {type(exc).__name__})") from None
    if not model.HasField("graph"):
        raise ModelError(f"{where} is not an ONNX model (it has no graph)")
    return model


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("the model imports no default-domain opset; it is not a valid ONNX model")


def _check_opset(model: onnx.ModelProto, *, convert: bool) -> onnx.ModelProto:
    version = default_opset(model)
    if version <= MAX_OPSET:
        return model
    if not convert:
        raise ModelError(f"the model uses opset {version}; onnxhq runs opsets up to {MAX_OPSET}. "
                         f"Re-export it with opset {MAX_OPSET} or allow conversion")
    log.info("converting the model from opset %d to %d", version, MAX_OPSET)
    try:
        converted = onnx.version_converter.convert_version(model, MAX_OPSET)
    except Exception as exc:
        raise ModelError(f"the model uses opset {version} and could not be converted to {MAX_OPSET}, the highest "
                         f"onnxhq's onnxruntime runs ({type(exc).__name__}: {str(exc)[:200]}); re-export it "
                         f"with opset {MAX_OPSET}") from None
    return converted


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
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in inits
             and n.output[0] not in outputs}
    if not alias:
        return 0
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
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
            tensor = numpy_helper.from_array(np.full(tuple(shape), fill.reshape(-1)[0], dtype=fill.dtype))
            folded_inputs.add(node.input[0])
        elif (node.op_type in FOLDABLE_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1
              and node.input and all(name in known for name in node.input if name)):
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
    """The output of ``node`` on constant inputs, by onnx's reference evaluator; None if it fails."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: numpy_helper.to_array(known[name]) for name in node.input if name}
    try:
        (value,) = ReferenceEvaluator(node, opsets={o.domain: o.version for o in opsets}).run(None, feeds)
    except Exception:  # an op this onnx cannot evaluate: leave the node in the graph
        return None
    return numpy_helper.from_array(np.asarray(value))


def _drop_unread_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the ``candidates`` nothing reads any more, with the graph inputs old exporters list them as."""
    read = {name for node in _all_nodes(model.graph) for name in node.input} | {o.name for o in model.graph.output}
    unread = candidates - read
    for field in (model.graph.initializer, model.graph.input):
        kept = [item for item in field if item.name not in unread]
        del field[:]
        field.extend(kept)


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of ``graph`` and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_nodes(sub)


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def quantizable_weights(model: onnx.ModelProto, *, extra_ops: tuple[str, ...] = (), min_size: int = 2) -> list[WeightInfo]:
    """Float initializers feeding the weight input of Conv, ConvTranspose, Gemm, MatMul (and ``extra_ops``).

    Tensors with fewer than ``min_size`` elements are skipped. Order: first use in the graph.
    """
    slots = dict(WEIGHT_SLOTS)
    for op in extra_ops:
        if op not in OPTIONAL_WEIGHT_SLOTS and op not in WEIGHT_SLOTS:
            raise ModelError(f"onnxhq does not know which input of {op} is a weight; "
                             f"supported extra ops: {', '.join(sorted(OPTIONAL_WEIGHT_SLOTS))}")
        slots[op] = OPTIONAL_WEIGHT_SLOTS.get(op, WEIGHT_SLOTS.get(op))
    inits = initializer_map(model)
    graph_inputs = {i.name for i in model.graph.input}
    consumers: dict[str, list[tuple[str, str, int]]] = {}
    for index, node in enumerate(model.graph.node):
        for pos, name in enumerate(node.input):
            if name in inits and name not in graph_inputs:
                consumers.setdefault(name, []).append((node.name or f"{node.op_type}_{index}", node.op_type, pos))
    found = []
    for name, uses in consumers.items():
        tensor = inits[name]
        if tensor.data_type not in FLOAT_TYPES:
            continue
        if not any(op in slots and pos in slots[op] for _, op, pos in uses):
            continue
        shape = tuple(int(d) for d in tensor.dims)
        if int(np.prod(shape, dtype=np.int64)) < min_size:
            continue
        found.append(WeightInfo(name, shape, np.dtype(FLOAT_TYPES[tensor.data_type]), tuple(uses)))
    return found


def read_initializers(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """Initializer values as numpy arrays (copies), keyed by name."""
    inits = initializer_map(model)
    missing = [n for n in names if n not in inits]
    if missing:
        raise ModelError(f"the model has no initializer named {missing[0]!r}")
    return {n: numpy_helper.to_array(inits[n]).copy() for n in names}


def replace_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``values`` (same dtype and shape required)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            old = numpy_helper.to_array(tensor)
            new = np.asarray(values[tensor.name])
            if new.shape != old.shape:
                raise ModelError(f"new value of {tensor.name} has shape {new.shape}, the model's is {old.shape}")
            tensor.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), tensor.name))
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Serialize ``model`` to ``path`` atomically; returns the bytes written."""
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise ModelError("the model is over 2 GB; onnxhq writes single-file models only")
    return atomic_write_bytes(path, data)


def value_info_map(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)}


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed (those without an initializer of the same name)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def static_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    """Dimensions of a tensor value; None where symbolic or unknown."""
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def elem_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
