"""ONNX model I/O: load, validate, list the quantizable weights, read and write them, save.

One of the few graph/IO modules that touch protobuf (tests/test_layout.py lists them). The rest
of onnxhq sees weights as numpy arrays keyed by initializer name, inputs as `InputSpec`s and
metadata as a dict (`get_metadata`/`set_metadata`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import graphfile
from ._io import Content, write_files
from .errors import ModelError
from .graphfile import BASELINE_IR as BASELINE_IR  # re-exported: model is the I/O front
from .graphfile import MAX_OPSET as MAX_OPSET
from .graphfile import (
    all_graphs,
    check_names,
    check_no_nan,
    check_tensors,
    check_versions,
    external_files,
    has_external_data,
    parse_model,
    parse_model_file,
    part_size,
    proto_size,
)
from .graphfile import default_opset as default_opset
from .graphfile import model_files as model_files
from .graphfile import runtime_limits as runtime_limits
from .lazy import _external_span, _is_external, _load_external
from .lazy import drop_weight as drop_weight  # re-exported: model is the I/O front
from .lazy import load_external as load_external
from .lazy import read_weight as read_weight
from .normalize import bypass_initializer_identities, drop_initializer_inputs, materialize_constants

log = logging.getLogger(__name__)


#: op type -> positions of its inputs that are weights (the ones onnxhq quantizes by default).
#: A table read only by Gather counts by default when it is an embedding table: at least 2 dims
#: and `GATHER_MIN_SIZE` elements (``extra_ops=("Gather",)`` takes every float Gather table).
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Gather": (0,),
}
GATHER_MIN_SIZE = 4096
#: Extra op types a user may opt into with ``extra_ops``.
OPTIONAL_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Gather": (0,),  # embedding tables
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
    "Einsum": (0, 1, 2),
}
#: onnx element types of float tensors: what counts as a float parameter, quantized or not.
_T = onnx.TensorProto
FLOAT_TYPES: frozenset[int] = frozenset({_T.FLOAT, _T.FLOAT16, _T.DOUBLE, _T.BFLOAT16})
#: The float types onnxhq quantizes, with the numpy dtype of their values (numpy has no bfloat16).
QUANTIZABLE_TYPES: dict[int, type[np.floating]] = {
    _T.FLOAT: np.float32,
    _T.FLOAT16: np.float16,
    _T.DOUBLE: np.float64,
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


def load_model(
    source: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    convert_opset: bool = True,
    lazy: bool = False,
) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data beside it included), bytes, or a ModelProto.

    External data (of initializers, subgraph initializers and Constant nodes alike) is read from
    the model's own folder; a location outside it is refused. Malformed tensors (negative or
    impossible dims, data of the wrong length) and duplicate value names are refused with
    `ModelError`. Constant and ConstantOfShape weights are turned into initializers. An opset or
    IR version the installed onnxruntime cannot run (`runtime_limits`) is converted down, or
    refused with `ModelError` saying why.

    With ``lazy`` (a path), the main graph's initializers stay in their external data files,
    checked (inside the folder, within the file) but not read: `read_weight` reads one at a time
    and `load_external` the ones still wanted. Other external tensors are read as usual.
    """
    where = "<bytes>"
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        where = "the model"
    elif isinstance(source, (bytes, bytearray)):
        model = parse_model(bytes(source), where)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist; pass the path of an .onnx file")
        model = parse_model_file(path)
        if has_external_data(model):
            check_tensors(model, where, external=True)
            kept: set[str] = set()  # by name: protobuf hands out a new wrapper each time
            if lazy:
                for t in model.graph.initializer:
                    if _is_external(t):
                        _external_span(t, path.parent)
                        kept.add(t.name)
            tensors = [t for t in graphfile.all_tensors(model) if t.name not in kept]
            _load_external(tensors, path)
    if has_external_data(model) and not lazy:
        raise ModelError(
            "the model keeps tensors in external data files; load it from its path, not from bytes"
        )
    if not model.graph.node:
        raise ModelError(f"{where} has no nodes; is this an ONNX model file?")
    check_tensors(model, where, external=False)
    check_names(model, where)
    check_no_nan(model, where)
    model = check_versions(model, where, convert=convert_opset)
    materialize_constants(model)
    drop_initializer_inputs(model)
    bypass_initializer_identities(model)
    return model


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def quantizable_weights(
    model: onnx.ModelProto, *, extra_ops: tuple[str, ...] = (), min_size: int = 2
) -> list[WeightInfo]:
    """Float initializers read as weights by Conv, ConvTranspose, Gemm, MatMul (and ``extra_ops``).

    Tensors with fewer than ``min_size`` elements are skipped, and so are tables read only by
    Gather with fewer than 2 dims or `GATHER_MIN_SIZE` elements unless ``extra_ops`` names
    Gather. Order: first use in the graph.
    """
    slots = dict(WEIGHT_SLOTS)
    small_tables = "Gather" in extra_ops
    for op in extra_ops:
        if op not in OPTIONAL_WEIGHT_SLOTS and op not in WEIGHT_SLOTS:
            raise ModelError(
                f"onnxhq does not know which input of {op} is a weight; "
                f"supported extra ops: {', '.join(sorted(OPTIONAL_WEIGHT_SLOTS))}"
            )
        slots[op] = OPTIONAL_WEIGHT_SLOTS[op] if op in OPTIONAL_WEIGHT_SLOTS else WEIGHT_SLOTS[op]
    inits = initializer_map(model)
    graph_inputs = {i.name for i in model.graph.input}
    consumers: dict[str, list[tuple[str, str, int]]] = {}
    for index, node in enumerate(model.graph.node):
        for pos, name in enumerate(node.input):
            if name in inits and name not in graph_inputs:
                consumers.setdefault(name, []).append(
                    (node.name or f"{node.op_type}_{index}", node.op_type, pos)
                )
    found = []
    for name, uses in consumers.items():
        tensor = inits[name]
        if tensor.data_type not in QUANTIZABLE_TYPES:
            continue
        read_as = {op for _, op, pos in uses if op in slots and pos in slots[op]}
        if not read_as:
            continue
        shape = tuple(int(d) for d in tensor.dims)
        size = int(np.prod(shape, dtype=np.int64))
        if size < min_size:
            continue
        small_table = len(shape) < 2 or size < GATHER_MIN_SIZE
        if read_as == {"Gather"} and small_table and not small_tables:
            continue
        found.append(
            WeightInfo(name, shape, np.dtype(QUANTIZABLE_TYPES[tensor.data_type]), tuple(uses))
        )
    return found


def read_initializers(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """Initializer values as numpy arrays (copies), keyed by name."""
    inits = initializer_map(model)
    missing = [n for n in names if n not in inits]
    if missing:
        raise ModelError(f"the model has no initializer named {missing[0]!r}")
    return {n: numpy_helper.to_array(inits[n]).copy() for n in names}


def replace_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``values`` (same dtype and shape)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            old = numpy_helper.to_array(tensor)
            new = np.asarray(values[tensor.name])
            if new.shape != old.shape:
                raise ModelError(
                    f"new value of {tensor.name} has shape {new.shape}, the model's is {old.shape}"
                )
            tensor.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), tensor.name))
    return out


#: Serialized size from which `save_model` keeps the tensors in an external data file
#: (protobuf cannot write or read a message of 2 GiB).
EXTERNAL_ABOVE = 2**31 - 2**24
#: Tensors of at least this many bytes go to the external data file; alignment of their offsets.
_EXTERNAL_MIN, _ALIGN = 1024, 4096


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, *, external_above: int | None = None
) -> int:
    """Serialize ``model`` to ``path`` atomically; returns the bytes written.

    A model of ``external_above`` bytes or more is written as ``path`` plus ``<name>.data``
    beside it (`serialize_model`), both as one (`_io.write_files`).
    """
    path = Path(path)
    files = serialize_model(model, path.name, external_above=external_above)
    return sum(write_files(path.parent, [(name, content) for name, content, _ in files]))


def serialize_model(
    model: onnx.ModelProto, name: str, *, external_above: int | None = None
) -> list[tuple[str, Content, int]]:
    """The files of ``model`` saved as ``name``: ``(file name, content, bytes)``, the graph first.

    Under ``external_above`` bytes (default `EXTERNAL_ABOVE`) that is one file of serialized
    bytes. Otherwise the tensors of 1 KiB or more go to ``<name>.data`` (onnx's external data,
    offsets aligned to 4 KiB), whose content is a function that writes them one at a time,
    never joined into one buffer; it reads ``model``, which must not change before it runs.
    """
    limit = EXTERNAL_ABOVE if external_above is None else external_above
    moved = [t for t in model.graph.initializer if part_size(t) >= _EXTERNAL_MIN]
    if proto_size(model) < limit or not moved:
        data = model.SerializeToString()  # past 2 GiB without tensors to move: protobuf says so
        return [(name, data, len(data))]
    data_name = f"{name}.data"
    offsets, end = [], 0
    for t in moved:
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        end = start + len(t.raw_data)
    header = _external_header(model, moved, offsets, data_name)

    def write_data(f) -> None:
        for t, start in zip(moved, offsets):
            f.seek(start)
            f.write(t.raw_data)
        f.truncate(end)

    return [(name, header, len(header)), (data_name, write_data, end)]


def _external_header(
    model: onnx.ModelProto, moved: list[onnx.TensorProto], offsets: list[int], location: str
) -> bytes:
    """``model`` serialized with its initializers ``moved`` pointing into ``location``.

    Built field by field beside ``model`` (which is not touched), the moved tensors as headers
    without their bytes: no copy of the weights is made.
    """
    header = onnx.ModelProto()
    _copy_fields(header, model, skip="graph")
    _copy_fields(header.graph, model.graph, skip="initializer")
    at = {id(t): start for t, start in zip(moved, offsets)}
    for t in model.graph.initializer:
        if id(t) not in at:
            header.graph.initializer.add().CopyFrom(t)
            continue
        out = header.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        out.data_location = onnx.TensorProto.EXTERNAL
        length = len(t.raw_data)
        for key, value in (("location", location), ("offset", at[id(t)]), ("length", length)):
            out.external_data.add(key=key, value=str(value))
    data = header.SerializeToString()
    if len(data) >= 2**31:
        raise ModelError(
            f"the model's graph is {len(data) / 2**30:.1f} GiB without its tensors; protobuf "
            "writes at most 2 GiB"
        )
    return data


def _copy_fields(dst, src, *, skip: str) -> None:
    """Copy every field that ``src`` sets into ``dst``, except the field ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf 5.x; older ones: label
        if field.label == field.LABEL_REPEATED if repeated is None else repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model file at ``path`` plus those of the external data files it names."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))


def value_info_map(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}


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


@dataclass(frozen=True)
class InputSpec:
    """One input a caller feeds: its name, numpy dtype and shape (None where symbolic/unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The `runtime_inputs` of ``model`` as plain specs, in graph order."""
    return [InputSpec(v.name, elem_dtype(v), static_shape(v)) for v in runtime_inputs(model)]


def count_float_params(model: onnx.ModelProto, exclude: Set[str] = frozenset()) -> int:
    """Elements of the float initializers (`FLOAT_TYPES`) whose names are not in ``exclude``.

    With ``exclude`` the quantized tensors (and codebooks), this is the report's count of
    parameters kept as they were. Initializers of subgraphs (If/Loop bodies) count too.
    """
    return sum(
        int(np.prod(t.dims, dtype=np.int64))
        for graph in all_graphs(model.graph)
        for t in graph.initializer
        if t.data_type in FLOAT_TYPES and t.name not in exclude
    )


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``model.metadata_props`` as a dict (a later entry of a repeated key wins)."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set ``values`` in ``metadata_props``, in place: replace those keys, append new ones."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
