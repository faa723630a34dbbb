"""Canonical, length-limited Huffman coding in pure numpy.

Code lengths come from package-merge (optimal under the length limit). Codes are canonical:
symbols sorted by ``(length, symbol)`` get consecutive code values, so the lengths alone define
the code. Bits are packed MSB-first, the last byte padded with zero bits.

Decoding is sequential by nature (where a code word starts depends on all earlier ones), so it is
vectorised across *blocks*: the symbols are cut into blocks of ``block_size`` symbols, and given
the bit length of every block, all blocks are decoded at once, one symbol per block per step,
with a ``2**max(lengths)`` lookup table. The sidecar stores the block bit lengths for this; without
them :func:`decode` finds the block starts itself by pointer doubling, slower but still vectorised.

A symbol may carry *extra bits* (``extra_widths[symbol]`` of them, written right after its code
word, as DEFLATE does for match lengths): the decode table advances over code and extra bits in one
step, and the extra values are read afterwards, all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, SidecarError

MAX_LENGTH = 20
"""Longest code length supported: the decode table has ``2**max_length`` entries."""
MAX_PAYLOAD = 1 << 29
"""Largest payload of one stream in bytes (bit positions must fit in uint32)."""
MAX_EXTRA = 31
"""Most extra bits one symbol may carry (code + extra bits stay below 2**_LEN_BITS)."""

_LEN_BITS = 6  # decode-table entries are (symbol << 6) | (length + extra bits); 0 marks an invalid code
_LEN_MASK = np.uint32((1 << _LEN_BITS) - 1)
_FALLBACK_BLOCK = 64


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_count(value, what: str, *, low: int = 0) -> None:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{what}={value!r} must be an int >= {low}")


def entropy_bits(counts) -> float:
    """Empirical entropy in bits per symbol of a histogram.

    Parameters
    ----------
    counts : array_like, shape (k,)
        Non-negative symbol counts.
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


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
        raise ConfigError(f"counts must be a 1-D integer array, got shape {counts.shape} dtype {counts.dtype}")
    if counts.size and counts.min() < 0:
        raise ConfigError(f"counts must be non-negative, got minimum {counts.min()}")
    if not _is_int(max_length) or not 1 <= max_length <= MAX_LENGTH:
        raise ConfigError(f"max_length={max_length!r} must be an int in [1, {MAX_LENGTH}]")
    used = np.flatnonzero(counts)
    if used.size > 2 ** max_length:
        raise ConfigError(
            f"{used.size} used symbols need codes longer than max_length={max_length}; raise max_length"
        )
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used] = 1
    elif used.size > 1:
        order = used[np.argsort(counts[used], kind="stable")]  # ascending count, ties by symbol
        lengths[order] = _package_merge(counts[order].astype(np.int64), int(max_length))
    return lengths


def _package_merge(weights: np.ndarray, max_length: int) -> np.ndarray:
    """Lengths for ascending ``weights`` (n >= 2): each leaf's count among the 2n-2 cheapest items."""
    n = weights.size
    levels = []  # is-leaf flags of the merged list at depths max_length-1 .. 1
    items = weights
    for _ in range(max_length - 1):
        half = items.size // 2
        packages = items[0:2 * half:2] + items[1:2 * half:2]
        at = np.searchsorted(weights, packages, side="right") + np.arange(half)  # leaves first on ties
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
        raise SidecarError(f"code lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_LENGTH):
        raise SidecarError(f"code lengths must lie in [0, {MAX_LENGTH}], got [{lengths.min()}, {lengths.max()}]")
    used = lengths[lengths > 0]
    if used.size and int((1 << (MAX_LENGTH - used)).sum()) > 1 << MAX_LENGTH:
        raise SidecarError("code lengths violate the Kraft inequality (over-subscribed prefix code)")
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


#: Values packed per step of `pack_bits` (bounds its temporary memory).
PACK_CHUNK = 1 << 20


def pack_bits(values: np.ndarray, widths: np.ndarray) -> tuple[bytes, int]:
    """Concatenate ``values[i]`` written in ``widths[i]`` bits (<= 32), MSB-first, zero-padded.

    Works through the values in chunks of `PACK_CHUNK`, so the temporaries stay a few tens of MB
    however long the stream (tens of millions of weights).
    """
    values = np.asarray(values, dtype=np.int64).ravel()
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
    if values.size and (widths.min() < 0 or widths.max() > 32 or values.min() < 0 or np.any(values >> widths)):
        raise ConfigError("pack_bits needs widths in [0, 32] and 0 <= values < 2**widths")
    n_bits = int(widths.sum())
    n_bytes = (n_bits + 7) // 8
    if n_bytes == 0:
        return b"", n_bits
    spill = (7 + int(widths.max()) + 7) // 8  # bytes one value can touch
    out = np.zeros(n_bytes + spill, dtype=np.float64)
    offset = 0
    for begin in range(0, values.size, PACK_CHUNK):
        v, w = values[begin:begin + PACK_CHUNK], widths[begin:begin + PACK_CHUNK]
        ends = np.cumsum(w) + offset
        starts = ends - w
        aligned = v << (8 * spill - w - (starts & 7))  # value placed in a `spill`-byte window
        first = starts >> 3
        low = int(first[0])
        for k in range(spill):  # values occupy disjoint bits, so summing bytes is OR-ing them
            part = (aligned >> (8 * (spill - 1 - k))) & 0xFF
            counts = np.bincount(first - low + k, weights=part)
            out[low:low + counts.size] += counts
        offset = int(ends[-1])
    return out[:n_bytes].astype(np.uint8).tobytes(), n_bits


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``count`` values of one ``width`` (0..32); int64.

    Raises SidecarError when ``data`` is not exactly the packed length or its padding is not zero.
    """
    _check_count(count, "count")
    if not _is_int(width) or not 0 <= width <= 32:
        raise ConfigError(f"width={width!r} must be an int in [0, 32]")
    n_bits = width * count
    if len(data) != (n_bits + 7) // 8:
        need = (n_bits + 7) // 8
        raise SidecarError(f"packed field has {len(data)} bytes, expected {need} for {count} x {width} bits")
    if n_bits % 8 and data[-1] & ((1 << (8 - n_bits % 8)) - 1):
        raise SidecarError("non-zero padding bits after the last packed field")
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n_bits).reshape(count, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))


def read_bits(data: bytes, positions: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ``widths[i]``-bit (0..32) MSB-first value starting at bit ``positions[i]`` of ``data``; int64.

    Bits past the end of ``data`` read as zero; callers check lengths themselves.
    """
    positions = np.asarray(positions, dtype=np.int64)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.int64), positions.shape)
    out = np.zeros(positions.size, dtype=np.int64)
    wide = np.flatnonzero(widths)  # zero-width fields (most extra-bit fields) need no reading
    if wide.size == 0:
        return out
    pos = positions[wide]
    buf = np.frombuffer(bytes(data) + bytes(5), dtype=np.uint8)
    at = np.minimum(pos >> 3, len(data))
    word = buf[at].astype(np.uint64)
    for k in range(1, 5):  # 40 bits cover any 32-bit field at any bit offset
        word = (word << np.uint64(8)) | buf[at + k]
    word = (word << (pos & 7).astype(np.uint64)) & np.uint64((1 << 40) - 1)
    out[wide] = (word >> (np.uint64(40) - widths[wide].astype(np.uint64))).astype(np.int64)
    return out


def encode(symbols: np.ndarray, lengths: np.ndarray, extra: np.ndarray | None = None,
           extra_widths: np.ndarray | None = None) -> tuple[bytes, int]:
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
    if symbols.min() < 0 or symbols.max() >= lengths.size or np.any(lengths[symbols] == 0):
        raise ConfigError(f"symbols must lie in [0, {lengths.size}) and have a non-zero code length")
    codes, _, _ = _canonical(lengths)
    if extra_widths is None:
        return pack_bits(codes[symbols], lengths[symbols])
    widths = _check_extra_widths(extra_widths, lengths.size, ConfigError)
    values = np.stack([codes[symbols], np.asarray(extra, dtype=np.int64).ravel()], axis=1)
    return pack_bits(values.ravel(), np.stack([lengths[symbols], widths[symbols]], axis=1).ravel())


def _check_extra_widths(extra_widths, size: int, error) -> np.ndarray:
    widths = np.asarray(extra_widths)
    fits = widths.shape == (size,) and widths.dtype.kind in "iu"
    if not fits or (size and not 0 <= widths.min() <= widths.max() <= MAX_EXTRA):
        raise error(f"extra_widths must be {size} integers in [0, {MAX_EXTRA}]")
    return widths.astype(np.int64)


def block_bits(symbols: np.ndarray, lengths: np.ndarray, block_size: int,
               extra_widths: np.ndarray | None = None) -> np.ndarray:
    """Bit length (code words and extra bits) of each block of ``block_size`` consecutive symbols."""
    per_symbol = np.asarray(lengths, dtype=np.int64)
    if extra_widths is not None:
        per_symbol = per_symbol + np.asarray(extra_widths, dtype=np.int64)
    bits = per_symbol[np.asarray(symbols).ravel()]
    starts = np.arange(0, bits.size, block_size)
    return np.add.reduceat(bits, starts) if bits.size else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Coded:
    """One coded stream to decode: the arguments of :func:`decode`."""

    payload: bytes
    lengths: np.ndarray
    count: int
    block_size: int = _FALLBACK_BLOCK
    block_bits: np.ndarray | None = None
    extra_widths: np.ndarray | None = None


def decode(
    payload: bytes,
    lengths: np.ndarray,
    count: int,
    *,
    block_size: int = _FALLBACK_BLOCK,
    block_bits: np.ndarray | None = None,
    extra_widths: np.ndarray | None = None,
):
    """Inverse of :func:`encode`: ``count`` symbols as an int32 array of shape (count,).

    ``block_bits`` (shape ``(ceil(count / block_size),)``), when given, must be the bit length of
    each block of ``block_size`` symbols (see :func:`block_bits`); it makes decoding several times
    faster. With ``extra_widths`` (as given to :func:`encode`) the result is ``(symbols, extra)``,
    both of shape (count,). Raises SidecarError when the payload is too short, holds an unused code,
    or disagrees with ``block_bits``.
    """
    return decode_many([Coded(payload, lengths, count, block_size, block_bits, extra_widths)])[0]


def decode_many(streams: list[Coded], names: list[str] | None = None) -> list:
    """:func:`decode` of several streams at once: all their blocks advance in one lock-step loop.

    Small streams cost a numpy step per symbol of a block like large ones, so decoding the 64
    streams of a ResNet one by one spends most of its time in loop overhead; together they share
    the loop. SidecarError messages start with ``stream <name>:`` when ``names`` are given.
    """
    plans = []
    for i, coded in enumerate(streams):
        try:
            plans.append(_plan(coded))
        except SidecarError as exc:
            raise _named(exc, names, i) from None
    live = [p for p in plans if p is not None]
    if live:
        _decode_together(live)
    results = []
    for i, (coded, plan) in enumerate(zip(streams, plans)):
        try:
            results.append(_finish(coded, plan))
        except SidecarError as exc:
            raise _named(exc, names, i) from None
    return results


def _named(exc: SidecarError, names, i: int) -> SidecarError:
    return SidecarError(f"stream {names[i]!r}: {exc}") if names else exc


@dataclass
class _Plan:
    """A stream's decode table and block starts, and (after decoding) its entries and block ends."""

    table: np.ndarray
    top: int
    words: np.ndarray
    starts: np.ndarray
    steps: int
    n_bits: int
    entries: np.ndarray | None = None
    ends: np.ndarray | None = None


def _plan(coded: Coded) -> _Plan | None:
    """Checks the arguments and builds the decode table; None for an empty stream."""
    lengths = _check_lengths(coded.lengths)
    widths = None if coded.extra_widths is None else _check_extra_widths(coded.extra_widths, lengths.size, SidecarError)
    _check_count(coded.count, "count")
    _check_count(coded.block_size, "block_size", low=1)
    count, block_size, payload = int(coded.count), int(coded.block_size), coded.payload
    if len(payload) > MAX_PAYLOAD:
        raise SidecarError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit of one stream")
    if count == 0:
        return None
    if not lengths.any():
        raise SidecarError(f"{count} symbols to decode but no symbol has a code length")
    _, order, top = _canonical(lengths)
    span = np.left_shift(1, top - lengths[order])
    table = np.zeros(1 << top, dtype=np.uint32)  # unused (incomplete-code) windows stay 0: invalid
    advance = lengths[order] if widths is None else lengths[order] + widths[order]
    table[: int(span.sum())] = np.repeat((order << _LEN_BITS) | advance, span)
    n_blocks = -(-count // block_size)
    steps = min(block_size, count)
    longest = top + (0 if widths is None else int(widths.max()))
    raw = np.frombuffer(bytes(payload) + bytes((steps * longest + 7) // 8 + 4), dtype=np.uint8).astype(np.uint32)
    words = (raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]
    if coded.block_bits is None:
        starts = _find_block_starts(words, table, top, 8 * len(payload), n_blocks, block_size)
        n_bits = 8 * len(payload)
    else:
        block_bits = np.asarray(coded.block_bits, dtype=np.int64)
        if block_bits.shape != (n_blocks,) or (block_bits.size and block_bits.min() < 0):
            raise SidecarError(f"block_bits must be {n_blocks} non-negative bit counts, got shape {block_bits.shape}")
        n_bits = int(block_bits.sum())
        if n_bits > 8 * len(payload):
            raise SidecarError(f"payload of {len(payload)} bytes is shorter than its {n_bits} coded bits")
        starts = np.concatenate(([0], np.cumsum(block_bits)[:-1]))
    return _Plan(table, top, words, starts, steps, n_bits)


#: Most bytes one lock-step group reads (``words`` has one 32-bit window per byte; bit positions
#: stay below 2**32).
_GROUP_WORDS = 1 << 28


def _decode_together(plans: list[_Plan]) -> None:
    """Decode every plan's blocks, groups of plans sharing one lock-step loop; fills entries/ends."""
    group, size = [], 0
    for plan in plans + [None]:
        if plan is None or (group and size + plan.words.size > _GROUP_WORDS):
            _decode_group(group)
            group, size = [], 0
        if plan is not None:
            group.append(plan)
            size += plan.words.size


def _decode_group(plans: list[_Plan]) -> None:
    word_base = np.cumsum([0] + [p.words.size for p in plans])
    table_base = np.cumsum([0] + [p.table.size for p in plans])
    words = np.concatenate([p.words for p in plans])
    table = np.concatenate([p.table for p in plans])
    counts = [p.starts.size for p in plans]
    pos = np.concatenate([p.starts + 8 * word_base[i] for i, p in enumerate(plans)]).astype(np.uint32)
    drop = np.repeat(np.array([32 - p.top for p in plans], dtype=np.uint32), counts)
    base = np.repeat(table_base[:-1].astype(np.uint32), counts)
    steps = np.repeat(np.array([p.steps for p in plans]), counts)
    entries, ends = _decode_blocks(words, table, pos, drop, base, steps)
    at = np.cumsum([0] + counts)
    for i, p in enumerate(plans):
        p.entries = entries[: p.steps, at[i] : at[i + 1]]
        p.ends = ends[at[i] : at[i + 1]] - 8 * int(word_base[i])


def _finish(coded: Coded, plan: _Plan | None):
    """Checks a decoded stream against its block index; its symbols (and extra bits)."""
    widths = None if coded.extra_widths is None else np.asarray(coded.extra_widths, dtype=np.int64)
    if plan is None:
        empty = np.zeros(0, dtype=np.int32)
        return empty if widths is None else (empty, np.zeros(0, dtype=np.int64))
    count, block_size = int(coded.count), int(coded.block_size)
    n_blocks, starts, n_bits = plan.starts.size, plan.starts, plan.n_bits
    entries = plan.entries.T.ravel()[:count]
    if entries.min() == 0:  # a valid entry has a length >= 1
        raise SidecarError(f"payload holds a bit pattern that is no code word at symbol {int(np.argmin(entries))}")
    last = int(starts[-1]) + int((entries[(n_blocks - 1) * block_size:] & _LEN_MASK).sum(dtype=np.int64))
    bad = np.flatnonzero(plan.ends[:-1] != starts[1:])
    if bad.size or last > n_bits or (coded.block_bits is not None and last != n_bits):
        where = f"block {int(bad[0])}" if bad.size else "the last block"
        raise SidecarError(f"payload is too short or inconsistent with its block index at {where}")
    advance = entries & _LEN_MASK if widths is not None else None
    entries >>= _LEN_BITS
    symbols = entries.view(np.int32)  # symbols < 2**26: the same bits read as int32
    if widths is None:
        return symbols
    # Blocks are contiguous (checked above), so a symbol starts where the advances before it end.
    has_extra = np.flatnonzero(widths.astype(np.uint8)[symbols])
    extra = np.zeros(count, dtype=np.int64)
    if has_extra.size:
        lengths = np.asarray(coded.lengths, dtype=np.int64)
        chosen, own = symbols[has_extra], advance[has_extra]
        np.cumsum(advance, out=advance)  # in place (no fresh pages); uint32 wraps, but starts are < 2**32
        starts_of = (advance[has_extra] - own).astype(np.int64)
        extra[has_extra] = read_bits(coded.payload, starts_of + lengths[chosen], widths[chosen])
    return symbols, extra


def _decode_blocks(words, table, pos, drop, base, steps):
    """Decode from each block start ``pos`` in lock-step, block b for ``steps[b]`` symbols.

    ``drop`` (32 - the code's longest length) and ``base`` (where its table starts in ``table``)
    are per block. Returns the entries, shape (max steps, blocks), and each block's end position.
    """
    pos = pos.copy()
    out = np.empty((int(steps.max()), pos.size), dtype=np.uint32)
    ends = pos.astype(np.int64)
    finishing = {int(n): np.flatnonzero(steps == n) for n in np.unique(steps)}
    window = np.empty_like(pos)
    shift = np.empty_like(pos)
    if drop.min() == drop.max():  # one stream, or streams with one longest code: scalar ops are cheaper
        drop = drop[:1].copy().reshape(())
    offset = base.any()
    for step, row in enumerate(out):  # one symbol per block per step: the loop runs over block positions
        np.right_shift(pos, 3, out=window)
        words.take(window, out=window, mode="clip")
        np.bitwise_and(pos, 7, out=shift)
        np.left_shift(window, shift, out=window)
        np.right_shift(window, drop, out=window)
        if offset:
            window += base
        table.take(window, out=row, mode="clip")
        np.bitwise_and(row, _LEN_MASK, out=shift)
        pos += shift
        done = finishing.get(step + 1)
        if done is not None:
            ends[done] = pos[done]
    return out, ends


def _find_block_starts(words, table, top, n_bits, n_blocks, block_size):
    """Bit offset of every ``block_size``-th symbol, by pointer doubling over all bit positions."""
    if block_size & (block_size - 1):
        raise ConfigError(f"block_size={block_size} must be a power of two when block_bits is not given")
    lens = np.empty((words.size, 8), dtype=np.int64)
    for s in range(8):
        lens[:, s] = table[(words << s) >> (32 - top)] & _LEN_MASK
    lens = lens.ravel()[: n_bits + 1]
    nxt = np.arange(lens.size, dtype=np.int64) + lens
    nxt[lens == 0] = n_bits  # an invalid code ends the chain; the final checks report it
    np.minimum(nxt, n_bits, out=nxt)
    jump = nxt
    for _ in range(block_size.bit_length() - 1):
        jump = jump[jump]
    starts = np.zeros(n_blocks, dtype=np.int64)
    at = 0
    for b in range(1, n_blocks):  # one step per block, not per symbol
        at = int(jump[at])
        starts[b] = at
    return starts
