"""The sidecar file: quantization indices of several tensors, Huffman-coded, safetensors-style.

Layout (all integers little-endian; the README's "Sidecar format" is the full description)::

    magic b"ONNXHQSC" | u32 version (2) | u32 crc32(header) | u64 header length | header | buffer

The header is zlib-compressed ASCII JSON (at most 16 MiB either way): an optional
``"__metadata__"`` object of strings and, per stream name, an object with the fields of `_FIELDS`:
``data_offsets`` ``[begin, end)`` into the buffer and the ``crc32`` of those bytes, which this
module (the container) writes and checks, and the coding fields of `coding.layout`, which say how
the stream's bytes code its indices. Streams are stored in name order; their offsets tile the
buffer exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from ._io import atomic_write_bytes
from .coding import layout, unpack
from .coding.layout import Entry, StreamLayout
from .errors import ConfigError, SidecarError
from .numeric import is_int

logger = logging.getLogger(__name__)

MAGIC: Final = b"ONNXHQSC"
#: The sidecar format this onnxhq writes and reads (the u32 after the magic). 1: onnxhq 0.1.
SIDECAR_FORMAT_VERSION: Final[int] = 2
MAX_HEADER = 16 << 20  # bytes of the stored header, and of its JSON once inflated
#: The fixed prefix: magic, format version, CRC-32 of the stored header, its length.
PREFIX = struct.Struct("<8sIIQ")
#: The header key of the metadata object (no stream may have this name).
METADATA_KEY = "__metadata__"
_FIELDS = tuple(sorted([*layout.FIELDS, "data_offsets", "crc32"]))  # of every stream's entry


@dataclass(frozen=True, eq=False)
class IndexStream:
    """The quantization indices of one tensor.

    Parameters
    ----------
    name : str
        ONNX name of the index tensor.
    shape : tuple of int
        Shape of ``indices``.
    alphabet_size : int
        k, 1..65536; every index lies in [0, k).
    indices : ndarray, shape ``shape``
        Integer indices; stored as a read-only view.

    Equality compares all fields, the indices by value (not dtype).
    """

    name: str
    shape: tuple[int, ...]
    alphabet_size: int
    indices: np.ndarray

    def __post_init__(self) -> None:
        name, k = self.name, self.alphabet_size
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise ConfigError(
                f"stream name {name!r} must be a non-empty string other than {METADATA_KEY!r}"
            )
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if shape is None or not all(is_int(d) and d >= 0 for d in shape):
            raise ConfigError(
                f"stream {name!r}: shape {self.shape!r} must be a tuple of non-negative ints"
            )
        if not is_int(k) or not 1 <= k <= layout.MAX_ALPHABET:
            raise ConfigError(
                f"stream {name!r}: alphabet_size={k!r} must be an int in [1, {layout.MAX_ALPHABET}]"
            )
        shape, indices = tuple(int(d) for d in shape), np.asarray(self.indices).view()
        if indices.dtype.kind not in "iu" or indices.shape != shape:
            got = f"dtype {indices.dtype} shape {indices.shape}"
            raise ConfigError(
                f"stream {name!r}: indices must be an integer array of shape {shape}, got {got}"
            )
        if indices.size > layout.MAX_COUNT:
            raise ConfigError(
                f"stream {name!r}: {indices.size} indices exceed the {layout.MAX_COUNT} one "
                "stream holds"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= k):
            span = f"[{indices.min()}, {indices.max()}]"
            raise ConfigError(f"stream {name!r}: indices span {span}, outside [0, {k})")
        indices.flags.writeable = False
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "alphabet_size", int(k))
        object.__setattr__(self, "indices", indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexStream):
            return NotImplemented
        mine = (self.name, self.shape, self.alphabet_size)
        return mine == (other.name, other.shape, other.alphabet_size) and np.array_equal(
            self.indices, other.indices
        )


# ---------------------------------------------------------------- encoding


def encode_sidecar(
    streams: Sequence[IndexStream], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Sidecar bytes for ``streams`` (stored in name order) and string ``metadata``.

    The result depends only on the streams' contents and names, not on their order.
    """
    return _encode(streams, metadata)[0]


def encode_sidecar_with_layouts(
    streams: Sequence[IndexStream], *, metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[StreamLayout]]:
    """`encode_sidecar` and the size accounting of its streams, in name order: what
    `describe_sidecar` of the bytes gives, without decoding them."""
    data, entries, stored = _encode(streams, metadata)
    by_name = {s.name: s.indices for s in streams}
    return data, _describe(entries, [by_name[name] for name, _ in entries], stored)


def _encode(
    streams: Sequence[IndexStream], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, Entry]], int]:
    """The bytes, the ``(name, entry)`` of every stream in file order, the stored header length."""
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConfigError("metadata must map str to str")
    if not all(isinstance(s, IndexStream) for s in streams):
        raise ConfigError("streams must be IndexStream instances")
    names = sorted(s.name for s in streams)
    if len(set(names)) != len(names):
        twice = sorted({a for a, b in itertools.pairwise(names) if a == b})
        raise ConfigError(f"duplicate stream names: {twice}")
    header: dict[str, object] = {METADATA_KEY: metadata} if metadata else {}
    entries, blobs, offset = [], [], 0
    for stream in sorted(streams, key=lambda s: s.name):
        entry, blob = layout.encode_stream(stream.name, stream.indices, stream.alphabet_size)
        entry["data_offsets"] = [offset, offset + len(blob)]
        entry["crc32"] = zlib.crc32(blob)
        header[stream.name] = entry
        entries.append((stream.name, entry))
        blobs.append(blob)
        offset += len(blob)
    head, stored = pack_header(header)
    return b"".join([head, *blobs]), entries, stored


def pack_header(header: Mapping[str, object]) -> tuple[bytes, int]:
    """The prefix and zlib-compressed JSON header of a sidecar (what precedes the streams'
    bytes), and the stored header's length; a header past `MAX_HEADER` is refused."""
    text = dump_header(header)
    if len(text) > MAX_HEADER:
        raise ConfigError(
            f"sidecar header of {len(text)} bytes exceeds {MAX_HEADER}; use fewer streams"
        )
    packed = zlib.compress(text, 9)
    prefix = PREFIX.pack(MAGIC, SIDECAR_FORMAT_VERSION, zlib.crc32(packed), len(packed))
    return prefix + packed, len(packed)


def dump_header(obj: object) -> bytes:
    """The header's JSON text (sorted keys, compact, ASCII): what `pack_header` compresses."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# ---------------------------------------------------------------- decoding


def decode_sidecar(
    data: bytes, *, crc32: int | None = None
) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams (in file order, i.e. by name) and metadata of sidecar ``data``; SidecarError if
    invalid, or if ``crc32`` (what the compressed graph records) is given and is not the file's."""
    entries, metadata, buffer, _ = _parse(data)  # a damaged file is reported as such first
    if crc32 is not None and zlib.crc32(data) != crc32:
        raise SidecarError(
            f"valid, but not this graph's sidecar: its CRC-32 is {zlib.crc32(data):08x}, the "
            f"graph records {crc32:08x}; use the .onnxhq file that 'onnxhq compress' wrote with "
            "the graph"
        )
    return _decode_streams(entries, buffer), metadata


def _parse(data: bytes) -> tuple[list[tuple[str, Entry]], dict[str, str], memoryview, int]:
    """Validated ``(entries, metadata, buffer, stored header length)``; entries sorted by offset."""
    data = bytes(data)
    crc, size = check_prefix(data)
    header = unpack_header(data[PREFIX.size : PREFIX.size + size], crc)
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SidecarError("__metadata__ must be an object of strings")
    buffer = memoryview(data)[PREFIX.size + size :]  # not a copy: the payloads are most of it
    return check_streams(header, len(buffer), buffer=buffer), metadata, buffer, size


def check_prefix(data: bytes) -> tuple[int, int]:
    """The stored header's CRC-32 and length from the prefix at the start of ``data`` (the whole
    file, or at least its prefix and header); SidecarError naming the first problem."""
    if len(data) < PREFIX.size:
        raise SidecarError(
            f"sidecar of {len(data)} bytes is shorter than its {PREFIX.size}-byte prefix"
        )
    magic, version, crc, size = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SidecarError(f"not an onnxhq sidecar: magic {magic!r}, expected {MAGIC!r}")
    if version != SIDECAR_FORMAT_VERSION:
        hint = ("; it was written by onnxhq 0.1: decode it with onnxhq 0.1, or compress the "
                "model again") if version == 1 else ""  # fmt: skip
        raise SidecarError(
            f"sidecar format version {version} is not supported (this reader knows "
            f"{SIDECAR_FORMAT_VERSION}){hint}"
        )
    if size > MAX_HEADER or PREFIX.size + size > len(data):
        raise SidecarError(
            f"header length {size} exceeds {MAX_HEADER} or the {len(data)}-byte file"
        )
    return crc, size


def unpack_header(packed: bytes, crc: int) -> dict:
    """The header object of the stored header ``packed``, checked against its CRC-32 ``crc``."""
    if zlib.crc32(packed) != crc:
        raise SidecarError(
            f"header CRC32 mismatch: stored {crc:#010x}, computed {zlib.crc32(packed):#010x}"
        )
    return load_header(packed)


def check_streams(
    header: Mapping[str, object], size: int, *, buffer: memoryview | None = None
) -> list[tuple[str, Entry]]:
    """The checked entries of ``header`` (metadata removed), sorted by offset, whose offsets
    must tile a ``size``-byte buffer exactly; each stream's CRC-32 too when ``buffer`` is given
    (checked stream by stream, so the first problem in buffer order is the one reported)."""
    checked = ((name, check_entry(name, entry)) for name, entry in header.items())
    entries = sorted(checked, key=lambda x: x[1]["data_offsets"])
    end = 0
    for name, entry in entries:
        begin, stop = entry["data_offsets"]
        if begin != end:
            raise SidecarError(
                f"stream {name!r} starts at {begin}, expected {end}: hole or overlap in the buffer"
            )
        if stop > size:
            raise SidecarError(f"stream {name!r} ends at {stop}, beyond the {size}-byte buffer")
        if buffer is not None and zlib.crc32(buffer[begin:stop]) != entry["crc32"]:
            raise SidecarError(f"stream {name!r}: CRC32 mismatch")
        end = stop
    if end != size:
        raise SidecarError(f"{size - end} trailing bytes after the last stream")
    return entries


def load_header(packed: bytes) -> dict:
    """The header object from its zlib stream, inflating at most MAX_HEADER bytes."""
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(packed, MAX_HEADER)
    except zlib.error as exc:
        raise SidecarError(f"header is not a zlib stream: {exc}") from None
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise SidecarError(
            f"header does not inflate to one complete zlib stream of at most {MAX_HEADER} bytes"
        )
    try:
        header = json.loads(text.decode("ascii"))
    except (ValueError, RecursionError) as exc:
        raise SidecarError(f"header is not ASCII JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SidecarError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def check_entry(name: str, entry: object) -> Entry:
    """The header entry of one stream, with every field type- and range-checked."""
    if not name:
        raise SidecarError("a stream has an empty name")
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise SidecarError(
            f"stream {name!r}: header entry must have fields {list(_FIELDS)}, got {got}"
        )
    crc, offsets = entry["crc32"], entry["data_offsets"]
    if not (type(crc) is int and 0 <= crc <= 2**32 - 1):
        raise SidecarError(f"stream {name!r}: crc32={crc!r} must be an int in [0, {2**32 - 1}]")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SidecarError(
            f"stream {name!r}: data_offsets={offsets!r} must be [begin, end] with 0 <= begin <= end"
        )
    layout.check_fields(name, entry)
    span, need = offsets[1] - offsets[0], sum(layout.field_sizes(entry))
    if need != span:
        raise SidecarError(f"stream {name!r}: data_offsets span {span} bytes, fields need {need}")
    return entry


def _decode_streams(entries: list[tuple[str, Entry]], buffer: memoryview) -> list[IndexStream]:
    indices = unpack.decode_streams(entries, buffer)
    return [
        IndexStream(name, part.shape, entry["alphabet_size"], part)
        for (name, entry), part in zip(entries, indices)
    ]


def describe_sidecar(
    data: bytes, *, streams: Sequence[IndexStream] | None = None
) -> list[StreamLayout]:
    """Size accounting of every stream of sidecar ``data`` (decodes it to measure entropy, unless
    ``streams``, what `decode_sidecar` returned for ``data``, are given).

    The prefix and the compressed header are shared out in proportion to each stream's JSON entry.
    """
    entries, _, buffer, size = _parse(data)
    if streams is None:
        streams = _decode_streams(entries, buffer)
    elif [s.name for s in streams] != [name for name, _ in entries]:
        raise ConfigError("streams must be what decode_sidecar returned for the same data")
    return _describe(entries, [s.indices for s in streams], size)


def _describe(
    entries: list[tuple[str, Entry]], indices: list[np.ndarray], stored: int
) -> list[StreamLayout]:
    """`layout.describe` of every stream, with the prefix and the ``stored``-byte header shared
    out in proportion to the streams' JSON entries."""
    shares = header_shares(entries, PREFIX.size + stored)
    return [
        layout.describe(name, entry, part, share)
        for (name, entry), part, share in zip(entries, indices, shares)
    ]


def header_shares(entries: Sequence[tuple[str, Entry]], head: int) -> list[int]:
    """The ``head`` bytes of prefix and header shared out among the streams in proportion to
    their JSON entries (what `describe_sidecar` counts as each stream's)."""
    weights = np.array([len(dump_header({name: entry})) for name, entry in entries], dtype=np.int64)
    total = max(int(weights.sum()), 1)
    shares = np.diff(np.concatenate(([0], (np.cumsum(weights) * head) // total)))
    return [int(x) for x in shares]


# ---------------------------------------------------------------- files


def write_sidecar(
    path: str | os.PathLike,
    streams: Sequence[IndexStream],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write the sidecar of ``streams`` to ``path`` atomically; returns the bytes written."""
    data = encode_sidecar(streams, metadata=metadata)
    try:
        written = atomic_write_bytes(path, data)
    except OSError as exc:
        raise SidecarError(
            f"cannot write sidecar {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from None
    logger.info("wrote sidecar %s: %d streams, %d bytes", path, len(streams), written)
    return written


def read_sidecar(
    path: str | os.PathLike, *, crc32: int | None = None
) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams and metadata of the sidecar file at ``path``; SidecarError if missing or invalid
    (see `decode_sidecar` for ``crc32``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SidecarError(
            f"cannot read sidecar {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from None
    try:
        return decode_sidecar(data, crc32=crc32)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {os.fspath(path)!r}: {exc}") from None
