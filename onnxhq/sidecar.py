"""The sidecar file: quantization indices of several tensors, Huffman-coded, safetensors-style.

Layout (all integers little-endian)::

    magic b"ONNXHQSC" | u32 version (1) | u32 crc32(header) | u64 header length | header | buffer

The header is ASCII JSON, at most 16 MiB: an optional ``"__metadata__"`` object of strings and,
per stream name, an object with the fields of ``_FIELDS``. Streams are stored in name order; their
``data_offsets`` ``[begin, end)`` into the buffer tile it exactly. A stream's bytes are three
zero-padded, MSB-first bit fields: the 5-bit code lengths of its symbols, the ``block_width``-bit
values ``bits(block) - block_base`` for every ``block_size``-symbol block but the last, then the
canonical Huffman payload of ``bits`` bits (see :mod:`.huffman`). With ``run_limit = 0`` the
``alphabet_size`` symbols are the indices in C order. Otherwise, with k = ``alphabet_size`` and
R = ``run_limit``, symbol ``r * k + i`` (r < R) means r zero symbols then index i, symbol ``R * k``
means R zero symbols, and the fewer than R zero symbols left at the end are implied.
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
VERSION = 1
MAX_HEADER = 16 << 20
MAX_ALPHABET = 1 << 16
MAX_CODED = 1 << 17  # most symbols one Huffman code may have: code lengths stay <= 17
MAX_RUN_LIMIT = 4096  # bounds how many indices one coded bit can expand to
BLOCK_SIZES = (32, 256)  # symbols per decode block; see _block_size
LENGTH_BITS = 5
_PREFIX = struct.Struct("<8sIIQ")
_META = "__metadata__"
_FIELDS = {  # field -> (lowest, highest) for the integer fields
    "shape": None, "data_offsets": None, "zero_symbol": None,
    "alphabet_size": (1, MAX_ALPHABET), "run_limit": (0, MAX_RUN_LIMIT), "symbols": (0, 8 * huffman.MAX_PAYLOAD),
    "bits": (0, 8 * huffman.MAX_PAYLOAD), "block_size": (1, 1 << 16), "block_width": (0, 32),
    "block_base": (0, 8 * huffman.MAX_PAYLOAD), "crc32": (0, 2**32 - 1),
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
    zero_symbol : int or None
        The index of pruned weights; its runs may be coded as run-length symbols.

    Equality compares all fields, the indices by value (not dtype).
    """

    name: str
    shape: tuple[int, ...]
    alphabet_size: int
    indices: np.ndarray
    zero_symbol: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == _META:
            raise ConfigError(f"stream name {self.name!r} must be a non-empty string other than {_META!r}")
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if shape is None or not all(_is_int(d) and d >= 0 for d in shape):
            raise ConfigError(f"stream {self.name!r}: shape {self.shape!r} must be a tuple of non-negative ints")
        k = self.alphabet_size
        if not _is_int(k) or not 1 <= k <= MAX_ALPHABET:
            raise ConfigError(f"stream {self.name!r}: alphabet_size={k!r} must be an int in [1, {MAX_ALPHABET}]")
        z = self.zero_symbol
        if z is not None and not (_is_int(z) and 0 <= z < k):
            raise ConfigError(f"stream {self.name!r}: zero_symbol={z!r} must be None or an int in [0, {k})")
        shape, indices = tuple(int(d) for d in shape), np.asarray(self.indices).view()
        if indices.dtype.kind not in "iu" or indices.shape != shape:
            got = f"dtype {indices.dtype} shape {indices.shape}"
            raise ConfigError(f"stream {self.name!r}: indices must be an integer array of shape {shape}, got {got}")
        if indices.size and (indices.min() < 0 or indices.max() >= k):
            span = f"[{indices.min()}, {indices.max()}]"
            raise ConfigError(f"stream {self.name!r}: indices span {span}, outside [0, {k})")
        indices.flags.writeable = False
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "alphabet_size", int(k))
        object.__setattr__(self, "zero_symbol", None if z is None else int(z))
        object.__setattr__(self, "indices", indices)

    def __eq__(self, other):
        if not isinstance(other, IndexStream):
            return NotImplemented
        return (self.name, self.shape, self.alphabet_size, self.zero_symbol) == (
            other.name, other.shape, other.alphabet_size, other.zero_symbol
        ) and np.array_equal(self.indices, other.indices)


@dataclass(frozen=True)
class StreamLayout:
    """Where the bytes of one stream go; payload + table + header bytes of all streams = file size."""

    name: str
    count: int
    alphabet_size: int
    payload_bytes: int
    table_bytes: int  # code lengths and block index
    header_bytes: int  # this stream's JSON entry plus an equal share of the fixed overhead
    entropy_bits: float  # empirical (order-0) entropy of the indices, bits per weight
    coded_bits_per_weight: float  # (payload_bytes + table_bytes) * 8 / count
    run_limit: int = 0  # 0: plain coding; otherwise runs of zeros are joined with the next index


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
    return _PREFIX.pack(MAGIC, VERSION, zlib.crc32(text), len(text)) + text + b"".join(blobs)


def _dump(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _encode_stream(stream: IndexStream) -> tuple[dict, bytes]:
    flat = stream.indices.ravel().astype(np.int64)
    run_limit, symbols, lengths = _choose_coding(flat, stream.alphabet_size, stream.zero_symbol)
    payload, n_bits = huffman.encode(symbols, lengths)
    if len(payload) > huffman.MAX_PAYLOAD:
        raise ConfigError(f"stream {stream.name!r} needs {len(payload)} bytes, over {huffman.MAX_PAYLOAD}")
    block_size = _block_size(symbols.size)
    blocks = huffman.block_bits(symbols, lengths, block_size)[:-1]
    base = int(blocks.min()) if blocks.size else 0
    width = int(blocks.max() - base).bit_length() if blocks.size else 0
    table, _ = huffman.pack_bits(lengths, LENGTH_BITS)
    index, _ = huffman.pack_bits(blocks - base, width)
    entry = {
        "shape": list(stream.shape), "alphabet_size": stream.alphabet_size,
        "zero_symbol": stream.zero_symbol, "run_limit": run_limit, "symbols": int(symbols.size),
        "bits": n_bits, "block_size": block_size, "block_base": base, "block_width": width,
    }
    return entry, table + index + payload


def _block_size(n_symbols: int) -> int:
    """64+ blocks (decoding takes a numpy step per symbol of a block); ~8 index bits per block."""
    return min(BLOCK_SIZES[1], max(BLOCK_SIZES[0], 1 << max(0, -(-n_symbols // 64) - 1).bit_length()))


def _choose_coding(flat: np.ndarray, k: int, zero: int | None) -> tuple[int, np.ndarray, np.ndarray]:
    """``(run_limit, symbols, code lengths)`` of the smallest coding: plain, or runs with limit 2, 4, ..."""
    counts = np.bincount(flat, minlength=k)
    best = (_cost(counts), 0)
    if zero is not None and counts[zero]:
        keep = np.flatnonzero(flat != zero)
        levels = flat[keep]
        runs = np.diff(np.concatenate(([-1], keep, [flat.size]))) - 1  # zeros before each kept index; tail last
        limit, longest = 2, int(runs.max())
        while limit <= MAX_RUN_LIMIT and limit * k < MAX_CODED:
            best = min(best, (_cost(_run_counts(levels, runs, k, limit)), limit))
            if limit > longest:  # longer limits only grow the table
                break
            limit *= 2
    limit = best[1]
    if limit == 0:
        return 0, flat, _lengths(counts)
    return limit, _run_symbols(levels, runs, k, limit), _lengths(_run_counts(levels, runs, k, limit))


def _lengths(counts: np.ndarray) -> np.ndarray:
    used = int(np.count_nonzero(counts))
    return huffman.code_lengths(counts, max_length=max(16, (used - 1).bit_length()))


def _cost(counts: np.ndarray) -> int:
    """Payload plus code-length table bits of a histogram."""
    return int((_lengths(counts).astype(np.int64) * counts).sum()) + LENGTH_BITS * counts.size


def _run_counts(levels: np.ndarray, runs: np.ndarray, k: int, limit: int) -> np.ndarray:
    counts = np.bincount((runs[:-1] % limit) * k + levels, minlength=limit * k + 1)
    counts[limit * k] += int((runs // limit).sum())
    return counts


def _run_symbols(levels: np.ndarray, runs: np.ndarray, k: int, limit: int) -> np.ndarray:
    """Per kept index, ``runs // limit`` symbols 'limit zeros' then '(runs % limit) zeros, then the index'."""
    n_symbols = runs // limit
    n_symbols[:-1] += 1
    symbols = np.full(int(n_symbols.sum()), limit * k, dtype=np.int64)
    symbols[np.cumsum(n_symbols)[:-1] - 1] = (runs[:-1] % limit) * k + levels
    return symbols


# ---------------------------------------------------------------- decoding


def decode_sidecar(data: bytes) -> tuple[list[IndexStream], dict[str, str]]:
    """Streams (in file order, i.e. by name) and metadata of sidecar ``data``; SidecarError if invalid."""
    entries, metadata, buffer, _ = _parse(data)
    return [_decode_stream(name, entry, buffer) for name, entry in entries], metadata


def _parse(data: bytes):
    """Validated ``(entries, metadata, buffer, header length)``; entries sorted by offset."""
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise SidecarError(f"sidecar of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, crc, size = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SidecarError(f"not an onnxhq sidecar: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise SidecarError(f"sidecar format version {version} is not supported (this reader knows {VERSION})")
    if size > MAX_HEADER or _PREFIX.size + size > len(data):
        raise SidecarError(f"header length {size} exceeds {MAX_HEADER} or the {len(data)}-byte file")
    text = data[_PREFIX.size : _PREFIX.size + size]
    if zlib.crc32(text) != crc:
        raise SidecarError(f"header CRC32 mismatch: stored {crc:#010x}, computed {zlib.crc32(text):#010x}")
    try:
        header = json.loads(text.decode("ascii"))
    except (ValueError, RecursionError) as exc:
        raise SidecarError(f"header is not ASCII JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SidecarError(f"header must be a JSON object, got {type(header).__name__}")
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
    shape, offsets, zero, k = entry["shape"], entry["data_offsets"], entry["zero_symbol"], entry["alphabet_size"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape):
        raise SidecarError(f"stream {name!r}: shape={shape!r} must be a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SidecarError(f"stream {name!r}: data_offsets={offsets!r} must be [begin, end] with 0 <= begin <= end")
    if zero is not None and not (type(zero) is int and 0 <= zero < k):
        raise SidecarError(f"stream {name!r}: zero_symbol={zero!r} must be null or an int in [0, {k})")
    limit = entry["run_limit"]
    if limit and (zero is None or _table_size(entry) > MAX_CODED):
        need = f"a zero_symbol and alphabet_size * run_limit < {MAX_CODED}"
        raise SidecarError(f"stream {name!r}: run_limit={limit} needs {need}")
    count, symbols = math.prod(shape), entry["symbols"]
    if symbols > entry["bits"] or count >= (symbols + 1) * max(1, limit) or (not limit and count != symbols):
        raise SidecarError(f"stream {name!r}: {symbols} symbols in {entry['bits']} bits cannot hold {count} indices")
    if sum(_field_sizes(entry)) != offsets[1] - offsets[0]:
        need = sum(_field_sizes(entry))
        raise SidecarError(f"stream {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes, fields need {need}")
    return entry


def _table_size(entry: dict) -> int:
    """Number of coded symbols: the indices, or with runs ``alphabet_size * run_limit + 1``."""
    limit = entry["run_limit"]
    return entry["alphabet_size"] * limit + 1 if limit else entry["alphabet_size"]


def _field_sizes(entry: dict) -> tuple[int, int, int]:
    """Bytes of the code-length table, the block index and the payload of a stream."""
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    return (
        (LENGTH_BITS * _table_size(entry) + 7) // 8,
        (entry["block_width"] * max(n_blocks - 1, 0) + 7) // 8,
        (entry["bits"] + 7) // 8,
    )


def _decode_stream(name: str, entry: dict, buffer: bytes) -> IndexStream:
    k, limit, zero, bits = entry["alphabet_size"], entry["run_limit"], entry["zero_symbol"], entry["bits"]
    at = np.cumsum((entry["data_offsets"][0],) + _field_sizes(entry)).tolist()
    table, index, payload = (buffer[at[i] : at[i + 1]] for i in range(3))
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    try:
        lengths = huffman.unpack_bits(table, LENGTH_BITS, _table_size(entry))
        blocks = huffman.unpack_bits(index, entry["block_width"], max(n_blocks - 1, 0)) + entry["block_base"]
        blocks = np.append(blocks, bits - blocks.sum()) if n_blocks else blocks
        if blocks.size and blocks[-1] < 0:
            raise SidecarError(f"block index sums to more than the {bits} payload bits")
        if bits % 8 and payload[-1] & ((1 << (8 - bits % 8)) - 1):
            raise SidecarError("non-zero padding bits after the payload")
        symbols = huffman.decode(payload, lengths, entry["symbols"], block_size=entry["block_size"], block_bits=blocks)
    except SidecarError as exc:
        raise SidecarError(f"stream {name!r}: {exc}") from None
    dtype = np.uint8 if k <= 256 else np.uint16
    if limit:
        symbols = _expand_runs(name, symbols, k, limit, zero, math.prod(entry["shape"]), dtype)
    return IndexStream(name, tuple(entry["shape"]), k, symbols.astype(dtype, copy=False).reshape(entry["shape"]), zero)


def _expand_runs(name, symbols, k, limit, zero, count, dtype):
    """Indices from run symbols; the zeros after the last explicit one (fewer than ``limit``) are implied."""
    is_zrl = symbols == limit * k
    ends = np.cumsum(np.where(is_zrl, limit, symbols // k + 1))
    total = int(ends[-1]) if ends.size else 0
    if not 0 <= count - total < limit:
        raise SidecarError(f"stream {name!r}: run symbols cover {total} indices, shape needs {count}")
    out = np.full(count, zero, dtype=dtype)
    out[ends[~is_zrl] - 1] = symbols[~is_zrl] % k
    return out


def describe_sidecar(data: bytes) -> list[StreamLayout]:
    """Size accounting of every stream of sidecar ``data`` (decodes it to measure entropy)."""
    entries, _, buffer, size = _parse(data)
    shares = [len(_dump({name: entry})) - 1 for name, entry in entries]  # entry text and its comma
    fixed = _PREFIX.size + size - sum(shares)
    layouts = []
    for i, (name, entry) in enumerate(entries):
        stream = _decode_stream(name, entry, buffer)
        n_table, n_index, n_payload = _field_sizes(entry)
        count = int(stream.indices.size)
        header = shares[i] + fixed // len(entries) + (i < fixed % len(entries))
        layouts.append(StreamLayout(
            name=name, count=count, alphabet_size=stream.alphabet_size, payload_bytes=n_payload,
            table_bytes=n_table + n_index, header_bytes=header,
            entropy_bits=huffman.entropy_bits(np.bincount(stream.indices.ravel(), minlength=stream.alphabet_size)),
            coded_bits_per_weight=8 * (n_payload + n_table + n_index) / count if count else 0.0,
            run_limit=entry["run_limit"],
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
