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

from ._io import atomic_write_bytes
from .errors import ModelError
from .normalize import bypass_initializer_identities, drop_initializer_inputs, materialize_constants

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
    source: str | os.PathLike | bytes | onnx.ModelProto, *, convert_opset: bool = True
) -> onnx.ModelProto:
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
            # onnx raises OSError, ValueError or its checker's ValidationError
            except Exception as exc:
                raise ModelError(
                    f"{path}: cannot read its external data files ({exc}); "
                    "keep them beside the model"
                ) from None
    if _has_external_data(model):
        raise ModelError(
            "the model keeps tensors in external data files; load it from its path, not from bytes"
        )
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
        raise ModelError(
            f"{where} is not an ONNX model (protobuf parse failed: {type(exc).__name__})"
        ) from None
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
        raise ModelError(
            f"the model uses opset {version}; onnxhq runs opsets up to {MAX_OPSET}. "
            f"Re-export it with opset {MAX_OPSET} or allow conversion"
        )
    log.info("converting the model from opset %d to %d", version, MAX_OPSET)
    try:
        converted = onnx.version_converter.convert_version(model, MAX_OPSET)
    except Exception as exc:
        raise ModelError(
            f"the model uses opset {version} and could not be converted to {MAX_OPSET}, the "
            f"highest onnxhq's onnxruntime runs ({type(exc).__name__}: {str(exc)[:200]}); "
            f"re-export it with opset {MAX_OPSET}"
        ) from None
    return converted


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def quantizable_weights(
    model: onnx.ModelProto, *, extra_ops: tuple[str, ...] = (), min_size: int = 2
) -> list[WeightInfo]:
    """Float initializers read as weights by Conv, ConvTranspose, Gemm, MatMul (and ``extra_ops``).

    Tensors with fewer than ``min_size`` elements are skipped. Order: first use in the graph.
    """
    slots = dict(WEIGHT_SLOTS)
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
        if not any(op in slots and pos in slots[op] for _, op, pos in uses):
            continue
        shape = tuple(int(d) for d in tensor.dims)
        if int(np.prod(shape, dtype=np.int64)) < min_size:
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


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Serialize ``model`` to ``path`` atomically; returns the bytes written."""
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise ModelError("the model is over 2 GB; onnxhq writes single-file models only")
    return atomic_write_bytes(path, data)


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model file at ``path`` plus those of the external data files it names."""
    path = Path(path)
    header = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


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
    parameters kept as they were.
    """
    return sum(
        int(np.prod(t.dims, dtype=np.int64))
        for t in model.graph.initializer
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
