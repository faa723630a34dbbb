"""Reading model files safely: parse, walk every tensor, external data, checks, versions.

`onnxhq.model.load_model` reads files through these: a protobuf over 2 GiB, a tensor whose data
does not match its dims, negative dims, a value defined twice, a NaN weight are refused before
anything is allocated from them; external data is looked up in the model's own folder only (onnx
refuses locations that escape it); an opset or IR version the installed onnxruntime cannot run
is converted down (`runtime_limits`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .naming import METADATA_SIDECAR

log = logging.getLogger(__name__)
_T = onnx.TensorProto

#: Highest default-domain opset and IR version every onnxruntime onnxhq supports runs (the
#: installed one may run more: `runtime_limits`).
MAX_OPSET = 21
BASELINE_IR = 10
#: The float types whose values are checked for NaN.
_NUMPY_FLOATS = (_T.FLOAT, _T.FLOAT16, _T.DOUBLE)


def read_model_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size >= 2**31:
        raise ModelError(
            f"{path} is {size / 2**30:.1f} GiB in one file; protobuf reads at most 2 GiB: save "
            "it with external data (onnx.save_model(..., save_as_external_data=True))"
        )
    return path.read_bytes()


def parse_model(data: bytes, where: str) -> onnx.ModelProto:
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like or ValueError
        raise ModelError(
            f"{where} is not an ONNX model (protobuf parse failed: {type(exc).__name__})"
        ) from None
    if not model.HasField("graph"):
        raise ModelError(f"{where} is not an ONNX model (it has no graph)")
    return model


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from all_graphs(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor ``model`` stores: initializers and tensor attributes (Constant values), of
    the main graph, its subgraphs and its functions."""
    graphs = [*all_graphs(model.graph), *model.functions]
    for graph in graphs:
        if isinstance(graph, onnx.GraphProto):
            yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` (subgraphs and Constant nodes included) is external."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model))


#: What each model file parsed in this process names beside it (external data locations, the
#: sidecar), by the file's identity: listing a model's files (`external_files`, `model_files`)
#: parses no file `parse_model_file` already read (the input, once loaded, is not read again).
_NAMED: dict[tuple, tuple[tuple[str, ...], str | None]] = {}


def parse_model_file(path: Path) -> onnx.ModelProto:
    """`parse_model` of the file at ``path`` (its external data not loaded), remembering the
    files it names."""
    key = _identity(path)
    model = parse_model(read_model_file(path), str(path))
    _NAMED[key] = _names(model)
    return model


def _named(path: Path) -> tuple[tuple[str, ...], str | None]:
    """(external data locations, sidecar name) the model file at ``path`` names."""
    key = _identity(path)
    if key not in _NAMED:
        _NAMED[key] = _names(parse_model(read_model_file(path), str(path)))
    return _NAMED[key]


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _names(model: onnx.ModelProto) -> tuple[tuple[str, ...], str | None]:
    locations = (
        e.value
        for t in all_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    )
    sidecar = {p.key: p.value for p in model.metadata_props}.get(METADATA_SIDECAR)
    return tuple(dict.fromkeys(locations)), sidecar


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the model at ``path`` names that exist inside its folder."""
    path = Path(path)
    folder = path.parent.resolve()
    found: dict[Path, None] = {}
    for location in _named(path)[0]:
        file = (folder / location).resolve()
        if file.is_relative_to(folder) and file.is_file():
            found[file] = None
    return list(found)


def model_files(path: str | os.PathLike) -> list[Path]:
    """Every file reading the model at ``path`` opens: the file itself, its external data files
    and, for a compressed graph, its sidecar. Outputs must not overwrite any of them."""
    path = Path(path)
    try:
        sidecar = _named(path)[1]
    except (ModelError, OSError):
        return [path]
    files = [path, *external_files(path)]
    if sidecar and Path(sidecar).name == sidecar:
        files.append(path.parent / sidecar)
    return files


def check_tensors(model: onnx.ModelProto, where: str, *, external: bool) -> None:
    """ModelError for a tensor with negative dims or data of another length than its dims say
    (checked before anything is allocated from the dims)."""
    for t in all_tensors(model):
        if any(d < 0 for d in t.dims):
            raise ModelError(
                f"{where}: tensor {t.name!r} has negative dims {list(t.dims)}; the file is broken"
            )
        is_external = t.data_location == onnx.TensorProto.EXTERNAL
        if is_external != external or t.data_type in (0, onnx.TensorProto.STRING):
            continue
        bits = _ELEMENT_BITS.get(t.data_type)
        if bits is None:
            continue  # a type newer than this check: onnx and onnxruntime judge it
        count = math.prod(t.dims)  # exact Python ints: no int64 overflow
        want = -(-count * bits // 8)
        unit = "bytes"
        if is_external:
            length = {e.key: e.value for e in t.external_data}.get("length", "")
            if not length.isdigit():
                continue  # onnx checks the file's size when it reads it
            given = int(length)
        elif t.HasField("raw_data"):
            given = len(t.raw_data)
        else:
            given = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type)))
            unit = "values"
            want = count * 2 if t.data_type in _COMPLEX else count
            want = -(-count // 2) if t.data_type in _PACKED else want
        if given != want:
            raise ModelError(
                f"{where}: tensor {t.name!r} declares dims {list(t.dims)} ({count:,} elements) "
                f"but holds {given:,} {unit} ({want:,} expected); the file is broken or truncated"
            )


#: Bits per element of the onnx element types whose data length is checked.
_ELEMENT_BITS: dict[int, int] = {
    _T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32,
    _T.INT64: 64, _T.BOOL: 8, _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64,
    _T.COMPLEX64: 64, _T.COMPLEX128: 128, _T.BFLOAT16: 16, _T.UINT4: 4, _T.INT4: 4,
}  # fmt: skip
_COMPLEX = (_T.COMPLEX64, _T.COMPLEX128)


def element_bits(data_type: int) -> int:
    """Bits per element of onnx element type ``data_type``; ModelError for one without a fixed
    width."""
    if data_type not in _ELEMENT_BITS:
        raise ModelError(f"tensors of onnx element type {data_type} have no fixed element size")
    return _ELEMENT_BITS[data_type]


_PACKED = (_T.UINT4, _T.INT4)


def check_names(model: onnx.ModelProto, where: str) -> None:
    """ModelError if two nodes (or a node and an initializer or input) define the same value, or
    a graph output is listed twice: onnx requires single assignment."""
    for graph in all_graphs(model.graph):
        seen: set[str] = set()
        defined = [i.name for i in graph.input] + [t.name for t in graph.initializer]
        for name in list(dict.fromkeys(defined)) + [o for n in graph.node for o in n.output]:
            if name and name in seen:
                raise ModelError(
                    f"{where}: value {name!r} is defined twice (graph {graph.name!r}); "
                    "ONNX values are assigned once, re-export the model"
                )
            seen.add(name)
        outputs = [o.name for o in graph.output]
        twice = next((o for i, o in enumerate(outputs) if o in outputs[:i]), None)
        if twice is not None:
            raise ModelError(
                f"{where}: output {twice!r} is listed twice in graph {graph.name!r}; "
                "each graph output must be named once"
            )


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("the model imports no default-domain opset; it is not a valid ONNX model")


@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int]:
    """(highest default-domain opset, highest IR version) the installed onnxruntime loads.

    Found once per process by opening tiny one-Relu sessions; (`MAX_OPSET`, `BASELINE_IR`), what
    every onnxruntime onnxhq supports runs, when onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return MAX_OPSET, BASELINE_IR
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def loads(opset: int, ir: int) -> bool:
        x = onnx.helper.make_tensor_value_info("x", _T.FLOAT, [1])
        y = onnx.helper.make_tensor_value_info("y", _T.FLOAT, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "p", [x], [y])
        probe = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir
        )
        try:
            ort.InferenceSession(
                probe.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception:
            return False
        return True

    ir = next((v for v in range(onnx.IR_VERSION, BASELINE_IR, -1) if loads(14, v)), BASELINE_IR)
    top = onnx.defs.onnx_opset_version()
    opset = next((v for v in range(top, MAX_OPSET, -1) if loads(v, ir)), MAX_OPSET)
    return opset, ir


def check_versions(model: onnx.ModelProto, where: str, *, convert: bool) -> onnx.ModelProto:
    """``model``, its opset and IR version brought within `runtime_limits` when they pass them."""
    version, ir = default_opset(model), model.ir_version
    if version <= MAX_OPSET and ir <= BASELINE_IR:
        return model
    max_opset, max_ir = runtime_limits()
    if version <= max_opset and ir <= max_ir:
        return model
    if not convert:
        raise ModelError(
            f"{where} uses opset {version} (IR {ir}); the installed onnxruntime runs opsets up to "
            f"{max_opset} (IR {max_ir}). Re-export it with opset {max_opset} or allow conversion"
        )
    converted = model
    if version > max_opset:
        log.info("converting the model from opset %d to %d", version, max_opset)
        try:
            converted = _convert_lean(model, max_opset)
        except Exception as exc:
            raise ModelError(
                f"{where} uses opset {version} and could not be converted to {max_opset}, the "
                f"highest the installed onnxruntime runs ({type(exc).__name__}: "
                f"{one_line(exc)[:200]}); re-export it with opset {max_opset}"
            ) from None
    needed = onnx.helper.find_min_ir_version_for(list(converted.opset_import), True)
    if needed > max_ir:
        raise ModelError(
            f"{where} needs IR version {needed}; the installed onnxruntime reads up to {max_ir}: "
            "re-export it with an older opset or upgrade onnxruntime"
        )
    converted.ir_version = min(converted.ir_version, max_ir)
    return converted


def check_no_nan(model: onnx.ModelProto, where: str = "the model") -> None:
    """ModelError naming the first float tensor of ``model`` that holds a NaN.

    Raw data is viewed, not converted, and scanned in 16 MiB pieces: the extra memory is one
    copy of the largest tensor (protobuf hands its bytes out as a copy).
    """
    for t in all_tensors(model):
        if t.data_type not in _NUMPY_FLOATS or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
        values = (
            np.frombuffer(t.raw_data, dtype) if t.HasField("raw_data") else numpy_helper.to_array(t)
        ).reshape(-1)
        step = 2**24 // dtype.itemsize
        nans = sum(int(np.isnan(values[i : i + step]).sum()) for i in range(0, values.size, step))
        if nans:
            raise ModelError(
                f"{where}: tensor {t.name!r} holds {nans:,} NaN values; fix or re-export the model"
            )


#: Models from this size on are converted with their large tensors set aside: the converter
#: serializes the model, which protobuf cannot do past 2 GiB.
LEAN_ABOVE = 2**30
#: Tensors of at least this many bytes are set aside.
_LEAN_TENSOR = 2**20


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` by onnx's version converter (which raises bare
    RuntimeErrors and ValueErrors when it cannot); large tensors are set aside meanwhile."""
    return _convert_lean(model, opset)


def _convert_lean(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``convert_version(model, opset)``; a large model is converted without the bytes of its
    large initializers, which are put back by name afterwards (``model`` loses them)."""
    if proto_size(model) < LEAN_ABOVE:
        return onnx.version_converter.convert_version(model, opset)
    aside = {}
    for t in model.graph.initializer:
        if len(t.raw_data) >= _LEAN_TENSOR:
            aside[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception:  # ``model`` gets its bytes back: a caller may go on without converting
        for t in model.graph.initializer:
            if t.name in aside:
                t.raw_data = aside[t.name]
        raise
    for t in converted.graph.initializer:
        if t.name in aside:
            t.raw_data = aside.pop(t.name)
    if aside:
        raise ValueError(f"the converter dropped initializer {next(iter(aside))!r}")
    return converted


def proto_size(model: onnx.ModelProto) -> int:
    """About ``model.ByteSize()`` (within the size of its inputs, outputs and value infos),
    summed part by part: upb's ByteSize serializes the whole message, a copy of every weight,
    and fails past 2 GiB."""
    graph = model.graph
    parts = [*graph.initializer, *graph.node, *graph.sparse_initializer, *model.functions]
    return sum(part_size(p) for p in parts)


def part_size(part) -> int:
    """``part.ByteSize()``, or 2**31 for one past 2 GiB (a single huge tensor)."""
    try:
        return part.ByteSize()
    except Exception:  # protobuf's EncodeError
        return 2**31
