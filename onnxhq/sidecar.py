"""The sidecar file: quantization indices of several tensors, Huffman-coded, safetensors-style.

Layout (all integers little-endian; the README's "Sidecar format" is the full description)::

    magic b"ONNXHQSC" | u32 version (2) | u32 crc32(header) | u64 header length | header | buffer

The header is zlib-compressed ASCII JSON (at most 16 MiB either way): an optional ``"__metadata__"``
object of strings and, per stream name, an object with the fields of ``_FIELDS``. Streams are stored
in name order; their ``data_offsets`` ``[begin, end)`` tile the buffer exactly. A stream's bytes are
three zero-padded, MSB-first bit fields: the code table (which symbols have a code, as a bit per
group of 8 symbols and an 8-bit mask per marked group, then their lengths minus 1), the
``block_width``-bit values ``bits(block) - block_base`` for every ``block_size``-symbol block but
the last, and the canonical Huffman payload of ``bits`` bits (see :mod:`.huffman`).

With ``run_symbol`` null the symbols are the indices in C order. Otherwise the writer joins each
run of ``run_symbol`` (usually the most frequent index: the zero of pruned weights, or the zero
cell of a coarse uniform grid) to the index after it, JPEG-style: with k = ``alphabet_size``,
symbol ``c * (k + 1) + i`` is a run of class c followed by index i, or for i = k by the end of the
stream. Class 0 is no run; class c >= 1 is a run of ``2**(c-1) + e`` copies, e being the c - 1
extra bits after the code word. So a long run costs one symbol and about twice its log2 in bits,
and a stream of one repeated index costs a few bits in all.
"""

from __future__ import annotations

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

from . import huffman
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


def decode_sidecar(data: bytes) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams (in file order, i.e. by name) and metadata of sidecar ``data``; SidecarError if invalid."""
    entries, metadata, buffer, _ = _parse(data)
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


def _class_extra_widths(n_classes: int, k: int) -> np.ndarray:
    return np.repeat(np.maximum(np.arange(n_classes, dtype=np.int64) - 1, 0), k + 1)


def _field_sizes(entry: dict) -> tuple[int, int, int]:
    """Bytes of the code table, the block index and the payload of a stream."""
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    return (
        (entry["table_bits"] + 7) // 8,
        (entry["block_width"] * max(n_blocks - 1, 0) + 7) // 8,
        (entry["bits"] + 7) // 8,
    )


def _decode_streams(entries: list[tuple[str, dict]], buffer: bytes) -> list[IndexStream]:
    """Every stream's indices; the Huffman payloads of all of them are decoded together."""
    coded = [_coded(name, entry, buffer) for name, entry in entries]
    names = [name for name, _ in entries]
    decoded = huffman.decode_many(coded, names)
    streams = []
    for (name, entry), result in zip(entries, decoded):
        k, count = entry["alphabet_size"], math.prod(entry["shape"])
        dtype = np.uint8 if k <= 256 else np.uint16
        try:
            symbols = _expand_runs(*result, k, entry["run_symbol"], count, dtype) if entry["run_classes"] else result
        except SidecarError as exc:
            raise SidecarError(f"stream {name!r}: {exc}") from None
        indices = symbols.astype(dtype, copy=False).reshape(entry["shape"])
        streams.append(IndexStream(name, tuple(entry["shape"]), k, indices))
    return streams


def _coded(name: str, entry: dict, buffer: bytes) -> huffman.Coded:
    """The checked code table, block index and payload of one stream, ready for `huffman.decode_many`."""
    bits = entry["bits"]
    at = np.cumsum((entry["data_offsets"][0],) + _field_sizes(entry)).tolist()
    table, index, payload = (buffer[at[i] : at[i + 1]] for i in range(3))
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    try:
        lengths = _read_table(table, _table_size(entry), entry["table_bits"])
        blocks = huffman.unpack_bits(index, entry["block_width"], max(n_blocks - 1, 0)) + entry["block_base"]
        blocks = np.append(blocks, bits - blocks.sum()) if n_blocks else blocks
        if blocks.size and blocks[-1] < 0:
            raise SidecarError(f"block index sums to more than the {bits} payload bits")
        if bits % 8 and payload[-1] & ((1 << (8 - bits % 8)) - 1):
            raise SidecarError("non-zero padding bits after the payload")
    except SidecarError as exc:
        raise SidecarError(f"stream {name!r}: {exc}") from None
    return huffman.Coded(payload, lengths, entry["symbols"], entry["block_size"], blocks,
                         _extra_widths(entry) if entry["run_classes"] else None)


def _read_table(table: bytes, size: int, n_bits: int) -> np.ndarray:
    """Code lengths (size,) from the code-table field of ``n_bits`` bits (see `_pack_table`)."""
    groups = -(-size // GROUP)
    bits = np.unpackbits(np.frombuffer(table, dtype=np.uint8))
    marked = bits[:groups].astype(bool)
    n_marked = int(marked.sum())
    if groups + GROUP * n_marked > bits.size:
        raise SidecarError(f"code table of {n_marked} marked groups needs more than table_bits={n_bits}")
    has_code = np.zeros((groups, GROUP), dtype=bool)
    masks = bits[groups : groups + GROUP * n_marked].reshape(n_marked, GROUP).astype(bool)
    has_code[marked] = masks
    has_code = has_code.ravel()
    if (n_marked and not masks.any(axis=1).all()) or has_code[size:].any():
        raise SidecarError("code table marks an empty group, or symbols beyond the alphabet")
    used, width = int(has_code.sum()), _length_bits(size)
    start = groups + GROUP * n_marked
    if start + width * used != n_bits:
        raise SidecarError(f"code table of {used} coded symbols takes {start + width * used} bits, "
                           f"header says table_bits={n_bits}")
    if bits[n_bits:].any():
        raise SidecarError("non-zero padding bits after the code table")
    lengths = np.zeros(size, dtype=np.int64)
    fields = bits[start:n_bits].reshape(used, width).astype(np.int64)
    lengths[has_code[:size]] = 1 + fields @ (1 << np.arange(width - 1, -1, -1))
    return lengths


def _expand_runs(symbols: np.ndarray, extra: np.ndarray, k: int, run_symbol: int, count: int,
                 dtype) -> np.ndarray:
    """Indices (count,) from run-coded symbols; SidecarError unless they cover exactly ``count``.

    Works in place on one int64 array: fresh temporaries of this size cost page faults.
    """
    classes, levels = np.divmod(symbols, np.int32(k + 1))
    is_end = levels == k
    if is_end[:-1].any() or (is_end[-1] and classes[-1] == 0):
        raise SidecarError("an end-of-stream symbol that is not last, or ends no run")
    shortest = np.concatenate(([1], np.left_shift(1, np.arange(MAX_RUN_CLASSES - 1, dtype=np.int64)) + 1))
    ends = shortest.take(classes)  # the run (class c >= 1: 2**(c-1) + extra bits; class 0: none) + 1 index
    ends += extra
    np.cumsum(ends, out=ends)
    total = int(ends[-1]) - int(is_end[-1])  # the end symbol stands for its run alone
    if total != count:
        raise SidecarError(f"run symbols cover {total} indices, shape needs {count}")
    out = np.full(count, run_symbol, dtype=dtype)
    n = ends.size - int(is_end[-1])
    ends -= 1
    out[ends[:n]] = levels[:n]
    return out


def describe_sidecar(data: bytes) -> list[StreamLayout]:
    """Size accounting of every stream of sidecar ``data`` (decodes it to measure entropy).

    The prefix and the compressed header are shared out in proportion to each stream's JSON entry.
    """
    entries, _, buffer, size = _parse(data)
    weights = np.array([len(_dump({name: entry})) for name, entry in entries], dtype=np.int64)
    shares = np.diff(np.concatenate(([0], (np.cumsum(weights) * (_PREFIX.size + size)) // max(int(weights.sum()), 1))))
    layouts = []
    for i, ((name, entry), stream) in enumerate(zip(entries, _decode_streams(entries, buffer))):
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


def read_sidecar(path) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams and metadata of the sidecar file at ``path``; SidecarError if missing or invalid."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read sidecar {os.fspath(path)!r}: {exc.strerror or exc}") from None
    try:
        return decode_sidecar(data)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {os.fspath(path)!r}: {exc}") from None
