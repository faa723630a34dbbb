"""Split a rewritten model into the two artifacts users keep: the graph and the sidecar.

The compressed graph (``<stem>.onnx``) holds structure, codebooks, unquantized tensors and the
dequantize nodes; the index tensors' values live Huffman-coded in the sidecar (``<stem>.onnxhq``),
one symbol per weight, under the index tensor's name and with the weight's shape. The graph
records the sidecar's file name and CRC-32 in ``metadata_props`` (``onnxhq.sidecar``,
``onnxhq.sidecar_crc32``), so a sidecar of another model is refused. Everything decode can derive
is left out of the graph (graph format `GRAPH_FORMAT_VERSION`, recorded as ``onnxhq.version``):
the definitions of onnxhq's dequantize functions, the dequantize nodes' names, their index input
and a per-weight codebook input (named after the node's output, see `naming`; left as ""), and
declarations of the index tensors. It stays a valid ONNX file that `onnx.checker` accepts, but it
is a storage artifact, not meant to run as it is. `decode.join_artifacts` reverses all this.
Format 1 (onnxhq 0.2.0) kept the node inputs and declared the index tensors as graph inputs;
decode still reads it.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, BinaryIO, Final

import numpy as np
import onnx

from . import naming
from ._io import Content
from .coding import layout
from .coding.layout import Entry, StreamLayout
from .errors import ConfigError
from .model import initializer_map, serialize_model, set_metadata
from .rewrite import detach_functions, index_facts, node_codes
from .sidecar import IndexStream, encode_sidecar_with_layouts
from .sidecar_io import sidecar_head

if TYPE_CHECKING:
    from .quantize import TensorCodes

#: The graph format this onnxhq writes (the ``onnxhq.version`` metadata, written as a decimal
#: string), and those it reads: 1 is onnxhq 0.2.0's. (The sidecar's: SIDECAR_FORMAT_VERSION.)
GRAPH_FORMAT_VERSION: Final[int] = 2
READABLE_GRAPH_FORMATS: Final[tuple[int, ...]] = (1, 2)
_COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class Artifacts:
    """The serialized compressed model: graph bytes, sidecar bytes and their file names.

    ``layouts`` is the size accounting of every sidecar stream, in name order (what
    `sidecar.describe_sidecar` of ``sidecar_bytes`` gives), made while encoding. A graph past
    2 GB keeps its tensors in ``graph_data``, ``(file name, content, bytes)`` of its external
    data file (`model.serialize_model`); ``graph_bytes`` then holds the graph without them.
    """

    graph_name: str
    graph_bytes: bytes
    sidecar_name: str
    sidecar_bytes: bytes
    layouts: tuple[StreamLayout, ...]
    graph_data: tuple[tuple[str, Content, int], ...] = ()
    sidecar_file: SpooledSidecar | None = None

    @property
    def graph_size(self) -> int:
        """Bytes of the graph file plus those of its external data."""
        return len(self.graph_bytes) + sum(size for _, _, size in self.graph_data)

    @property
    def sidecar_size(self) -> int:
        """Bytes of the sidecar file."""
        return self.sidecar_file.size if self.sidecar_file else len(self.sidecar_bytes)

    def sidecar(self) -> bytes:
        """The sidecar's bytes (read back from its temporary file for a streamed compress, whose
        ``sidecar_bytes`` are empty)."""
        if self.sidecar_file is None:
            return self.sidecar_bytes
        buffer = io.BytesIO()
        self.sidecar_file.write_to(buffer)
        return buffer.getvalue()

    def files(self) -> list[tuple[str, Content]]:
        """Every file to write, ``(name, content)``: graph, sidecar, the graph's external data."""
        sidecar = self.sidecar_bytes if self.sidecar_file is None else self.sidecar_file.write_to
        return [
            (self.graph_name, self.graph_bytes),
            (self.sidecar_name, sidecar),
            *((name, content) for name, content, _ in self.graph_data),
        ]


@dataclass(frozen=True, eq=False)
class SpooledSidecar:
    """A sidecar whose streams' bytes wait in an anonymous temporary file (`SidecarWriter`)."""

    head: bytes
    spool: BinaryIO
    size: int
    crc32: int

    def write_to(self, f: BinaryIO) -> None:
        """Write the whole sidecar to the open binary file ``f``, 16 MiB at a time."""
        f.write(self.head)
        self.spool.seek(0)
        shutil.copyfileobj(self.spool, f, _COPY_CHUNK)


class SidecarWriter:
    """Codes index streams one at a time, in name order, into a sidecar: the streams' bytes go
    to an anonymous temporary file (``spool``) or memory as they come, and only the header waits
    for the end (`finish`). The bytes are those `encode_sidecar` writes for the same streams."""

    def __init__(self, *, spool: bool) -> None:
        # the spool lives as long as the artifacts that write it out: no context manager
        self._out: BinaryIO = tempfile.TemporaryFile() if spool else io.BytesIO()  # noqa: SIM115
        self._entries: list[tuple[str, Entry]] = []
        self._layouts: list[StreamLayout] = []
        self._offset = 0

    def add(self, stream: IndexStream) -> StreamLayout:
        """Code ``stream`` (its name after every name added before) and return its layout (its
        share of the header is filled in by `finish`)."""
        if self._entries and stream.name <= self._entries[-1][0]:
            raise ConfigError(
                f"stream {stream.name!r} comes after {self._entries[-1][0]!r}; add streams in "
                "name order, each once"
            )
        entry, blob = layout.encode_stream(stream.name, stream.indices, stream.alphabet_size)
        entry["data_offsets"] = [self._offset, self._offset + len(blob)]
        entry["crc32"] = zlib.crc32(blob)
        self._out.write(blob)
        self._offset += len(blob)
        self._entries.append((stream.name, entry))
        described = layout.describe(stream.name, entry, stream.indices, 0)
        self._layouts.append(described)
        return described

    def finish(
        self, metadata: Mapping[str, str]
    ) -> tuple[bytes | SpooledSidecar, tuple[StreamLayout, ...]]:
        """The sidecar (bytes, or spooled when written with ``spool``) and its streams' layouts."""
        head, shares = sidecar_head(self._entries, metadata=metadata)
        layouts = tuple(replace(lay, header_bytes=s) for lay, s in zip(self._layouts, shares))
        if isinstance(self._out, io.BytesIO):
            return head + self._out.getvalue(), layouts
        crc = zlib.crc32(head)
        self._out.seek(0)
        while chunk := self._out.read(_COPY_CHUNK):
            crc = zlib.crc32(chunk, crc)
        return SpooledSidecar(head, self._out, len(head) + self._offset, crc), layouts


def index_streams(model: onnx.ModelProto) -> list[IndexStream]:
    """One stream per dequantize node's index initializer, in graph order; packed indices are
    unpacked (the sidecar keeps one symbol per weight, of the weight's shape)."""
    inits = initializer_map(model)
    streams = []
    for node in model.graph.node:
        if node.domain != naming.DOMAIN:
            continue
        _, indices, k, _ = node_codes(node, inits)
        streams.append(IndexStream(node.input[1], tuple(indices.shape), k, indices))
    return streams


def index_streams_of(
    tensors: Mapping[str, TensorCodes], codebooks: Mapping[str, np.ndarray]
) -> list[IndexStream]:
    """The streams `index_streams` reads from ``rewrite(model, codebooks, tensors)``, straight from
    the quantized weights, in ``tensors`` order.

    Parameters
    ----------
    tensors : weight name -> codes with ``codebook`` (key) and ``indices`` (int array of the
        weight's shape).
    codebooks : key -> (k,) or (G, k) codebook; only its row length k, the alphabet, is read.
    """
    streams = []
    for name, codes in tensors.items():
        if codes.codebook not in codebooks:
            raise ConfigError(
                f"weight {name!r} uses codebook {codes.codebook!r}, which is not among the "
                f"{len(codebooks)} given; pass the codebooks quantization returned with the codes"
            )
        k = int(np.shape(codebooks[codes.codebook])[-1])
        indices = np.asarray(codes.indices)
        streams.append(IndexStream(naming.index_tensor(name), indices.shape, k, indices))
    return streams


def split_artifacts(
    model: onnx.ModelProto,
    stem: str,
    *,
    streams: Sequence[IndexStream] | None = None,
    original_bytes: int | None = None,
) -> Artifacts:
    """Serialize ``model`` (output of `rewrite.rewrite`) as graph + sidecar named after ``stem``.

    ``streams`` are the model's index streams when the caller holds them (`index_streams_of`);
    without them they are read from the model (`index_streams`). ``original_bytes`` (the input
    model's size) is recorded so `report` can give the same ratio later.
    """
    graph_name, sidecar_name = naming.artifact_names(stem)
    if streams is None:
        streams = index_streams(model)
    else:
        _check_streams(model, streams)
    sidecar, layouts = encode_sidecar_with_layouts(streams, metadata={"graph": graph_name})
    graph_bytes, data = graph_artifact(
        model, stem, {s.name for s in streams}, zlib.crc32(sidecar), original_bytes=original_bytes
    )
    return Artifacts(graph_name, graph_bytes, sidecar_name, sidecar, tuple(layouts), data)


def graph_artifact(
    model: onnx.ModelProto,
    stem: str,
    moved: Set[str],
    sidecar_crc: int,
    *,
    original_bytes: int | None = None,
) -> tuple[bytes, tuple[tuple[str, Content, int], ...]]:
    """The compressed graph file of rewritten ``model`` (its bytes, and its external data files
    past 2 GB): without the index initializers ``moved`` to the sidecar, whose CRC-32 it records,
    and without what decode derives (see the module doc)."""
    graph_name, sidecar_name = naming.artifact_names(stem)
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    kept = [t for t in graph.graph.initializer if t.name not in moved]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    for node in graph.graph.node:
        if node.domain == naming.DOMAIN:
            strip_derived_names(node)
    detach_functions(graph)  # decode re-attaches onnxhq's own definitions, fixed by the format
    metadata = {
        naming.METADATA_SIDECAR: sidecar_name,
        naming.METADATA_VERSION: str(GRAPH_FORMAT_VERSION),
        naming.METADATA_SIDECAR_CRC: f"{sidecar_crc:08x}",
    }
    if original_bytes is not None:
        metadata[naming.METADATA_ORIGINAL_BYTES] = str(original_bytes)
    set_metadata(graph, metadata)
    (_, graph_bytes, _), *data = serialize_model(graph, graph_name)
    assert isinstance(graph_bytes, bytes)
    return graph_bytes, tuple(data)


def _check_streams(model: onnx.ModelProto, streams: Sequence[IndexStream]) -> None:
    """ConfigError unless ``streams`` have the names, shapes and alphabets of the model's index
    tensors."""
    inits = initializer_map(model)
    wanted = {}
    for node in model.graph.node:
        if node.domain == naming.DOMAIN:
            wanted[node.input[1]] = index_facts(node, inits)
    given = {s.name: (s.shape, s.alphabet_size) for s in streams}
    for name in sorted(set(wanted) | set(given)):
        if wanted.get(name) != given.get(name):
            raise ConfigError(
                f"stream {name!r} is {_facts(given.get(name))}, the model's index tensor is "
                f"{_facts(wanted.get(name))}; pass the streams of this rewritten model"
            )


def _facts(facts: tuple[tuple[int, ...], int] | None) -> str:
    return "missing" if facts is None else f"of shape {facts[0]} with {facts[1]} levels"


def strip_derived_names(node: onnx.NodeProto) -> None:
    """Blank, in place, what `restore_derived_names` can put back: ~35 bytes each (~130 a
    weight)."""
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
