"""Split a rewritten model into the two artifacts users keep: the graph and the sidecar.

The compressed graph (``<stem>.onnx``) holds structure, codebooks, unquantized tensors and the
dequantize nodes; the index tensors' values live Huffman-coded in the sidecar (``<stem>.onnxhq``),
one symbol per weight, under the index tensor's name and with the weight's shape. The graph records
the sidecar's file name and CRC-32 in ``metadata_props`` (``onnxhq.sidecar``,
``onnxhq.sidecar_crc32``), so a sidecar of another model is refused. Everything decode can derive
is left out of the graph (graph format ``FORMAT_VERSION``, recorded as ``onnxhq.version``): the
definitions of onnxhq's dequantize functions, the dequantize nodes' names, their index input and
a per-weight codebook input (named after the node's output, see `naming`; left as ""), and
declarations of the index tensors. It stays a valid ONNX file that `onnx.checker` accepts, but it
is a storage artifact, not meant to run as it is. `decode.join_artifacts` reverses all this.
Format 1 (onnxhq 0.2.0) kept the node inputs and declared the index tensors as graph inputs;
decode still reads it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import onnx

from . import naming
from .rewrite import detach_functions, node_codes
from .sidecar import IndexStream, encode_sidecar

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")


@dataclass(frozen=True)
class Artifacts:
    """The serialized compressed model: graph bytes, sidecar bytes and their file names."""

    graph_name: str
    graph_bytes: bytes
    sidecar_name: str
    sidecar_bytes: bytes


def index_streams(model: onnx.ModelProto) -> list[IndexStream]:
    """One stream per dequantize node's index initializer, in graph order; packed indices are unpacked
    (the sidecar keeps one symbol per weight, of the weight's shape)."""
    inits = {t.name: t for t in model.graph.initializer}
    streams = []
    for node in model.graph.node:
        if node.domain != naming.DOMAIN:
            continue
        _, indices, k, _ = node_codes(node, inits)
        streams.append(IndexStream(name=node.input[1], shape=tuple(indices.shape), alphabet_size=k, indices=indices))
    return streams


def split_artifacts(model: onnx.ModelProto, stem: str, *, original_bytes: int | None = None) -> Artifacts:
    """Serialize ``model`` (output of `rewrite.rewrite`) as graph + sidecar named after ``stem``.

    ``original_bytes`` (the input model's size) is recorded so `report` can give the same ratio later.
    """
    graph_name, sidecar_name = naming.artifact_names(stem)
    streams = index_streams(model)
    moved = {s.name for s in streams}
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    kept = [t for t in graph.graph.initializer if t.name not in moved]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for node in graph.graph.node:
        if node.domain == naming.DOMAIN:
            strip_derived_names(node)
    detach_functions(graph)  # decode re-attaches onnxhq's own definitions, fixed by FORMAT_VERSION
    sidecar = encode_sidecar(streams, metadata={"graph": graph_name})
    set_metadata(graph, {naming.METADATA_SIDECAR: sidecar_name, naming.METADATA_VERSION: FORMAT_VERSION,
                         naming.METADATA_SIDECAR_CRC: f"{zlib.crc32(sidecar):08x}",
                         **({} if original_bytes is None else {naming.METADATA_ORIGINAL_BYTES: str(original_bytes)})})
    return Artifacts(graph_name, graph.SerializeToString(), sidecar_name, sidecar)


def strip_derived_names(node: onnx.NodeProto) -> None:
    """Blank, in place, what `restore_derived_names` can put back: ~35 bytes each (~130 a weight)."""
    weight = node.output[0]
    if node.name == naming.dequantize_node(weight):
        node.name = ""
    if node.input[1] == naming.index_tensor(weight):
        node.input[1] = ""
    if node.input[0] == naming.codebook_tensor(weight):
        node.input[0] = ""


def restore_derived_names(node: onnx.NodeProto) -> None:
    """Inverse of `strip_derived_names` (a no-op on nodes that were not stripped)."""
    weight = node.output[0]
    node.name = node.name or naming.dequantize_node(weight)
    node.input[0] = node.input[0] or naming.codebook_tensor(weight)
    node.input[1] = node.input[1] or naming.index_tensor(weight)


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
