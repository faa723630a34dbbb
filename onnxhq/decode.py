"""Join a compressed graph and its sidecar back into a runnable model (the way back from `encode`)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import numpy_helper

from . import naming
from .errors import ModelError, SidecarError
from .encode import FORMAT_VERSION
from .model import load_model, save_model
from .rewrite import PACK_MAX_K, PACKED_OP, attach_functions, dequantize_model, index_dtype, pack4
from .sidecar import IndexStream, decode_sidecar, read_sidecar


def sidecar_path(graph_path: str | os.PathLike, graph: onnx.ModelProto) -> Path:
    """Where the sidecar of ``graph`` (read from ``graph_path``) lives: beside it, under its recorded name."""
    meta = {p.key: p.value for p in graph.metadata_props}
    name = meta.get(naming.METADATA_SIDECAR)
    if name is None:
        raise ModelError(f"{graph_path} is not a graph written by 'onnxhq compress' (no {naming.METADATA_SIDECAR} "
                         "metadata); pass the .onnx file from the compress output folder")
    if Path(name).name != name:
        raise ModelError(f"{graph_path}: sidecar name {name!r} must be a plain file name")
    return Path(graph_path).parent / name


def join_artifacts(graph: onnx.ModelProto, streams: list[IndexStream]) -> onnx.ModelProto:
    """The runnable model: each index graph input of ``graph`` replaced by its decoded initializer
    (packed two per byte where a ``DequantizePacked4`` node reads it)."""
    version = {p.key: p.value for p in graph.metadata_props}.get(naming.METADATA_VERSION, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ModelError(f"the graph was written in onnxhq graph format {version}; this onnxhq reads format "
                         f"{FORMAT_VERSION}: upgrade onnxhq")
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    by_name = {s.name: s for s in streams}
    declared = {i.name: i for i in model.graph.input}
    wanted = [name for name in declared if name.endswith(naming.index_tensor(""))]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise SidecarError(f"the sidecar has no stream for {missing[0]!r}; it belongs to another model")
    extra = [n for n in by_name if n not in declared]
    if extra:
        raise SidecarError(f"the sidecar stream {extra[0]!r} matches no index input of the graph")
    packed_shapes = _packed_shapes(model)
    for name in wanted:
        stream = by_name[name]
        want = tuple(d.dim_value for d in declared[name].type.tensor_type.shape.dim)
        if name in packed_shapes:
            array = _packed(stream, packed_shapes[name], want)
        elif tuple(stream.shape) != want:
            raise SidecarError(f"sidecar stream {name!r} has shape {stream.shape}, the graph expects {want}")
        else:
            array = stream.indices.astype(index_dtype(stream.alphabet_size))
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    inputs = [i for i in model.graph.input if i.name not in by_name]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for node in model.graph.node:
        if node.domain == naming.DOMAIN and not node.name:
            node.name = naming.dequantize_node(node.output[0])
    props = [p for p in model.metadata_props if p.key != naming.METADATA_SIDECAR]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    attach_functions(model)
    return model


def _packed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Index input -> logical shape, for the inputs that packed dequantize nodes read."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {}
    for node in model.graph.node:
        if node.domain == naming.DOMAIN and node.op_type == PACKED_OP:
            if len(node.input) != 3 or node.input[2] not in inits:
                raise ModelError(f"node {node.name!r} ({PACKED_OP}) needs a shape initializer as its third input")
            shapes[node.input[1]] = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[2]]).reshape(-1))
    return shapes


def _packed(stream: IndexStream, shape: tuple[int, ...], want: tuple[int, ...]):
    if tuple(stream.shape) != shape:
        raise SidecarError(f"sidecar stream {stream.name!r} has shape {stream.shape}, the graph expects {shape}")
    if stream.alphabet_size > PACK_MAX_K:
        raise SidecarError(f"sidecar stream {stream.name!r} has {stream.alphabet_size} symbols; the graph packs "
                           f"it 4 bits per index, which holds at most {PACK_MAX_K}")
    array = pack4(stream.indices)
    if array.shape != want:
        raise SidecarError(f"sidecar stream {stream.name!r} packs into {array.shape[0]} bytes, the graph "
                           f"declares {want}")
    return array


def load(path: str | os.PathLike, *, dequantize: bool = False) -> onnx.ModelProto:
    """Read a compressed graph and the sidecar beside it; return the runnable ``onnx.ModelProto``.

    With ``dequantize=True`` the weights are plain float initializers (no custom nodes).
    """
    graph = load_model(path)
    streams, _ = read_sidecar(sidecar_path(path, graph))
    model = join_artifacts(graph, streams)
    return dequantize_model(model) if dequantize else model


def load_runnable(path: str | os.PathLike) -> onnx.ModelProto:
    """A runnable model from either a plain .onnx or a compressed graph (decoded with its sidecar)."""
    model = load_model(path)
    if any(p.key == naming.METADATA_SIDECAR for p in model.metadata_props):
        streams, _ = read_sidecar(sidecar_path(path, model))
        return join_artifacts(model, streams)
    return model


def load_from_bytes(graph_bytes: bytes, sidecar_bytes: bytes) -> onnx.ModelProto:
    """As `load`, from the two artifacts in memory."""
    streams, _ = decode_sidecar(sidecar_bytes)
    return join_artifacts(load_model(graph_bytes), streams)


def decode_file(path: str | os.PathLike, out: str | os.PathLike, *, dequantize: bool = False) -> int:
    """Write the runnable model for compressed graph ``path`` to ``out``; returns bytes written."""
    model = load(path, dequantize=dequantize)
    onnx.checker.check_model(model, full_check=False)
    return save_model(model, out)
