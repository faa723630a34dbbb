"""The sidecar file: quantization indices of several tensors, Huffman-coded, safetensors-style.

Layout (all integers little-endian; the README's "Sidecar format" is the full description)::

    magic b"ONNXHQSC" | u32 version (2) | u32 crc32(header) | u64 header length | header | buffer

The header is zlib-compressed ASCII JSON (at most 16 MiB either way): an optional ``"__metadata__"``
object of strings and, per stream name, an object with the fields of ``_FIELDS``. Streams are stored
in name order; their ``data_offsets`` ``[begin, end)`` tile the buffer exactly. A stream's bytes are
three zero-padded, MSB-first bit fields: the code table (which symbols have a code, as a bit per
group of 8 symbols and an 8-bit mask per marked group, then their lengths minus 1), the
``block_width``-bit values ``bits(block) - block_base`` for every ``block_size``-symbol block but
the last, and the canonical Huffman payload of ``bits`` bits (see :mod:`.huffman` and :mod:`.huffdecode`).

With ``run_symbol`` null the symbols are the indices in C order. Otherwise the writer joins each
run of ``run_symbol`` (usually the most frequent index: the zero of pruned weights, or the zero
cell of a coarse uniform grid) to the index after it, JPEG-style: with k = ``alphabet_size``,
symbol ``c * (k + 1) + i`` is a run of class c followed by index i, or for i = k by the end of the
stream. Class 0 is no run; class c >= 1 is a run of ``2**(c-1) + e`` copies, e being the c - 1
extra bits after the code word. So a long run costs one symbol and about twice its log2 in bits,
and a stream of one repeated index costs a few bits in all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import huffdecode, huffman
from ._io import atomic_write_bytes
from .errors import ConfigError, SidecarError

logger = logging.getLogger(__name__)

MAGIC = b"ONNXHQSC"
VERSION = 2
MAX_HEADER = 16 << 20  # bytes of the stored header, and of its JSON once inflated
MAX_ALPHABET = 1 << 16
MAX_CODED = 1 << 17  # most symbols one Huffman code may have: code lengths stay <= 17
MAX_COUNT = 1 << 31  # most indices in one stream (bounds what a small file can expand to)
MAX_RUN_CLASSES = 33  # class 32 holds runs up to 2**32 - 1
BLOCK_SIZES = (32, 256)  # symbols per decode block; see _block_size
GROUP = 8  # code-table symbols per presence group
MAX_TABLE_BITS = MAX_CODED // GROUP + MAX_CODED + 5 * MAX_CODED
_PREFIX = struct.Struct("<8sIIQ")
_META = "__metadata__"
_FIELDS = {  # field -> (lowest, highest) for the integer fields
    "shape": None, "data_offsets": None, "run_symbol": None,
    "alphabet_size": (1, MAX_ALPHABET), "run_classes": (0, MAX_RUN_CLASSES), "table_bits": (0, MAX_TABLE_BITS),
    "symbols": (0, 8 * huffman.MAX_PAYLOAD), "bits": (0, 8 * huffman.MAX_PAYLOAD), "block_size": (1, 1 << 16),
    "block_width": (0, 32), "block_base": (0, 8 * huffman.MAX_PAYLOAD), "crc32": (0, 2**32 - 1),
}


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

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == _META:
            raise ConfigError(f"stream name {self.name!r} must be a non-empty string other than {_META!r}")
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if shape is None or not all(_is_int(d) and d >= 0 for d in shape):
            raise ConfigError(f"stream {self.name!r}: shape {self.shape!r} must be a tuple of non-negative ints")
        k = self.alphabet_size
        if not _is_int(k) or not 1 <= k <= MAX_ALPHABET:
            raise ConfigError(f"stream {self.name!r}: alphabet_size={k!r} must be an int in [1, {MAX_ALPHABET}]")
        shape, indices = tuple(int(d) for d in shape), np.asarray(self.indices).view()
        if indices.dtype.kind not in "iu" or indices.shape != shape:
            got = f"dtype {indices.dtype} shape {indices.shape}"
            raise ConfigError(f"stream {self.name!r}: indices must be an integer array of shape {shape}, got {got}")
        if indices.size > MAX_COUNT:
            raise ConfigError(f"stream {self.name!r}: {indices.size} indices exceed the {MAX_COUNT} one stream holds")
        if indices.size and (indices.min() < 0 or indices.max() >= k):
            span = f"[{indices.min()}, {indices.max()}]"
            raise ConfigError(f"stream {self.name!r}: indices span {span}, outside [0, {k})")
        indices.flags.writeable = False
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "alphabet_size", int(k))
        object.__setattr__(self, "indices", indices)

    def __eq__(self, other):
        if not isinstance(other, IndexStream):
            return NotImplemented
        return (self.name, self.shape, self.alphabet_size) == (other.name, other.shape, other.alphabet_size) and (
            np.array_equal(self.indices, other.indices))


@dataclass(frozen=True)
class StreamLayout:
    """Where the bytes of one stream go; payload + table + header bytes of all streams = file size."""

    name: str
    count: int
    alphabet_size: int
    payload_bytes: int  # code words and the runs' extra bits
    table_bytes: int  # code table and block index
    header_bytes: int  # this stream's share of the prefix and the compressed header
    entropy_bits: float  # empirical (order-0) entropy of the indices, bits per weight
    coded_bits_per_weight: float  # (payload_bytes + table_bytes) * 8 / count
    run_symbol: int | None = None  # None: plain coding; otherwise the index whose runs are joined


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------- encoding


def encode_sidecar(streams: Sequence[IndexStream], *, metadata: Mapping[str, str] | None = None) -> bytes:
    """Sidecar bytes for ``streams`` (stored in name order) and string ``metadata``.

    The result depends only on the streams' contents and names, not on their order.
    """
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConfigError("metadata must map str to str")
    if not all(isinstance(s, IndexStream) for s in streams):
        raise ConfigError("streams must be IndexStream instances")
    names = sorted(s.name for s in streams)
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate stream names: {sorted({a for a, b in zip(names, names[1:]) if a == b})}")
    header: dict[str, object] = {_META: metadata} if metadata else {}
    blobs, offset = [], 0
    for stream in sorted(streams, key=lambda s: s.name):
        entry, blob = _encode_stream(stream)
        entry["data_offsets"] = [offset, offset + len(blob)]
        entry["crc32"] = zlib.crc32(blob)
        header[stream.name] = entry
        blobs.append(blob)
        offset += len(blob)
    text = _dump(header)
    if len(text) > MAX_HEADER:
        raise ConfigError(f"sidecar header of {len(text)} bytes exceeds {MAX_HEADER}; use fewer streams")
    packed = zlib.compress(text, 9)
    return _PREFIX.pack(MAGIC, VERSION, zlib.crc32(packed), len(packed)) + packed + b"".join(blobs)


def _dump(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class _Coding:
    """One way to code a stream: its symbols, their extra bits, and the code."""

    run_symbol: int | None
    run_classes: int
    symbols: np.ndarray  # (n,) int64
    extra: np.ndarray  # (n,) int64 extra-bit values
    extra_widths: np.ndarray  # (table size,) int64
    lengths: np.ndarray  # (table size,) uint8 code lengths

    @property
    def bits(self) -> int:
        """Payload plus code-table bits."""
        per_symbol = self.lengths.astype(np.int64) + self.extra_widths
        return int(per_symbol[self.symbols].sum()) + _pack_table(self.lengths)[1]


def _length_bits(table_size: int) -> int:
    """Bits per stored code length: lengths are at most 16 while the table has <= 65536 symbols."""
    return 4 if table_size <= 1 << 16 else 5


def _pack_table(lengths: np.ndarray) -> tuple[bytes, int]:
    """The code-table field of ``lengths`` (table size,): presence bits per group, group masks, lengths - 1."""
    has_code = np.concatenate([lengths > 0, np.zeros(-lengths.size % GROUP, dtype=bool)]).reshape(-1, GROUP)
    marked = has_code.any(axis=1)
    coded = lengths[lengths > 0].astype(np.int64) - 1
    values = np.concatenate([marked, has_code[marked].ravel(), coded])
    widths = np.concatenate([np.ones(marked.size + GROUP * int(marked.sum()), np.int64),
                             np.full(coded.size, _length_bits(lengths.size))])
    return huffman.pack_bits(values, widths)


def _encode_stream(stream: IndexStream) -> tuple[dict, bytes]:
    flat = stream.indices.ravel().astype(np.int64)
    coding = _choose_coding(flat, stream.alphabet_size)
    payload, n_bits = huffman.encode(coding.symbols, coding.lengths, coding.extra, coding.extra_widths)
    if len(payload) > huffman.MAX_PAYLOAD:
        raise ConfigError(f"stream {stream.name!r} needs {len(payload)} bytes, over {huffman.MAX_PAYLOAD}")
    block_size = _block_size(coding.symbols.size)
    blocks = huffman.block_bits(coding.symbols, coding.lengths, block_size, coding.extra_widths)[:-1]
    base = int(blocks.min()) if blocks.size else 0
    width = int(blocks.max() - base).bit_length() if blocks.size else 0
    table, table_bits = _pack_table(coding.lengths)
    index, _ = huffman.pack_bits(blocks - base, width)
    entry = {
        "shape": list(stream.shape), "alphabet_size": stream.alphabet_size, "run_symbol": coding.run_symbol,
        "run_classes": coding.run_classes, "table_bits": table_bits, "symbols": int(coding.symbols.size),
        "bits": n_bits, "block_size": block_size, "block_base": base, "block_width": width,
    }
    return entry, table + index + payload


def _block_size(n_symbols: int) -> int:
    """64+ blocks (decoding takes a numpy step per symbol of a block); ~8 index bits per block."""
    return min(BLOCK_SIZES[1], max(BLOCK_SIZES[0], 1 << max(0, -(-n_symbols // 64) - 1).bit_length()))


def _choose_coding(flat: np.ndarray, k: int) -> _Coding:
    """The smaller of plain coding and run coding of the most frequent index."""
    counts = np.bincount(flat, minlength=k)
    plain = _Coding(None, 0, flat, np.zeros(flat.size, np.int64), np.zeros(k, np.int64), _lengths(counts))
    if flat.size == 0:
        return plain
    runs = _run_coding(flat, k, int(np.argmax(counts)))
    return runs if runs is not None and runs.bits < plain.bits else plain


def _run_coding(flat: np.ndarray, k: int, run_symbol: int) -> _Coding | None:
    """Each maximal run of ``run_symbol`` joined to the index after it (or to the end of the stream)."""
    keep = np.flatnonzero(flat != run_symbol)
    runs = np.diff(np.concatenate(([-1], keep, [flat.size]))) - 1  # copies before each kept index; tail last
    classes = _run_class(runs)
    n_classes = int(classes.max()) + 1
    if n_classes * (k + 1) > MAX_CODED:
        return None
    levels = np.append(flat[keep], k)  # k: the end of the stream, after the tail run
    if runs[-1] == 0:  # no tail run: no end symbol
        levels, classes, runs = levels[:-1], classes[:-1], runs[:-1]
    symbols = classes * (k + 1) + levels
    extra = np.where(classes > 0, runs - (np.int64(1) << np.maximum(classes - 1, 0)), 0)
    lengths = _lengths(np.bincount(symbols, minlength=n_classes * (k + 1)))
    return _Coding(run_symbol, n_classes, symbols, extra, _class_extra_widths(n_classes, k), lengths)


def _run_class(runs: np.ndarray) -> np.ndarray:
    """0 for no run, else ``bit_length(run)``: class c holds runs in [2**(c-1), 2**c)."""
    return np.frexp(np.asarray(runs, dtype=np.float64))[1].astype(np.int64)  # exact below 2**53


#: Longest code the writer makes (more only past 4096 coded symbols): the decoder's lookup table
#: has 2**longest entries per stream, and the limit costs ~0.03 % in size against 16.
MAX_WRITTEN_LENGTH = 12


def _lengths(counts: np.ndarray) -> np.ndarray:
    used = int(np.count_nonzero(counts))
    return huffman.code_lengths(counts, max_length=max(MAX_WRITTEN_LENGTH, (used - 1).bit_length()))


# ---------------------------------------------------------------- decoding


def decode_sidecar(data: bytes, *, crc32: int | None = None) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams (in file order, i.e. by name) and metadata of sidecar ``data``; SidecarError if invalid,
    or if ``crc32`` (what the compressed graph records) is given and is not the file's."""
    entries, metadata, buffer, _ = _parse(data)  # a damaged file is reported as such, not as a mismatch
    if crc32 is not None and zlib.crc32(data) != crc32:
        raise SidecarError(f"valid, but not this graph's sidecar: its CRC-32 is {zlib.crc32(data):08x}, the graph "
                           f"records {crc32:08x}; use the .onnxhq file that 'onnxhq compress' wrote with the graph")
    return _decode_streams(entries, buffer), metadata


def _parse(data: bytes):
    """Validated ``(entries, metadata, buffer, stored header length)``; entries sorted by offset."""
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise SidecarError(f"sidecar of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, crc, size = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SidecarError(f"not an onnxhq sidecar: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        hint = "; it was written by onnxhq 0.1: decode it with onnxhq 0.1, or compress the model again" \
            if version == 1 else ""
        raise SidecarError(f"sidecar format version {version} is not supported (this reader knows {VERSION}){hint}")
    if size > MAX_HEADER or _PREFIX.size + size > len(data):
        raise SidecarError(f"header length {size} exceeds {MAX_HEADER} or the {len(data)}-byte file")
    packed = data[_PREFIX.size : _PREFIX.size + size]
    if zlib.crc32(packed) != crc:
        raise SidecarError(f"header CRC32 mismatch: stored {crc:#010x}, computed {zlib.crc32(packed):#010x}")
    header = _load_header(packed)
    metadata = header.pop(_META, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SidecarError("__metadata__ must be an object of strings")
    buffer = data[_PREFIX.size + size :]
    entries = sorted(((name, _check_entry(name, e)) for name, e in header.items()), key=lambda x: x[1]["data_offsets"])
    end = 0
    for name, entry in entries:
        begin, stop = entry["data_offsets"]
        if begin != end:
            raise SidecarError(f"stream {name!r} starts at {begin}, expected {end}: hole or overlap in the buffer")
        if stop > len(buffer):
            raise SidecarError(f"stream {name!r} ends at {stop}, beyond the {len(buffer)}-byte buffer")
        if zlib.crc32(buffer[begin:stop]) != entry["crc32"]:
            raise SidecarError(f"stream {name!r}: CRC32 mismatch")
        end = stop
    if end != len(buffer):
        raise SidecarError(f"{len(buffer) - end} trailing bytes after the last stream")
    return entries, metadata, buffer, size


def _load_header(packed: bytes) -> dict:
    """The header object from its zlib stream, inflating at most MAX_HEADER bytes."""
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(packed, MAX_HEADER)
    except zlib.error as exc:
        raise SidecarError(f"header is not a zlib stream: {exc}") from None
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise SidecarError(f"header does not inflate to one complete zlib stream of at most {MAX_HEADER} bytes")
    try:
        header = json.loads(text.decode("ascii"))
    except (ValueError, RecursionError) as exc:
        raise SidecarError(f"header is not ASCII JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SidecarError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _check_entry(name: str, entry) -> dict:
    """The header entry of one stream, with every field type- and range-checked."""
    if not name:
        raise SidecarError("a stream has an empty name")
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise SidecarError(f"stream {name!r}: header entry must have fields {sorted(_FIELDS)}, got {got}")
    for key, bounds in _FIELDS.items():
        if bounds is not None and not (type(entry[key]) is int and bounds[0] <= entry[key] <= bounds[1]):
            raise SidecarError(f"stream {name!r}: {key}={entry[key]!r} must be an int in [{bounds[0]}, {bounds[1]}]")
    shape, offsets, k = entry["shape"], entry["data_offsets"], entry["alphabet_size"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape):
        raise SidecarError(f"stream {name!r}: shape={shape!r} must be a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SidecarError(f"stream {name!r}: data_offsets={offsets!r} must be [begin, end] with 0 <= begin <= end")
    run, classes = entry["run_symbol"], entry["run_classes"]
    if run is not None and not (type(run) is int and 0 <= run < k):
        raise SidecarError(f"stream {name!r}: run_symbol={run!r} must be null or an int in [0, {k})")
    if (run is None) != (classes == 0) or _table_size(entry) > MAX_CODED:
        need = f"run_classes = 0 without a run_symbol, else >= 1 with alphabet_size * run_classes < {MAX_CODED}"
        raise SidecarError(f"stream {name!r}: run_classes={classes} does not fit: {need}")
    if entry["table_bits"] < -(-_table_size(entry) // GROUP):
        need = f"the {-(-_table_size(entry) // GROUP)} presence bits of {_table_size(entry)} symbols"
        raise SidecarError(f"stream {name!r}: table_bits={entry['table_bits']} is less than {need}")
    count, symbols = math.prod(shape), entry["symbols"]
    most = symbols if not classes else symbols << max(classes - 1, 0)  # indices the symbols can cover
    if count > MAX_COUNT or symbols > count or count > most or (not classes and count != symbols):
        raise SidecarError(f"stream {name!r}: {symbols} symbols cannot hold the {count} indices of shape {shape}")
    if symbols > entry["bits"]:  # every code word has a bit: bounds decoding work by the file's size
        raise SidecarError(f"stream {name!r}: {symbols} symbols cannot fit in {entry['bits']} bits")
    if sum(_field_sizes(entry)) != offsets[1] - offsets[0]:
        need = sum(_field_sizes(entry))
        raise SidecarError(f"stream {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, fields need {need}")
    return entry


def _table_size(entry: dict) -> int:
    """Number of symbols of the alphabet: the indices, or ``run_classes * (alphabet_size + 1)``."""
    classes, k = entry["run_classes"], entry["alphabet_size"]
    return classes * (k + 1) if classes else k


def _extra_widths(entry: dict) -> np.ndarray:
    """Extra bits after each run symbol's code word: ``max(class - 1, 0)``; shape (table size,)."""
    return _class_extra_widths(entry["run_classes"], entry["alphabet_size"])


@functools.lru_cache(maxsize=256)
def _class_extra_widths(n_classes: int, k: int) -> np.ndarray:
    """Read-only: the same array serves every stream with this alphabet."""
    widths = np.repeat(np.maximum(np.arange(n_classes, dtype=np.int64) - 1, 0), k + 1)
    widths.flags.writeable = False
    return widths


def _field_sizes(entry: dict) -> tuple[int, int, int]:
    """Bytes of the code table, the block index and the payload of a stream."""
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    return (
        (entry["table_bits"] + 7) // 8,
        (entry["block_width"] * max(n_blocks - 1, 0) + 7) // 8,
        (entry["bits"] + 7) // 8,
    )


def _decode_streams(entries: list[tuple[str, dict]], buffer: bytes) -> list[IndexStream]:
    """Every stream's indices; all streams are decoded, checked and run-expanded together."""
    names = [name for name, _ in entries]
    joined = huffdecode.decode_joined(_codes(entries, buffer), names)
    counts = np.array([math.prod(entry["shape"]) for _, entry in entries], dtype=np.int64)
    indices = _expand(joined, [entry for _, entry in entries], names, counts)
    index_base = np.concatenate(([0], np.cumsum(counts))).tolist()
    streams = []
    for i, (name, entry) in enumerate(entries):
        k, shape = entry["alphabet_size"], tuple(entry["shape"])
        part = indices[index_base[i] : index_base[i + 1]]
        part = part.astype(np.uint8 if k <= 256 else np.uint16, copy=False)
        streams.append(IndexStream(name, shape, k, part.reshape(shape)))
    return streams


def _expand(joined: huffdecode.Joined, entries: list[dict], names: list[str], counts: np.ndarray) -> np.ndarray:
    """All streams' indices end to end (uint8, or uint16 past 256 levels) from their symbols.

    A symbol stands for ``span`` indices, the last of them its ``level`` (a run of the run symbol
    then the index after it; the end symbol's last index is one of its run), so the running sum of
    spans places every level and the stream's run symbol fills the rest. SidecarError unless end
    symbols are last and end a run, and each stream's spans add up to its count.
    """
    facts = [_symbol_facts(e["alphabet_size"], e["run_classes"], e["run_symbol"]) for e in entries]
    dtype = np.uint8 if all(e["alphabet_size"] <= 256 for e in entries) else np.uint16
    symbols, base = joined.symbols, joined.count_base
    levels = np.concatenate([f[1] for f in facts]).astype(dtype, copy=False)
    if not any(e["run_classes"] for e in entries):  # plain coding: one index per symbol
        return levels.take(symbols)
    span = np.concatenate([f[0] for f in facts]).take(symbols)
    span[joined.extra_at] += joined.extra
    np.cumsum(span, out=span)  # one past where each symbol's last index goes
    bad = []
    end_kind = np.concatenate([f[2] for f in facts])  # 1: end symbol, 2: end symbol of no run
    ends_at = np.flatnonzero(end_kind.take(symbols))
    stream_of = np.searchsorted(base, ends_at, side="right") - 1
    wrong = (ends_at != base[stream_of + 1] - 1) | (end_kind[symbols[ends_at]] != 1)
    if wrong.any():
        bad.append((int(stream_of[np.argmax(wrong)]), "an end-of-stream symbol that is not last, or ends no run"))
    covered = np.diff(np.where(base > 0, span[np.maximum(base - 1, 0)], 0)) if span.size else np.zeros_like(counts)
    if (covered != counts).any():
        i = int(np.argmax(covered != counts))
        bad.append((i, f"run symbols cover {covered[i]} indices, shape needs {counts[i]}"))
    if bad:
        i, message = min(bad, key=lambda b: b[0])
        raise SidecarError(f"stream {names[i]!r}: {message}")
    fill = np.array([e["run_symbol"] or 0 for e in entries], dtype=dtype)
    out = np.repeat(fill, counts)
    span -= 1
    out[span] = levels.take(symbols)
    return out


@functools.lru_cache(maxsize=256)
def _symbol_facts(k: int, n_classes: int, run_symbol: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per symbol of a stream's alphabet: the indices it stands for (int64), the last of them
    (int64), and 1 for an end symbol, 2 for one that ends no run (uint8). Read-only (cached)."""
    if not n_classes:
        span, level, end = np.ones(k, np.int64), np.arange(k, dtype=np.int64), np.zeros(k, np.uint8)
    else:
        shortest = np.concatenate(([0], np.left_shift(1, np.arange(n_classes - 1, dtype=np.int64))))
        span = np.repeat(shortest + 1, k + 1).reshape(n_classes, k + 1)
        span[:, k] -= 1  # the end symbol: its run alone
        level = np.tile(np.append(np.arange(k, dtype=np.int64), run_symbol), n_classes)
        end = np.zeros((n_classes, k + 1), np.uint8)
        end[:, k] = 1
        end[0, k] = 2
        span, end = span.ravel(), end.ravel()
    for array in (span, level, end):
        array.flags.writeable = False
    return span, level, end


def _codes(entries: list[tuple[str, dict]], buffer: bytes) -> list[huffdecode.Coded]:
    """The checked code tables, block indices and payloads of all streams, read together."""
    names = [name for name, _ in entries]
    fields = [_field_sizes(entry) for _, entry in entries]
    begin = [entry["data_offsets"][0] for _, entry in entries]
    lengths = _read_tables(buffer, names, begin, [f[0] for f in fields],
                           [_table_size(e) for _, e in entries], [e["table_bits"] for _, e in entries])
    blocks = _read_block_indices(buffer, entries, [b + f[0] for b, f in zip(begin, fields)], [f[1] for f in fields])
    coded = []
    for i, (name, entry) in enumerate(entries):
        bits, at = entry["bits"], begin[i] + fields[i][0] + fields[i][1]
        payload = buffer[at : at + fields[i][2]]
        if bits % 8 and payload[-1] & ((1 << (8 - bits % 8)) - 1):
            raise SidecarError(f"stream {name!r}: non-zero padding bits after the payload")
        coded.append(huffdecode.Coded(payload, lengths[i], entry["symbols"], entry["block_size"], blocks[i],
                                      _extra_widths(entry) if entry["run_classes"] else None))
    return coded


def _rank(sizes) -> np.ndarray:
    """Each element's place in its segment, for segments of ``sizes``: ``[0, 1, .., n0 - 1, 0, 1, ..]``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def _ragged(starts, sizes) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, sizes)])`` in a few numpy calls."""
    return np.repeat(np.asarray(starts, dtype=np.int64), sizes) + _rank(sizes)


def _read_tables(buffer: bytes, names, begin, n_bytes, sizes, n_bits) -> list[np.ndarray]:
    """Code lengths (size,) of every stream from its code-table field (see `_pack_table`)."""
    fail = lambda i, message: SidecarError(f"stream {names[int(i)]!r}: {message}")  # noqa: E731
    n, n_bytes = len(names), np.asarray(n_bytes, np.int64)
    at = 8 * (np.cumsum(n_bytes) - n_bytes)  # where each table starts in ``bits``
    bits = np.unpackbits(np.frombuffer(b"".join(buffer[b : b + m] for b, m in zip(begin, n_bytes)), np.uint8))
    bits = np.append(bits, np.zeros(8, np.uint8))  # room to read a field at the very end
    groups = -(-np.asarray(sizes, np.int64) // GROUP)
    n_bits = np.asarray(n_bits, np.int64)
    group_of = np.repeat(np.arange(n), groups)
    marked = bits[_ragged(at, groups)].astype(bool)
    n_marked = np.bincount(group_of, weights=marked, minlength=n).astype(np.int64)
    for i in np.flatnonzero(groups + GROUP * n_marked > 8 * n_bytes)[:1]:
        raise fail(i, f"code table of {n_marked[i]} marked groups needs more than table_bits={n_bits[i]}")
    which = np.flatnonzero(marked)  # the marked groups, stream by stream
    mask_at = np.repeat(at + groups, n_marked) + GROUP * _rank(n_marked)
    masks = bits[mask_at[:, None] + np.arange(GROUP)].astype(bool)
    has_code = np.zeros((groups.sum(), GROUP), dtype=bool)
    has_code[which] = masks
    first_group = np.repeat(np.cumsum(groups) - groups, groups)
    inside = np.repeat(sizes, groups) - GROUP * _rank(groups)  # symbols in the group and after it
    beyond = np.arange(GROUP) >= inside[:, None]
    empty, outside = ~masks.any(axis=1), (has_code & beyond).any(axis=1)
    if empty.any() or outside.any():
        i = np.concatenate([group_of[which[empty]], group_of[outside]]).min()
        raise fail(i, "code table marks an empty group, or symbols beyond the alphabet")
    used = np.bincount(group_of, weights=has_code.sum(axis=1), minlength=n).astype(np.int64)
    width = np.array([_length_bits(s) for s in sizes], dtype=np.int64)
    start = groups + GROUP * n_marked
    for i in np.flatnonzero(start + width * used != n_bits)[:1]:
        raise fail(i, f"code table of {used[i]} coded symbols takes {start[i] + width[i] * used[i]} bits, "
                      f"header says table_bits={n_bits[i]}")
    padding = bits[_ragged(at + n_bits, 8 * n_bytes - n_bits)]
    if padding.any():
        i = np.repeat(np.arange(n), 8 * n_bytes - n_bits)[np.argmax(padding)]
        raise fail(i, "non-zero padding bits after the code table")
    slots = np.flatnonzero(has_code.ravel())  # coded symbols, as slots of their stream's groups
    stream_of = group_of[slots // GROUP]
    field_at = np.repeat(at + start, used) + width[stream_of] * _rank(used)
    field = bits[field_at[:, None] + np.arange(5)].astype(np.int64)  # 4- or 5-bit fields, MSB first
    power = width[stream_of][:, None] - 1 - np.arange(5)
    weight = np.left_shift(1, np.maximum(power, 0)) * (power >= 0)
    symbol_base = np.cumsum(np.concatenate(([0], sizes)))
    lengths = np.zeros(symbol_base[-1], dtype=np.int64)
    symbol = symbol_base[stream_of] + slots - GROUP * first_group[slots // GROUP]
    lengths[symbol] = 1 + (field * weight).sum(axis=1)
    return [lengths[symbol_base[i] : symbol_base[i + 1]] for i in range(n)]


def _read_block_indices(buffer: bytes, entries, begin, n_bytes) -> list[np.ndarray]:
    """Every stream's block bit lengths: ``block_width``-bit values + ``block_base``, the last block
    the rest of ``bits``."""
    n_blocks = [-(-e["symbols"] // e["block_size"]) for _, e in entries]
    stored = [max(b - 1, 0) for b in n_blocks]
    width = np.repeat([e["block_width"] for _, e in entries], stored)
    at = np.repeat([8 * b for b in begin], stored) + width * _rank(stored)
    values = huffman.read_bits(buffer, at, width)
    pad_at = np.array([8 * b + e["block_width"] * s for b, (_, e), s in zip(begin, entries, stored)], np.int64)
    padding = huffman.read_bits(buffer, pad_at, 8 * (np.asarray(begin) + np.asarray(n_bytes)) - pad_at)
    for i in np.flatnonzero(padding)[:1]:
        raise SidecarError(f"stream {entries[i][0]!r}: non-zero padding bits after the last packed field")
    values += np.repeat([e["block_base"] for _, e in entries], stored)
    ends = np.concatenate(([0], np.cumsum(values)))[np.cumsum(stored)]
    last = np.array([e["bits"] for _, e in entries], np.int64) - (ends - np.concatenate(([0], ends[:-1])))
    for i in np.flatnonzero((last < 0) & (np.asarray(n_blocks) > 0))[:1]:
        name, bits = entries[i][0], entries[i][1]["bits"]
        raise SidecarError(f"stream {name!r}: block index sums to more than the {bits} payload bits")
    blocks = np.empty(sum(n_blocks), dtype=np.int64)
    first = np.cumsum(n_blocks) - n_blocks
    blocks[_ragged(first, stored)] = values
    has_blocks = np.flatnonzero(n_blocks)
    blocks[first[has_blocks] + np.asarray(n_blocks)[has_blocks] - 1] = last[has_blocks]
    return [blocks[f : f + m] for f, m in zip(first.tolist(), n_blocks)]


def describe_sidecar(data: bytes, *, streams: Sequence[IndexStream] | None = None) -> list[StreamLayout]:
    """Size accounting of every stream of sidecar ``data`` (decodes it to measure entropy, unless
    ``streams``, what `decode_sidecar` returned for ``data``, are given).

    The prefix and the compressed header are shared out in proportion to each stream's JSON entry.
    """
    entries, _, buffer, size = _parse(data)
    if streams is None:
        streams = _decode_streams(entries, buffer)
    elif [s.name for s in streams] != [name for name, _ in entries]:
        raise ConfigError("streams must be what decode_sidecar returned for the same data")
    weights = np.array([len(_dump({name: entry})) for name, entry in entries], dtype=np.int64)
    shares = np.diff(np.concatenate(([0], (np.cumsum(weights) * (_PREFIX.size + size)) // max(int(weights.sum()), 1))))
    layouts = []
    for i, ((name, entry), stream) in enumerate(zip(entries, streams)):
        n_table, n_index, n_payload = _field_sizes(entry)
        count = int(stream.indices.size)
        layouts.append(StreamLayout(
            name=name, count=count, alphabet_size=stream.alphabet_size, payload_bytes=n_payload,
            table_bytes=n_table + n_index, header_bytes=int(shares[i]),
            entropy_bits=huffman.entropy_bits(np.bincount(stream.indices.ravel(), minlength=stream.alphabet_size)),
            coded_bits_per_weight=8 * (n_payload + n_table + n_index) / count if count else 0.0,
            run_symbol=entry["run_symbol"],
        ))
    return layouts


# ---------------------------------------------------------------- files


def write_sidecar(path, streams: Sequence[IndexStream], *, metadata: Mapping[str, str] | None = None) -> int:
    """Write the sidecar of ``streams`` to ``path`` atomically; returns the number of bytes written."""
    data = encode_sidecar(streams, metadata=metadata)
    try:
        written = atomic_write_bytes(path, data)
    except OSError as exc:
        raise SidecarError(f"cannot write sidecar {os.fspath(path)!r}: {exc.strerror or exc}") from None
    logger.info("wrote sidecar %s: %d streams, %d bytes", path, len(streams), written)
    return written


def read_sidecar(path, *, crc32: int | None = None) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams and metadata of the sidecar file at ``path``; SidecarError if missing or invalid (see
    `decode_sidecar` for ``crc32``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read sidecar {os.fspath(path)!r}: {exc.strerror or exc}") from None
    try:
        return decode_sidecar(data, crc32=crc32)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {os.fspath(path)!r}: {exc}") from None
