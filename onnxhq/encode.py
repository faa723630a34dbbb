"""Split a rewritten model into the two artifacts users keep: the graph and the sidecar.

The compressed graph (``<stem>.onnx``) holds structure, codebooks, unquantized tensors and the
dequantize nodes. Its index tensors are declared as graph inputs (so the file stays a valid ONNX
model), packed ones as the uint8 (ceil(n/2),) tensor the graph reads, and their values live
Huffman-coded in the sidecar (``<stem>.onnxhq``), one symbol per weight, whose file name the graph
records in ``metadata_props["onnxhq.sidecar"]``. The dequantize nodes' names and the definitions
of onnxhq's dequantize functions are left out (fixed by ``FORMAT_VERSION``, recorded as
``onnxhq.version``): the graph file is a storage artifact, not meant to run as it is.
`decode.join_artifacts` reverses all this.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from . import naming
from .rewrite import detach_functions, node_codes
from .sidecar import IndexStream, encode_sidecar

FORMAT_VERSION = "1"


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
    kept = list(graph.graph.initializer)
    by_name = {t.name: t for t in kept}
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(t for t in kept if t.name not in moved)
    for s in streams:
        t = by_name[s.name]
        graph.graph.input.append(helper.make_tensor_value_info(s.name, t.data_type, list(t.dims)))
    for node in graph.graph.node:  # decode names them again (naming.dequantize_node): ~35 bytes each
        if node.domain == naming.DOMAIN and node.name == naming.dequantize_node(node.output[0]):
            node.name = ""
    detach_functions(graph)  # decode re-attaches onnxhq's own definitions, fixed by FORMAT_VERSION
    set_metadata(graph, {naming.METADATA_SIDECAR: sidecar_name, naming.METADATA_VERSION: FORMAT_VERSION,
                         **({} if original_bytes is None else {naming.METADATA_ORIGINAL_BYTES: str(original_bytes)})})
    sidecar = encode_sidecar(streams, metadata={"graph": graph_name})
    return Artifacts(graph_name, graph.SerializeToString(), sidecar_name, sidecar)


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
