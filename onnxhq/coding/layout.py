"""How one stream of indices is coded: its header entry, its bytes, and where those bytes go.

A stream's bytes are three zero-padded, MSB-first bit fields: the code table (which symbols have a
code, as a bit per group of `GROUP` symbols and a `GROUP`-bit mask per marked group, then their
lengths minus 1), the ``block_width``-bit values ``bits(block) - block_base`` for every
``block_size``-symbol block but the last, and the canonical Huffman payload of ``bits`` bits (see
`huffman` and `huffdecode`). The header entry (`FIELDS`) says how long each field is.

With ``run_symbol`` null the symbols are the indices in C order. Otherwise the writer joins each
run of ``run_symbol`` (usually the most frequent index: the zero of pruned weights, or the zero
cell of a coarse uniform grid) to the index after it, JPEG-style: with k = ``alphabet_size``,
symbol ``c * (k + 1) + i`` is a run of class c followed by index i, or for i = k by the end of the
stream. Class 0 is no run; class c >= 1 is a run of ``2**(c-1) + e`` copies, e being the c - 1
extra bits after the code word. So a long run costs one symbol and about twice its log2 in bits,
and a stream of one repeated index costs a few bits in all. `unpack` reads all this back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, SidecarError
from ..numeric import entropy_bits
from . import bitpack, huffman, runs

MAX_ALPHABET = 1 << 16
MAX_CODED = 1 << 17  # most symbols one Huffman code may have: code lengths stay <= 17
MAX_COUNT = 1 << 31  # most indices in one stream (bounds what a small file can expand to)
MAX_RUN_CLASSES = 33  # class 32 holds runs up to 2**32 - 1
BLOCK_SIZES = (32, 256)  # symbols per decode block; see `block_size`
GROUP = 8  # code-table symbols per presence group
MAX_TABLE_BITS = MAX_CODED // GROUP + MAX_CODED + 5 * MAX_CODED
#: Longest code the writer makes (more only past 4096 coded symbols): the decoder's lookup table
#: has 2**longest entries per stream, and the limit costs ~0.03 % in size against 16.
MAX_WRITTEN_LENGTH = 12
_MAX_BITS = 8 * huffman.MAX_PAYLOAD
#: The coding fields of a stream's header entry -> (lowest, highest) for the integer ones.
FIELDS: dict[str, tuple[int, int] | None] = {
    "shape": None,
    "run_symbol": None,
    "alphabet_size": (1, MAX_ALPHABET),
    "run_classes": (0, MAX_RUN_CLASSES),
    "table_bits": (0, MAX_TABLE_BITS),
    "symbols": (0, _MAX_BITS),
    "bits": (0, _MAX_BITS),
    "block_size": (1, 1 << 16),
    "block_width": (0, 32),
    "block_base": (0, _MAX_BITS),
}

Entry = dict[str, Any]
"""A stream's header entry: the `FIELDS`, and the container's ``data_offsets`` and ``crc32``."""


@dataclass(frozen=True)
class StreamLayout:
    """Where the bytes of one stream go; payload + table + header bytes of all streams = file
    size."""

    name: str
    count: int
    alphabet_size: int
    payload_bytes: int  # code words and the runs' extra bits
    table_bytes: int  # code table and block index
    header_bytes: int  # this stream's share of the prefix and the compressed header
    entropy_bits: float  # empirical (order-0) entropy of the indices, bits per weight
    coded_bits_per_weight: float  # (payload_bytes + table_bytes) * 8 / count
    run_symbol: int | None = None  # None: plain coding; otherwise the index whose runs are joined


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Coding:
    """One way to code a stream: its run symbol, and the histogram and code of its symbols."""

    run_symbol: int | None
    run_classes: int
    counts: np.ndarray  # (table size,) int64 symbol counts
    extra_widths: np.ndarray  # (table size,) int64
    lengths: np.ndarray  # (table size,) uint8 code lengths

    @property
    def n_symbols(self) -> int:
        return int(self.counts.sum())

    @property
    def payload_bits(self) -> int:
        """Code words and extra bits."""
        return int(np.dot(self.counts, self.lengths.astype(np.int64) + self.extra_widths))

    @property
    def bits(self) -> int:
        """Payload plus code-table bits."""
        return self.payload_bits + pack_table(self.lengths)[1]


def encode_stream(name: str, indices: np.ndarray, alphabet_size: int) -> tuple[Entry, bytes]:
    """The header entry (the `FIELDS`) and the bytes of one stream.

    Parameters
    ----------
    name : str
        The stream's name, for messages.
    indices : ndarray of int, any shape
        Indices in [0, alphabet_size), coded in C order (valid, as `sidecar.IndexStream` checks).
    alphabet_size : int
        k, 1..`MAX_ALPHABET`.

    Memory: besides the result, a few MB of chunk temporaries (`bitpack`); the indices are read
    in their own dtype, never widened as a whole.
    """
    compact = np.uint8 if alphabet_size <= 256 else np.uint16
    flat = indices.reshape(-1)
    if flat.dtype not in (np.uint8, np.uint16):
        flat = flat.astype(compact)  # valid indices fit; uint8 ones are coded two at a time
    coding = _choose_coding(flat, alphabet_size)
    n_bits = coding.payload_bits
    if (n_bits + 7) // 8 > huffman.MAX_PAYLOAD:
        raise ConfigError(
            f"stream {name!r} needs {(n_bits + 7) // 8} bytes, over the {huffman.MAX_PAYLOAD} "
            "one stream holds; split the tensor"
        )
    size = block_size(coding.n_symbols)
    if coding.run_symbol is None:
        payload, blocks = huffman.encode_counted(flat, coding.counts, coding.lengths, size)
    else:
        chunks = runs.run_symbols(flat, alphabet_size, coding.run_symbol, bitpack.CHUNK)
        payload, blocks = huffman.encode_chunks(
            chunks, coding.lengths, coding.extra_widths, n_bits, size
        )
    blocks = blocks[:-1]
    base = int(blocks.min()) if blocks.size else 0
    width = int(blocks.max() - base).bit_length() if blocks.size else 0
    table, table_bits = pack_table(coding.lengths)
    index, _ = huffman.pack_bits(blocks - base, width)
    entry = {
        "shape": [int(d) for d in indices.shape],
        "alphabet_size": int(alphabet_size),
        "run_symbol": coding.run_symbol,
        "run_classes": coding.run_classes,
        "table_bits": table_bits,
        "symbols": coding.n_symbols,
        "bits": n_bits,
        "block_size": size,
        "block_base": base,
        "block_width": width,
    }
    return entry, b"".join((table, index, payload))


def length_bits(table_size: int) -> int:
    """Bits per stored code length: lengths are at most 16 while the table has <= 65536 symbols."""
    return 4 if table_size <= 1 << 16 else 5


def pack_table(lengths: np.ndarray) -> tuple[bytes, int]:
    """The code-table field of ``lengths`` (table size,) and its bit count: presence bits per
    group, group masks, lengths - 1."""
    pad = np.zeros(-lengths.size % GROUP, dtype=bool)
    has_code = np.concatenate([lengths > 0, pad]).reshape(-1, GROUP)
    marked = has_code.any(axis=1)
    coded = lengths[lengths > 0].astype(np.int64) - 1
    values = np.concatenate([marked, has_code[marked].ravel(), coded])
    widths = np.concatenate(
        [
            np.ones(marked.size + GROUP * int(marked.sum()), np.int64),
            np.full(coded.size, length_bits(lengths.size)),
        ]
    )
    return huffman.pack_bits(values, widths)


def block_size(n_symbols: int) -> int:
    """64+ blocks (decoding takes a numpy step per symbol of a block); ~8 index bits per block."""
    blocks = 1 << max(0, -(-n_symbols // 64) - 1).bit_length()
    return min(BLOCK_SIZES[1], max(BLOCK_SIZES[0], blocks))


def _choose_coding(flat: np.ndarray, k: int) -> _Coding:
    """The smaller of plain coding and run coding of the most frequent index."""
    counts = bitpack.histogram(flat, k)
    plain = _Coding(None, 0, counts, np.zeros(k, np.int64), _lengths(counts))
    if flat.size == 0:
        return plain
    run_symbol = int(np.argmax(counts))
    run_counts = runs.run_counts(flat, k, run_symbol, counts, MAX_CODED)
    if run_counts is None:
        return plain
    n_classes = run_counts.size // (k + 1)
    widths = class_extra_widths(n_classes, k)
    coded = _Coding(run_symbol, n_classes, run_counts, widths, _lengths(run_counts))
    return coded if coded.bits < plain.bits else plain


def _lengths(counts: np.ndarray) -> np.ndarray:
    used = int(np.count_nonzero(counts))
    longest = max(MAX_WRITTEN_LENGTH, (used - 1).bit_length())
    return huffman.code_lengths(counts, max_length=longest)


# ---------------------------------------------------------------- facts of an entry


def table_size(entry: Entry) -> int:
    """Number of symbols of the alphabet: the indices, or ``run_classes * (alphabet_size + 1)``."""
    classes, k = entry["run_classes"], entry["alphabet_size"]
    return classes * (k + 1) if classes else k


def extra_widths(entry: Entry) -> np.ndarray:
    """Extra bits after each run symbol's code word: ``max(class - 1, 0)``; shape (table size,)."""
    return class_extra_widths(entry["run_classes"], entry["alphabet_size"])


@functools.lru_cache(maxsize=256)
def class_extra_widths(n_classes: int, k: int) -> np.ndarray:
    """Read-only: the same array serves every stream with this alphabet."""
    widths = np.repeat(np.maximum(np.arange(n_classes, dtype=np.int64) - 1, 0), k + 1)
    widths.flags.writeable = False
    return widths


def field_sizes(entry: Entry) -> tuple[int, int, int]:
    """Bytes of the code table, the block index and the payload of a stream."""
    n_blocks = -(-entry["symbols"] // entry["block_size"])
    return (
        (entry["table_bits"] + 7) // 8,
        (entry["block_width"] * max(n_blocks - 1, 0) + 7) // 8,
        (entry["bits"] + 7) // 8,
    )


def check_fields(name: str, entry: Entry) -> None:
    """SidecarError unless the `FIELDS` of ``entry`` (a dict that has them all) are of the right
    types, in range and consistent with each other."""
    for key, bounds in FIELDS.items():
        value = entry[key]
        if bounds is not None and not (type(value) is int and bounds[0] <= value <= bounds[1]):
            raise SidecarError(
                f"stream {name!r}: {key}={value!r} must be an int in [{bounds[0]}, {bounds[1]}]"
            )
    shape, k = entry["shape"], entry["alphabet_size"]
    if not (
        isinstance(shape, list)
        and len(shape) <= 64
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise SidecarError(f"stream {name!r}: shape={shape!r} must be a list of non-negative ints")
    run, classes = entry["run_symbol"], entry["run_classes"]
    if run is not None and not (type(run) is int and 0 <= run < k):
        raise SidecarError(
            f"stream {name!r}: run_symbol={run!r} must be null or an int in [0, {k})"
        )
    size = table_size(entry)
    if (run is None) != (classes == 0) or size > MAX_CODED:
        need = (
            "run_classes = 0 without a run_symbol, else >= 1 with "
            f"alphabet_size * run_classes < {MAX_CODED}"
        )
        raise SidecarError(f"stream {name!r}: run_classes={classes} does not fit: {need}")
    if entry["table_bits"] < -(-size // GROUP):
        need = f"the {-(-size // GROUP)} presence bits of {size} symbols"
        raise SidecarError(f"stream {name!r}: table_bits={entry['table_bits']} is less than {need}")
    count, symbols = math.prod(shape), entry["symbols"]
    most = symbols if not classes else symbols << max(classes - 1, 0)  # indices symbols can cover
    if count > MAX_COUNT or symbols > count or count > most or (not classes and count != symbols):
        raise SidecarError(
            f"stream {name!r}: {symbols} symbols cannot hold the {count} indices of shape {shape}"
        )
    if symbols > entry["bits"]:  # every code word has a bit: bounds decoding work by file size
        raise SidecarError(f"stream {name!r}: {symbols} symbols cannot fit in {entry['bits']} bits")


# ---------------------------------------------------------------- accounting


def describe(name: str, entry: Entry, indices: np.ndarray, header_bytes: int) -> StreamLayout:
    """The size accounting of one stream: ``indices`` (its decoded indices, of any integer dtype)
    coded as ``entry`` says, with ``header_bytes`` its share of the file's prefix and header."""
    n_table, n_index, n_payload = field_sizes(entry)
    count, k = int(indices.size), int(entry["alphabet_size"])
    counts = bitpack.histogram(indices, k)
    return StreamLayout(
        name=name,
        count=count,
        alphabet_size=k,
        payload_bytes=n_payload,
        table_bytes=n_table + n_index,
        header_bytes=int(header_bytes),
        entropy_bits=entropy_bits(counts) + 0.0,  # + 0.0 turns -0.0 into 0.0
        coded_bits_per_weight=8 * (n_payload + n_table + n_index) / count if count else 0.0,
        run_symbol=entry["run_symbol"],
    )
