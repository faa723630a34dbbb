"""Join a compressed graph and its sidecar back into a runnable model (the way back from
`encode`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from . import model as model_io
from . import naming
from ._io import reading
from .encode import GRAPH_FORMAT_VERSION, READABLE_GRAPH_FORMATS, restore_derived_names
from .errors import ConfigError, ModelError, SidecarError
from .graphfile import proto_size
from .model import get_metadata, load_model, save_model
from .native import check_target, lower
from .rewrite import PACK_MAX_K, PACKED_OP, attach_functions, dequantize_model, index_dtype, pack4
from .sidecar import IndexStream, decode_sidecar, read_sidecar

T = TypeVar("T")


def sidecar_path(graph_path: str | os.PathLike, graph: onnx.ModelProto) -> Path:
    """Where the sidecar of ``graph`` (read from ``graph_path``) lives: beside it, under its
    recorded name."""
    name = get_metadata(graph).get(naming.METADATA_SIDECAR)
    if name is None:
        raise ModelError(
            f"{graph_path} is not a graph written by 'onnxhq compress' "
            f"(no {naming.METADATA_SIDECAR} "
            "metadata); pass the .onnx file from the compress output folder"
        )
    if Path(name).name != name:
        raise ModelError(f"{graph_path}: sidecar name {name!r} must be a plain file name")
    return Path(graph_path).parent / name


def join_artifacts(
    graph: onnx.ModelProto, streams: list[IndexStream], *, in_place: bool = False
) -> onnx.ModelProto:
    """The runnable model: each dequantize node's index tensor made an initializer from its decoded
    stream (packed two per byte where a ``DequantizePacked4`` node reads it), the names the graph
    file leaves out restored, onnxhq's function definitions attached. ``graph`` is copied first
    unless ``in_place`` (no copy of its tensors: for a graph the caller just loaded)."""
    model, wanted, index_array = _joinable(graph, [s.name for s in streams], in_place=in_place)
    by_name = {s.name: s for s in streams}
    for name in wanted:
        model.graph.initializer.append(numpy_helper.from_array(index_array(by_name[name]), name))
    _finish(model, set(by_name))
    return model


def _joinable(
    graph: onnx.ModelProto, names: list[str], *, in_place: bool
) -> tuple[onnx.ModelProto, list[str], Callable[[IndexStream], np.ndarray]]:
    """``graph`` (copied unless ``in_place``) with the names its file leaves out restored, the
    index tensors its dequantize nodes read (in node order; the sidecar's streams ``names``
    must be exactly those), and the function that makes a stream an index initializer's value.
    """
    graph_format(graph)
    model = graph
    if not in_place:
        model = onnx.ModelProto()
        model.CopyFrom(graph)
    nodes = [n for n in model.graph.node if n.domain == naming.DOMAIN]
    for node in nodes:
        if len(node.input) < 2 or len(node.output) != 1:
            raise ModelError(
                f"a {node.op_type} node of domain {naming.DOMAIN} needs a codebook and an index "
                f"input and one output, got {len(node.input)} and {len(node.output)}; "
                "the graph is damaged"
            )
        restore_derived_names(node)
    wanted = [node.input[1] for node in nodes]
    missing = [n for n in wanted if n not in set(names)]
    if missing:
        raise SidecarError(
            f"the sidecar has no stream for {missing[0]!r}; it belongs to another model"
        )
    extra = [n for n in names if n not in set(wanted)]
    if extra:
        raise SidecarError(
            f"the sidecar stream {extra[0]!r} matches no dequantize node of the graph"
        )
    declared = {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in model.graph.input
        if i.name in set(names)
    }  # graph format 1 declares the index tensors as graph inputs
    packed_shapes = _packed_shapes(model)

    def index_array(stream: IndexStream) -> np.ndarray:
        name = stream.name
        if name in packed_shapes:
            array = _packed(stream, packed_shapes[name])
        else:
            array = stream.indices.astype(index_dtype(stream.alphabet_size))
        if name in declared and array.shape != declared[name]:
            raise SidecarError(
                f"sidecar stream {name!r} gives shape {array.shape}, "
                f"the graph expects {declared[name]}"
            )
        return array

    return model, wanted, index_array


def _finish(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the index tensors' input declarations and the sidecar metadata, attach onnxhq's
    functions: in place."""
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    props = [
        p
        for p in model.metadata_props
        if p.key not in (naming.METADATA_SIDECAR, naming.METADATA_SIDECAR_CRC)
    ]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    attach_functions(model)


def graph_format(graph: onnx.ModelProto) -> int:
    """The graph format of compressed ``graph`` (its ``onnxhq.version`` metadata; graphs without
    it are taken as the current one); ModelError unless this onnxhq reads it."""
    recorded = get_metadata(graph).get(naming.METADATA_VERSION)
    if recorded is None:
        return GRAPH_FORMAT_VERSION
    version = {str(v): v for v in READABLE_GRAPH_FORMATS}.get(recorded)
    if version is None:
        readable = ", ".join(str(v) for v in READABLE_GRAPH_FORMATS)
        raise ModelError(
            f"the graph was written in onnxhq graph format {recorded}; this onnxhq reads formats "
            f"{readable}: upgrade onnxhq"
        )
    return version


def sidecar_crc32(graph: onnx.ModelProto) -> int | None:
    """The CRC-32 of its sidecar that ``graph`` records (graph format 2), or None."""
    recorded = get_metadata(graph).get(naming.METADATA_SIDECAR_CRC)
    try:
        return None if recorded is None else int(recorded, 16)
    except ValueError:
        raise ModelError(
            f"metadata {naming.METADATA_SIDECAR_CRC}={recorded!r} is not a hexadecimal CRC-32"
        ) from None


def _packed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Index input -> logical shape, for the inputs that packed dequantize nodes read."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {}
    for node in model.graph.node:
        if node.domain == naming.DOMAIN and node.op_type == PACKED_OP:
            if len(node.input) != 3 or node.input[2] not in inits:
                raise ModelError(
                    f"node {node.name!r} ({PACKED_OP}) needs a shape initializer as its third input"
                )
            shapes[node.input[1]] = tuple(
                int(d) for d in numpy_helper.to_array(inits[node.input[2]]).reshape(-1)
            )
    return shapes


def _packed(stream: IndexStream, shape: tuple[int, ...]):
    if tuple(stream.shape) != shape:
        raise SidecarError(
            f"sidecar stream {stream.name!r} has shape {stream.shape}, the graph expects {shape}"
        )
    if stream.alphabet_size > PACK_MAX_K:
        raise SidecarError(
            f"sidecar stream {stream.name!r} has {stream.alphabet_size} symbols; the graph packs "
            f"it 4 bits per index, which holds at most {PACK_MAX_K}"
        )
    return pack4(stream.indices)


def load(
    path: str | os.PathLike, *, dequantize: bool = False, target: str = "gather"
) -> onnx.ModelProto:
    """Read a compressed graph and the sidecar beside it; return the runnable ``onnx.ModelProto``.

    With ``dequantize=True`` the weights are plain float initializers (no custom nodes); else
    ``target`` picks their form (`onnxhq.native.lower`: ``gather``, ``int8``, ``int4``).
    """
    check_target(target)
    graph, streams = read_pair(path, _read_streams)
    model = join_artifacts(graph, streams, in_place=True)
    if dequantize:
        if target != "gather":
            raise ConfigError(f"--dequantize writes float weights; it takes no --target {target}")
        return dequantize_model(model)
    return lower(model, target)


def load_runnable(path: str | os.PathLike) -> onnx.ModelProto:
    """A runnable model from a plain .onnx or a compressed graph (decoded with its sidecar)."""
    with reading(Path(path).parent):
        model = load_model(path)
        if naming.METADATA_SIDECAR not in get_metadata(model):
            return model
        streams = _read_streams(sidecar_path(path, model), sidecar_crc32(model))
    return join_artifacts(model, streams, in_place=True)


def read_pair(
    path: str | os.PathLike, read: Callable[[Path, int | None], T]
) -> tuple[onnx.ModelProto, T]:
    """The compressed graph at ``path`` and ``read(sidecar path, CRC-32 the graph records)``,
    both under the folder's shared lock: the pair as one write left it (`_io.write_files`)."""
    with reading(Path(path).parent):
        graph = load_model(path)
        return graph, read(sidecar_path(path, graph), sidecar_crc32(graph))


def _read_streams(side: Path, crc32: int | None) -> list[IndexStream]:
    """The streams of sidecar ``side``, checked against the graph's record ``crc32``."""
    return read_sidecar(side, crc32=crc32)[0]


def load_from_bytes(graph_bytes: bytes, sidecar_bytes: bytes) -> onnx.ModelProto:
    """As `load`, from the two artifacts in memory."""
    graph = load_model(graph_bytes)
    streams, _ = decode_sidecar(sidecar_bytes, crc32=sidecar_crc32(graph))
    return join_artifacts(graph, streams, in_place=True)


def decode_file(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dequantize: bool = False,
    target: str = "gather",
) -> int:
    """Write the runnable model for compressed graph ``path`` to ``out``; returns bytes written
    (a model past 2 GB is written with its tensors in ``<out>.data``, see `model.save_model`).
    ``dequantize`` and ``target`` as in `load`.

    The gather target and ``dequantize`` are written stream by stream
    (`onnxhq.decode_streamed`): memory holds one stream's tensor at a time, not the model's."""
    if target == "gather":
        from .decode_streamed import decode_streamed

        return decode_streamed(path, out, dequantize=dequantize)
    check_target(target)
    model = load(path, dequantize=dequantize, target=target)
    if proto_size(model) < model_io.EXTERNAL_ABOVE:  # the checker serializes: 2 GB at most
        onnx.checker.check_model(model, full_check=False)
    return save_model(model, out)
