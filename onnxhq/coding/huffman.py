"""Canonical, length-limited Huffman coding in pure numpy.

Code lengths come from package-merge (optimal under the length limit). Codes are canonical:
symbols sorted by ``(length, symbol)`` get consecutive code values, so the lengths alone define
the code. Bits are packed MSB-first, the last byte padded with zero bits.

A symbol may carry *extra bits* (``extra_widths[symbol]`` of them, written right after its code
word, as DEFLATE does for match lengths). :func:`block_bits` gives the bit length of each block of
symbols, which lets :mod:`.huffdecode` decode all blocks at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, SidecarError
from ..numeric import is_int
from .bitpack import CHUNK, BitWriter, histogram

_U64 = np.uint64(64)

MAX_LENGTH = 20
"""Longest code length supported: the decode table has ``2**max_length`` entries."""
MAX_PAYLOAD = 1 << 29
"""Largest payload of one stream in bytes (bit positions must fit in uint32)."""
MAX_EXTRA = 31
"""Most extra bits one symbol may carry (code + extra bits stay below 64, the decoder's length
field)."""


def _check_count(value, what: str, *, low: int = 0) -> None:
    if not is_int(value) or value < low:
        raise ConfigError(f"{what}={value!r} must be an int >= {low}")


def code_lengths(counts: np.ndarray, *, max_length: int = 16) -> np.ndarray:
    """Optimal prefix-code lengths no longer than ``max_length`` (package-merge).

    Parameters
    ----------
    counts : ndarray, shape (k,)
        Non-negative integer symbol counts.
    max_length : int
        Longest allowed code, 1..MAX_LENGTH; needs ``2**max_length >= number of used symbols``.

    Returns
    -------
    ndarray, shape (k,), uint8
        0 for symbols with count 0; a single used symbol gets length 1. Ties are broken by
        symbol index, so the result is deterministic.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or not (counts.dtype.kind in "iu" or counts.size == 0):
        raise ConfigError(
            f"counts must be a 1-D integer array, got shape {counts.shape} dtype {counts.dtype}"
        )
    if counts.size and counts.min() < 0:
        raise ConfigError(f"counts must be non-negative, got minimum {counts.min()}")
    if not is_int(max_length) or not 1 <= max_length <= MAX_LENGTH:
        raise ConfigError(f"max_length={max_length!r} must be an int in [1, {MAX_LENGTH}]")
    used = np.flatnonzero(counts)
    if used.size > 2**max_length:
        raise ConfigError(
            f"{used.size} used symbols need codes longer than max_length={max_length}; "
            "raise max_length"
        )
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used] = 1
    elif used.size > 1:
        order = used[np.argsort(counts[used], kind="stable")]  # ascending count, ties by symbol
        lengths[order] = _package_merge(counts[order].astype(np.int64), int(max_length))
    return lengths


def _package_merge(weights: np.ndarray, max_length: int) -> np.ndarray:
    """Lengths for ascending ``weights`` (n >= 2): each leaf's count among the 2n-2 cheapest
    items."""
    n = weights.size
    levels = []  # is-leaf flags of the merged list at depths max_length-1 .. 1
    items = weights
    for _ in range(max_length - 1):
        half = items.size // 2
        packages = items[0 : 2 * half : 2] + items[1 : 2 * half : 2]
        at = np.searchsorted(weights, packages, side="right") + np.arange(
            half
        )  # leaves first on ties
        is_leaf = np.ones(n + half, dtype=bool)
        is_leaf[at] = False
        items = np.empty(n + half, dtype=np.int64)
        items[at] = packages
        items[is_leaf] = weights
        levels.append(is_leaf)
    lengths = np.zeros(n, dtype=np.uint8)
    take = 2 * n - 2
    for is_leaf in reversed(levels):
        leaves = int(np.count_nonzero(is_leaf[:take]))  # the cheapest `leaves` leaves, in order
        lengths[:leaves] += 1
        take = 2 * (take - leaves)  # each package chosen here takes two items one level deeper
    lengths[:take] += 1
    return lengths


def _check_lengths(lengths) -> np.ndarray:
    """Lengths as int64, or SidecarError when they cannot describe a prefix code."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise SidecarError(
            "code lengths must be a 1-D integer array, "
            f"got shape {lengths.shape} dtype {lengths.dtype}"
        )
    lengths = lengths.astype(np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_LENGTH):
        raise SidecarError(
            f"code lengths must lie in [0, {MAX_LENGTH}], got [{lengths.min()}, {lengths.max()}]"
        )
    used = lengths[lengths > 0]
    if used.size and int((1 << (MAX_LENGTH - used)).sum()) > 1 << MAX_LENGTH:
        raise SidecarError(
            "code lengths violate the Kraft inequality (over-subscribed prefix code)"
        )
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Canonical code values; also the symbols in code order and the longest length."""
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    top = int(lengths.max()) if lengths.size else 0
    span = np.left_shift(1, top - lengths[order])  # table entries each code covers
    first = np.concatenate(([0], np.cumsum(span)[:-1]))
    codes = np.zeros(lengths.size, dtype=np.int64)
    codes[order] = first >> (top - lengths[order])
    return codes, order, top


def pack_bits(values: npt.ArrayLike, widths: npt.ArrayLike) -> tuple[bytes, int]:
    """Concatenate ``values[i]`` written in ``widths[i]`` bits (<= 32), MSB-first, zero-padded.

    Works through the values in chunks (`bitpack.BitWriter`), so the temporaries stay a few MB
    however long the stream.
    """
    values = np.asarray(values, dtype=np.int64).ravel()
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
    if values.size and (
        widths.min() < 0 or widths.max() > 32 or values.min() < 0 or np.any(values >> widths)
    ):
        raise ConfigError("pack_bits needs widths in [0, 32] and 0 <= values < 2**widths")
    writer = BitWriter(int(widths.sum()))
    for begin in range(0, values.size, CHUNK):
        w = widths[begin : begin + CHUNK].astype(np.uint64)
        writer.write(values[begin : begin + CHUNK].astype(np.uint64) << (_U64 - w), w)
    return writer.payload(), writer.n_bits


def read_bits(data: bytes, positions: npt.ArrayLike, widths: npt.ArrayLike) -> np.ndarray:
    """The ``widths[i]``-bit (0..32) MSB-first value from bit ``positions[i]`` of ``data``; int64.

    Bits past the end of ``data`` read as zero; callers check lengths themselves.
    """
    positions = np.asarray(positions, dtype=np.int64)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), positions.shape)
    out = np.zeros(positions.size, dtype=np.int64)
    wide = np.flatnonzero(widths)  # zero-width fields (most extra-bit fields) need no reading
    if wide.size == 0:
        return out
    pos = positions[wide]
    buf = np.frombuffer(data, dtype=np.uint8)  # no copy: data may be a whole file
    if buf.size == 0:
        return out
    at = pos >> 3
    word = np.zeros(pos.size, dtype=np.uint64)
    for k in range(5):  # 40 bits cover any 32-bit field at any bit offset; zeros past the end
        byte = buf.take(at + k, mode="clip").astype(np.uint64)
        byte[at + k >= buf.size] = 0
        word = (word << np.uint64(8)) | byte
    word = (word << (pos & 7).astype(np.uint64)) & np.uint64((1 << 40) - 1)
    out[wide] = (word >> (np.uint64(40) - widths[wide].astype(np.uint64))).astype(np.int64)
    return out


def encode(
    symbols: np.ndarray,
    lengths: np.ndarray,
    extra: np.ndarray | None = None,
    extra_widths: np.ndarray | None = None,
) -> tuple[bytes, int]:
    """Canonical Huffman code of ``symbols``, MSB-first; returns ``(payload, n_bits)``.

    Parameters
    ----------
    symbols : ndarray, shape (n,)
        Integer symbols, each with a non-zero code length.
    lengths : ndarray, shape (k,)
        Code lengths, e.g. from :func:`code_lengths`.
    extra, extra_widths : ndarray, shapes (n,) and (k,), optional
        Each symbol's code word is followed by ``extra[i]`` in ``extra_widths[symbols[i]]`` bits.
    """
    try:
        lengths = _check_lengths(lengths)
    except SidecarError as exc:
        raise ConfigError(str(exc)) from None
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        return b"", 0
    if symbols.dtype.kind not in "iu":
        raise ConfigError(f"symbols must be integers, got dtype {symbols.dtype}")
    if symbols.min() < 0 or symbols.max() >= lengths.size:
        raise ConfigError(
            f"symbols must lie in [0, {lengths.size}) and have a non-zero code length"
        )
    counts = histogram(symbols, lengths.size)
    if counts[lengths == 0].any():
        raise ConfigError(
            f"symbols must lie in [0, {lengths.size}) and have a non-zero code length"
        )
    if extra_widths is None:
        payload, _ = encode_counted(symbols, counts, lengths, 0)
        return payload, int(np.dot(counts, lengths))
    widths = _check_extra_widths(extra_widths, lengths.size, ConfigError)
    extra = np.asarray(extra, dtype=np.int64).ravel()
    chunks = ((symbols[b : b + CHUNK], extra[b : b + CHUNK]) for b in range(0, symbols.size, CHUNK))
    n_bits = int(np.dot(counts, lengths + widths))
    payload, _ = encode_chunks(chunks, lengths, widths, n_bits, 0)
    return payload, n_bits


def encode_counted(
    symbols: np.ndarray, counts: np.ndarray, lengths: np.ndarray, block_size: int
) -> tuple[bytes, np.ndarray]:
    """The payload of ``symbols`` (valid, ``counts`` their histogram, ``lengths`` a valid code of
    it), and the bit length of each block of ``block_size`` symbols (none when 0).

    Symbols below 256 of a uint8 array go two at a time (a pair is one field, found by viewing
    the bytes as uint16 in a table of 65536), which halves the work per symbol.
    """
    n_bits = int(np.dot(counts, lengths))
    aligned, widths = _fields(lengths)
    pairs = symbols.dtype == np.uint8 and symbols.flags.c_contiguous and block_size % 2 == 0
    if not pairs:
        chunks = ((symbols[b : b + CHUNK], None) for b in range(0, symbols.size, CHUNK))
        return encode_chunks(chunks, lengths, np.zeros(lengths.size, np.int64), n_bits, block_size)
    table = np.zeros(256, np.uint64)
    table[: aligned.size] = aligned[:256]
    width = np.zeros(256, np.uint8)
    width[: widths.size] = widths[:256]
    first, second = np.divmod(np.arange(1 << 16), 256)[::-1]  # little-endian: first in the low byte
    pair_table = table[first] | (table[second] >> width[first].astype(np.uint64))
    pair_width = width[first] + width[second]
    writer = BitWriter(n_bits, block_size // 2)
    even = symbols.size - symbols.size % 2
    for begin in range(0, even, 2 * CHUNK):
        two = symbols[begin : min(begin + 2 * CHUNK, even)].view("<u2")
        writer.write(pair_table.take(two), pair_width.take(two))
    blocks = writer.block_bits()
    if even < symbols.size:  # the odd last symbol: a block of its own when blocks are even
        writer.write(aligned[symbols[even:]], widths[symbols[even:]])
        if block_size:
            blocks = _append_bits(blocks, int(widths[symbols[-1]]), symbols.size, block_size)
    return writer.payload(), blocks


def _append_bits(blocks: np.ndarray, bits: int, count: int, block_size: int) -> np.ndarray:
    """``blocks`` of ``count - 1`` symbols with one more symbol of ``bits`` bits at the end."""
    if (count - 1) % block_size == 0:
        return np.append(blocks, bits)
    blocks = blocks.copy()
    blocks[-1] += bits
    return blocks


def encode_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
    lengths: np.ndarray,
    extra_widths: np.ndarray,
    n_bits: int,
    block_size: int,
) -> tuple[bytes, np.ndarray]:
    """The payload of the ``(symbols, extra or None)`` chunks (valid, ``n_bits`` in all), and the
    bit length of every block of ``block_size`` symbols (none when 0)."""
    aligned, widths = _fields(lengths, extra_widths)
    writer = BitWriter(n_bits, block_size)
    for symbols, extra in chunks:
        for begin in range(0, symbols.size, CHUNK):
            part = symbols[begin : begin + CHUNK]
            a, w = aligned.take(part), widths.take(part)
            if extra is not None:
                e = extra[begin : begin + CHUNK].astype(np.uint64)  # a copy, shifted in place
                a |= np.left_shift(e, _U64 - w, out=e)
            writer.write(a, w)
    return writer.payload(), writer.block_bits()


def _fields(lengths: np.ndarray, extra_widths: np.ndarray | None = None):
    """Per symbol: its code word at the top of 64 bits (uint64), and its bits with the extra
    bits (uint8)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes, _, _ = _canonical(lengths)
    aligned = codes.astype(np.uint64) << (_U64 - lengths.astype(np.uint64))
    aligned[lengths == 0] = 0
    widths = lengths if extra_widths is None else lengths + extra_widths
    return aligned, widths.astype(np.uint8)


def _check_extra_widths(extra_widths, size: int, error) -> np.ndarray:
    widths = np.asarray(extra_widths)
    fits = widths.shape == (size,) and widths.dtype.kind in "iu"
    if not fits or (size and not 0 <= widths.min() <= widths.max() <= MAX_EXTRA):
        raise error(f"extra_widths must be {size} integers in [0, {MAX_EXTRA}]")
    return widths.astype(np.int64)


def block_bits(
    symbols: np.ndarray,
    lengths: np.ndarray,
    block_size: int,
    extra_widths: np.ndarray | None = None,
) -> np.ndarray:
    """Bit length (code words and extra bits) of each block of ``block_size`` symbols."""
    per_symbol = np.asarray(lengths, dtype=np.int64)
    if extra_widths is not None:
        per_symbol = per_symbol + np.asarray(extra_widths, dtype=np.int64)
    symbols = np.asarray(symbols).ravel()
    step = block_size * -(-CHUNK // block_size)
    parts = []
    for begin in range(0, symbols.size, step):
        bits = per_symbol.take(symbols[begin : begin + step])
        parts.append(np.add.reduceat(bits, np.arange(0, bits.size, block_size)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
