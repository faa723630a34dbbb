"""Decoding of canonical Huffman streams (the inverse of :func:`.huffman.encode`), many at once.

Decoding is sequential by nature (where a code word starts depends on all earlier ones), so it is
vectorised across *blocks*: the symbols are cut into blocks of ``block_size`` symbols, and given
the bit length of every block, all blocks are decoded at once, one symbol per block per step,
with a ``2**max(lengths)`` lookup table (see `kernels`). The sidecar stores the block bit lengths
for this; without them the block starts are found by pointer doubling, slower but vectorised.

Several streams decode *together*: their blocks share the lock-step loop, and their checks, tables
and extra bits are computed on the streams laid end to end, so a file of 64 small tensors costs a
fixed number of numpy calls, not 64 times that. A symbol may carry extra bits (see
:func:`.huffman.encode`): the table advances over code and extra bits in one step, and the extra
values are read afterwards, all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SidecarError
from .huffman import MAX_EXTRA, MAX_LENGTH, MAX_PAYLOAD, _check_count, read_bits
from .kernels import (
    LEN_BITS,
    LEN_MASK,
    decode_blocks,
    decode_table,
    decode_tables,
    find_block_starts,
    windows,
)

FALLBACK_BLOCK = 64
"""Symbols per block when no block index is given."""

#: Most payload bytes, table entries and symbols one lock-step group takes: bit positions stay below
#: 2**31, ``(symbol << LEN_BITS) | advance`` fits in uint32, and the tables in 64 MiB.
_GROUP_BYTES = 1 << 28
_GROUP_SYMBOLS = 1 << (31 - LEN_BITS)
_GROUP_TABLE = 1 << 24


@dataclass(frozen=True)
class Coded:
    """One coded stream to decode: the arguments of :func:`decode`."""

    payload: bytes
    lengths: np.ndarray
    count: int
    block_size: int = FALLBACK_BLOCK
    block_bits: np.ndarray | None = None
    extra_widths: np.ndarray | None = None


@dataclass(frozen=True)
class Joined:
    """Decoded streams laid end to end: ``symbols[count_base[i]:count_base[i + 1]]`` are stream i's.

    Stream i's symbol s appears as ``s + symbol_base[i]`` (``symbol_base`` sums the code-length
    table sizes of the streams before it), so one lookup table indexed by ``symbols`` holds a
    per-symbol fact of every stream. ``extra[j]`` is the extra value of ``symbols[extra_at[j]]``;
    symbols that carry no extra bits are left out.
    """

    symbols: np.ndarray  # (total,) intp
    symbol_base: np.ndarray  # (n + 1,) int64
    count_base: np.ndarray  # (n + 1,) int64
    extra_at: np.ndarray  # (m,) int64, increasing
    extra: np.ndarray  # (m,) int64


def decode(
    payload: bytes,
    lengths: np.ndarray,
    count: int,
    *,
    block_size: int = FALLBACK_BLOCK,
    block_bits: np.ndarray | None = None,
    extra_widths: np.ndarray | None = None,
):
    """Inverse of :func:`.huffman.encode`: ``count`` symbols as an int32 array of shape (count,).

    ``block_bits`` (shape ``(ceil(count / block_size),)``), when given, must be the bit length of
    each block of ``block_size`` symbols (see :func:`.huffman.block_bits`); it makes decoding
    several times faster. With ``extra_widths`` (as given to ``encode``) the result is
    ``(symbols, extra)``, both of shape (count,). Raises SidecarError when the payload is too
    short, holds an unused code, or disagrees with ``block_bits``.
    """
    return decode_many([Coded(payload, lengths, count, block_size, block_bits, extra_widths)])[0]


def decode_many(streams: list[Coded], names: list[str] | None = None) -> list:
    """:func:`decode` of several streams at once (see :func:`decode_joined`); a result each."""
    joined = decode_joined(streams, names)
    results = []
    for i, coded in enumerate(streams):
        begin, end = int(joined.count_base[i]), int(joined.count_base[i + 1])
        symbols = (joined.symbols[begin:end] - joined.symbol_base[i]).astype(np.int32)
        if coded.extra_widths is None:
            results.append(symbols)
            continue
        extra = np.zeros(end - begin, dtype=np.int64)
        lo, hi = np.searchsorted(joined.extra_at, [begin, end])
        extra[joined.extra_at[lo:hi] - begin] = joined.extra[lo:hi]
        results.append((symbols, extra))
    return results


def decode_joined(streams: list[Coded], names: list[str] | None = None) -> Joined:
    """Decode several streams together; SidecarError messages name the stream if ``names`` given.

    Small streams cost a numpy step per symbol of a block like large ones, and each stream's checks
    and bookkeeping cost fixed numpy calls, so decoding the 64 streams of a ResNet one by one spends
    most of its time in overhead; here the loop, the checks and the extra bits are shared.
    """
    code = _Code(streams, names)
    parts = [_decode_group(code, a, b) for a, b in code.groups()]
    if len(parts) == 1:
        symbols, extra_at, extra = parts[0]
    elif parts:
        symbols, extra_at, extra = (np.concatenate(p) for p in zip(*parts))
    else:
        symbols, extra_at, extra = (
            np.zeros(0, np.intp),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    return Joined(symbols, code.symbol_base, code.count_base, extra_at, extra)


def _buffer(payload) -> bytes | memoryview:
    """``payload`` as bytes or a memoryview, without copying it."""
    return payload if isinstance(payload, bytes) else memoryview(payload)


def _named(message: str, names, i: int) -> SidecarError:
    return SidecarError(f"stream {names[i]!r}: {message}" if names else message)


class _Code:
    """The streams' arguments, checked and laid end to end: code lengths, extra widths, block
    starts."""

    def __init__(self, streams: list[Coded], names):
        self.n, self.names = len(streams), names
        lengths = [self._lengths(c.lengths, i) for i, c in enumerate(streams)]
        self.sizes = [a.size for a in lengths]
        self.symbol_base = np.cumsum([0] + self.sizes, dtype=np.int64)
        self.stream_of_symbol = np.repeat(np.arange(self.n), self.sizes)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._check_lengths()
        self.widths = self._widths(streams)
        self.counts, self.block_sizes = [], []
        for c in streams:
            _check_count(c.count, "count")
            _check_count(c.block_size, "block_size", low=1)
            self.counts.append(int(c.count))
            self.block_sizes.append(int(c.block_size))
        self.count_base = np.cumsum([0] + self.counts, dtype=np.int64)
        # bytes or memoryviews, never copied: a sidecar's payloads are slices of its buffer
        self.payloads = [_buffer(c.payload) for c in streams]
        for i, payload in enumerate(self.payloads):
            if len(payload) > MAX_PAYLOAD:
                self.fail(
                    i,
                    f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit "
                    "of one stream",
                )
        coded = np.bincount(self.stream_of_symbol, weights=self.lengths > 0, minlength=self.n)
        for i in np.flatnonzero((coded == 0) & (np.array(self.counts) > 0))[:1]:
            self.fail(int(i), f"{self.counts[i]} symbols to decode but no symbol has a code length")
        self.top = np.zeros(self.n, dtype=np.int64)
        np.maximum.at(self.top, self.stream_of_symbol, self.lengths)
        self.top = self.top.tolist()
        self.starts, self.n_bits, self.exact = self._block_starts(streams)

    def fail(self, i: int, message: str):
        raise _named(message, self.names, i)

    def groups(self):
        """Runs ``[a, b)`` of consecutive streams whose payloads, symbols and tables fit a loop."""
        limits, first, total = (_GROUP_BYTES, _GROUP_SYMBOLS, _GROUP_TABLE), 0, (0, 0, 0)
        for i in range(self.n):
            need = (len(self.payloads[i]), self.sizes[i], 1 << self.top[i])
            total = tuple(t + x for t, x in zip(total, need))
            if i > first and any(t > limit for t, limit in zip(total, limits)):
                yield first, i
                first, total = i, need
        if self.n:
            yield first, self.n

    def _lengths(self, lengths, i: int) -> np.ndarray:
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
            got = f"shape {lengths.shape} dtype {lengths.dtype}"
            self.fail(i, f"code lengths must be a 1-D integer array, got {got}")
        if lengths.size > _GROUP_SYMBOLS:
            self.fail(
                i, f"{lengths.size} code lengths exceed the {_GROUP_SYMBOLS} one stream may have"
            )
        return lengths.astype(np.int64)

    def _check_lengths(self) -> None:
        lengths, of = self.lengths, self.stream_of_symbol
        bad = (lengths < 0) | (lengths > MAX_LENGTH)
        if bad.any():
            i = int(of[np.argmax(bad)])
            mine = lengths[of == i]
            self.fail(
                i, f"code lengths must lie in [0, {MAX_LENGTH}], got [{mine.min()}, {mine.max()}]"
            )
        # Kraft sums in float64: exact, terms <= 2**20 and fewer than 2**25 of them
        used = lengths > 0
        kraft = np.bincount(
            of[used], weights=np.ldexp(1.0, MAX_LENGTH - lengths[used]), minlength=self.n
        )
        for i in np.flatnonzero(kraft > 2.0**MAX_LENGTH)[:1]:
            self.fail(
                int(i), "code lengths violate the Kraft inequality (over-subscribed prefix code)"
            )

    def _widths(self, streams) -> np.ndarray:
        parts = []
        for i, c in enumerate(streams):
            if c.extra_widths is None:
                parts.append(np.zeros(self.sizes[i], np.int64))
                continue
            widths = np.asarray(c.extra_widths)
            if widths.shape != (self.sizes[i],) or widths.dtype.kind not in "iu":
                self.fail(i, f"extra_widths must be {self.sizes[i]} integers in [0, {MAX_EXTRA}]")
            parts.append(widths.astype(np.int64))
        widths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        bad = (widths < 0) | (widths > MAX_EXTRA)
        if bad.any():
            i = int(self.stream_of_symbol[np.argmax(bad)])
            self.fail(i, f"extra_widths must be {self.sizes[i]} integers in [0, {MAX_EXTRA}]")
        return widths

    def _block_starts(self, streams):
        """Per stream: block starts (bits from its payload's start), bits the blocks take, and
        whether they must end exactly there (a block index was given)."""
        n_blocks = [-(-c // b) for c, b in zip(self.counts, self.block_sizes)]
        given = [i for i, c in enumerate(streams) if c.block_bits is not None]
        parts = []
        for i in given:
            bits = np.asarray(streams[i].block_bits)
            if bits.shape != (n_blocks[i],) or bits.dtype.kind not in "iuf":
                self.fail(
                    i,
                    f"block_bits must be {n_blocks[i]} non-negative bit counts, "
                    f"got shape {bits.shape}",
                )
            parts.append(bits.astype(np.int64))
        bits = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        of = np.repeat(given, [n_blocks[i] for i in given]).astype(np.int64)
        if bits.size and bits.min() < 0:
            i = int(of[np.argmax(bits < 0)])
            self.fail(
                i,
                f"block_bits must be {n_blocks[i]} non-negative bit counts, "
                f"got shape {(n_blocks[i],)}",
            )
        ends = np.cumsum(bits)
        base = np.concatenate(([0], np.cumsum([n_blocks[i] for i in given]))).astype(np.int64)
        before = np.concatenate(([0], ends))[base]  # bits of the earlier streams' blocks
        starts: list[np.ndarray | None] = [None] * self.n
        n_bits = [8 * len(p) for p in self.payloads]
        exact = [False] * self.n
        for j, i in enumerate(given):
            n_bits[i], exact[i] = int(before[j + 1] - before[j]), True
            if n_bits[i] > 8 * len(self.payloads[i]):
                self.fail(
                    i,
                    f"payload of {len(self.payloads[i])} bytes is shorter than its "
                    f"{n_bits[i]} coded bits",
                )
            starts[i] = ends[base[j] : base[j + 1]] - bits[base[j] : base[j + 1]] - before[j]
        for i in range(self.n):
            if starts[i] is None:
                starts[i] = self._find_block_starts(i, n_blocks[i])
        return starts, n_bits, exact

    def _find_block_starts(self, i: int, n_blocks: int) -> np.ndarray:
        if not self.counts[i]:
            return np.zeros(0, dtype=np.int64)
        begin, end = self.symbol_base[i], self.symbol_base[i + 1]
        table, top = decode_table(self.lengths[begin:end], self.widths[begin:end])
        payload = bytes(self.payloads[i])
        return find_block_starts(
            windows(payload, 4), table, top, 8 * len(payload), n_blocks, self.block_sizes[i]
        )


def _decode_group(code: _Code, a: int, b: int):
    """``(symbols, extra_at, extra)`` of streams a..b-1, symbols numbered across all streams."""
    live = [i for i in range(a, b) if code.counts[i]]
    empty = np.zeros(0, dtype=np.int64)
    if not live:
        return empty.astype(np.intp), empty, empty
    s0, s1 = code.symbol_base[a], code.symbol_base[b]
    tables, table_base, top = decode_tables(
        code.lengths[s0:s1], code.widths[s0:s1], code.stream_of_symbol[s0:s1] - a, b - a
    )
    payload = b"".join(code.payloads[a:b])
    byte_base = np.cumsum([0] + [len(p) for p in code.payloads[a:b]])
    n_blocks = [code.starts[i].size for i in live]
    local = [i - a for i in live]
    pos = np.concatenate([code.starts[i] + 8 * int(byte_base[i - a]) for i in live])
    left = [code.counts[i] - np.arange(0, code.counts[i], code.block_sizes[i]) for i in live]
    nsym = np.concatenate([np.minimum(n, code.block_sizes[i]) for n, i in zip(left, live)])
    drop = np.repeat(32 - top[local], n_blocks)
    base = np.repeat(table_base[local], n_blocks)
    entries, ends = decode_blocks(windows(payload, 4), tables, pos, drop, base, nsym)
    block_at = np.cumsum([0] + n_blocks)
    flat = _stream_order(entries, live, code, block_at)
    stream_end = np.array([8 * int(byte_base[i - a]) + code.n_bits[i] for i in live], np.int64)
    _check_blocks(code, live, flat, pos, ends, block_at, stream_end)
    any_extra = code.widths[s0:s1].any()
    advance = flat & LEN_MASK if any_extra else None
    np.right_shift(flat, LEN_BITS, out=flat)
    symbols = flat.astype(np.intp)
    symbols += s0
    if advance is None:
        return symbols, empty, empty
    has_extra = np.flatnonzero(code.widths.astype(np.uint8).take(symbols))
    # Blocks are contiguous (checked), so a symbol's extra bits end where the advances up to it in
    # its stream end: a running sum over the streams, shifted to where each stream's bits start.
    # In place (no fresh pages); below 2**31, so uint32 does not wrap.
    np.cumsum(advance, out=advance)
    counts = code.count_base[a : b + 1] - code.count_base[a]
    stream_of = np.searchsorted(counts, has_extra, side="right") - 1
    before = np.where(counts[:-1] > 0, advance[np.maximum(counts[:-1] - 1, 0)], 0)  # earlier ones
    shift = 8 * byte_base[:-1] - before
    width = code.widths[symbols[has_extra]]
    start = advance[has_extra].astype(np.int64) - width + shift[stream_of]
    return symbols, has_extra + code.count_base[a], read_bits(payload, start, width)


def _stream_order(entries: np.ndarray, live: list[int], code: _Code, block_at) -> np.ndarray:
    """The decoded entries (steps, blocks) of every live stream, block by block, end to end."""
    counts = [code.counts[i] for i in live]
    flat = np.empty(sum(counts), dtype=entries.dtype)
    at = 0
    for j, i in enumerate(live):  # full blocks by one transposed copy, then the last block's rest
        b0, b1, count, size = int(block_at[j]), int(block_at[j + 1]), counts[j], code.block_sizes[i]
        full = count // size
        if full:
            flat[at : at + full * size].reshape(full, size)[...] = entries[:size, b0 : b0 + full].T
        flat[at + full * size : at + count] = entries[: count - full * size, b1 - 1]
        at += count
    return flat


def _check_blocks(code: _Code, live, flat, pos, ends, block_at, stream_end) -> None:
    """SidecarError for the first stream with an invalid code word or blocks that do not tile it."""
    found = []
    if flat.min() == 0:  # a valid entry has a length >= 1
        at = int(np.argmin(flat))
        counts = np.cumsum([0] + [code.counts[i] for i in live])
        j = int(np.searchsorted(counts, at, side="right")) - 1
        message = (
            f"payload holds a bit pattern that is no code word at symbol {at - int(counts[j])}"
        )
        found.append((live[j], message))
    expected = np.append(pos[1:], 0)
    last = block_at[1:] - 1
    expected[last] = stream_end
    wrong = ends != expected
    loose = np.array([not code.exact[i] for i in live])
    wrong[last[loose]] = ends[last[loose]] > stream_end[loose]  # no block index: may end early
    if wrong.any():
        b = int(np.argmax(wrong))
        j = int(np.searchsorted(block_at, b, side="right")) - 1
        where = "the last block" if b == last[j] else f"block {b - int(block_at[j])}"
        message = f"payload is too short or inconsistent with its block index at {where}"
        found.append((live[j], message))
    if found:
        code.fail(*min(found, key=lambda f: f[0]))
