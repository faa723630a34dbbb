"""Reading streams back (the way back from `layout`): code tables, block indices, payloads and runs.

All streams of a file are read together: their code tables and block indices are unpacked in a
few numpy calls over the streams laid end to end, their payloads decoded in one lock-step loop
(`huffdecode.decode_joined`), and their runs expanded at once, so a file of 64 small tensors costs
a fixed number of numpy calls. Every field is checked against its header entry (already checked
by `layout.check_fields`): a damaged or hostile stream gives SidecarError naming it.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import SidecarError
from . import blockdecode, huffdecode
from .huffman import read_bits
from .layout import GROUP, Entry, extra_widths, field_sizes, length_bits, table_size

#: Streams of at least this many indices are decoded alone, a group of blocks at a time
#: (`blockdecode`), straight into their index array; smaller ones together (`decode_joined`).
LARGE = 1 << 20


def decode_streams(entries: list[tuple[str, Entry]], buffer) -> list[np.ndarray]:
    """Every stream's indices, uint8 (uint16 past 256 levels) of its entry's shape.

    ``entries`` are ``(name, checked entry)`` in buffer order, their ``data_offsets`` into
    ``buffer`` (bytes or a memoryview); small streams are decoded, checked and run-expanded
    together, large ones (`LARGE`) one at a time in bounded memory.
    """
    names = [name for name, _ in entries]
    coded = _codes(entries, buffer)
    counts = np.array([math.prod(entry["shape"]) for _, entry in entries], dtype=np.int64)
    out: list[np.ndarray | None] = [None] * len(entries)
    small = [i for i in range(len(entries)) if counts[i] < LARGE]
    if small:
        joined = huffdecode.decode_joined([coded[i] for i in small], [names[i] for i in small])
        indices = _expand(
            joined, [entries[i][1] for i in small], [names[i] for i in small], counts[small]
        )
        index_base = np.concatenate(([0], np.cumsum(counts[small]))).tolist()
        for j, i in enumerate(small):
            out[i] = indices[index_base[j] : index_base[j + 1]]
    for i in range(len(entries)):
        if counts[i] >= LARGE:
            out[i] = _expand_groups(coded[i], entries[i][1], names[i], int(counts[i]))
    result = []
    for (_, entry), part in zip(entries, out):
        assert part is not None
        part = part.astype(np.uint8 if entry["alphabet_size"] <= 256 else np.uint16, copy=False)
        result.append(part.reshape(tuple(entry["shape"])))
    return result


def _expand_groups(coded: huffdecode.Coded, entry: Entry, name: str, count: int) -> np.ndarray:
    """One large stream's indices, decoded a group of blocks at a time (`blockdecode`) and
    expanded as `_expand` does, with the same checks."""
    k, classes, run = entry["alphabet_size"], entry["run_classes"], entry["run_symbol"]
    span, level, end_kind = _symbol_facts(k, classes, run)
    dtype = np.uint8 if k <= 256 else np.uint16
    levels = level.astype(dtype)
    out = np.empty(count, dtype=dtype)
    at, seen, bad_end = 0, 0, False  # indices covered, symbols decoded, an end symbol misplaced
    for symbols, extra_at, extra in blockdecode.decode_groups(coded, name):
        if not classes:
            levels.take(symbols, out=out[at : at + symbols.size])
            at += symbols.size
            continue
        ends_at = np.flatnonzero(end_kind.take(symbols))
        if ends_at.size and (
            ends_at[0] + seen != entry["symbols"] - 1 or end_kind[symbols[ends_at[0]]] != 1
        ):
            bad_end = True
        seen += symbols.size
        place = span.take(symbols)
        place[extra_at] += extra
        np.cumsum(place, out=place)  # one past where each symbol's last index goes
        covered = int(place[-1])
        if bad_end or at + covered > count:  # only count from here on
            at += covered
            continue
        out[at : at + covered] = run
        place += at - 1
        out[place] = levels.take(symbols)
        at += covered
    if bad_end:
        raise SidecarError(
            f"stream {name!r}: an end-of-stream symbol that is not last, or ends no run"
        )
    if at != count:
        raise SidecarError(f"stream {name!r}: run symbols cover {at} indices, shape needs {count}")
    return out


def _expand(
    joined: huffdecode.Joined, entries: list[Entry], names: list[str], counts: np.ndarray
) -> np.ndarray:
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
        i = int(stream_of[np.argmax(wrong)])
        bad.append((i, "an end-of-stream symbol that is not last, or ends no run"))
    covered = np.zeros_like(counts)
    if span.size:
        covered = np.diff(np.where(base > 0, span[np.maximum(base - 1, 0)], 0))
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
def _symbol_facts(
    k: int, n_classes: int, run_symbol: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per symbol of a stream's alphabet: the indices it stands for (int64), the last of them
    (int64), and 1 for an end symbol, 2 for one that ends no run (uint8). Read-only (cached)."""
    if not n_classes:
        span, level, end = np.ones(k, np.int64), np.arange(k, dtype=np.int64), np.zeros(k, np.uint8)
    else:
        shortest = np.concatenate(([0], np.left_shift(1, np.arange(n_classes - 1, dtype=np.int64))))
        spans = np.repeat(shortest + 1, k + 1).reshape(n_classes, k + 1)
        spans[:, k] -= 1  # the end symbol: its run alone
        level = np.tile(np.append(np.arange(k, dtype=np.int64), [run_symbol]), n_classes)
        ends = np.zeros((n_classes, k + 1), np.uint8)
        ends[:, k] = 1
        ends[0, k] = 2
        span, end = spans.ravel(), ends.ravel()
    for array in (span, level, end):
        array.flags.writeable = False
    return span, level, end


def _codes(entries: list[tuple[str, Entry]], buffer: bytes) -> list[huffdecode.Coded]:
    """The checked code tables, block indices and payloads of all streams, read together."""
    names = [name for name, _ in entries]
    fields = [field_sizes(entry) for _, entry in entries]
    begin = [entry["data_offsets"][0] for _, entry in entries]
    lengths = _read_tables(
        buffer,
        names,
        begin,
        [f[0] for f in fields],
        [table_size(e) for _, e in entries],
        [e["table_bits"] for _, e in entries],
    )
    blocks = _read_block_indices(
        buffer, entries, [b + f[0] for b, f in zip(begin, fields)], [f[1] for f in fields]
    )
    coded = []
    for i, (name, entry) in enumerate(entries):
        bits, at = entry["bits"], begin[i] + fields[i][0] + fields[i][1]
        payload = buffer[at : at + fields[i][2]]
        if bits % 8 and payload[-1] & ((1 << (8 - bits % 8)) - 1):
            raise SidecarError(f"stream {name!r}: non-zero padding bits after the payload")
        coded.append(
            huffdecode.Coded(
                payload,
                lengths[i],
                entry["symbols"],
                entry["block_size"],
                blocks[i],
                extra_widths(entry) if entry["run_classes"] else None,
            )
        )
    return coded


def _rank(sizes) -> np.ndarray:
    """Each element's place in its segment of ``sizes``: ``[0, 1, .., n0 - 1, 0, 1, ..]``."""
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
    bits = np.unpackbits(
        np.frombuffer(b"".join(buffer[b : b + m] for b, m in zip(begin, n_bytes)), np.uint8)
    )
    bits = np.append(bits, np.zeros(8, np.uint8))  # room to read a field at the very end
    groups = -(-np.asarray(sizes, np.int64) // GROUP)
    n_bits = np.asarray(n_bits, np.int64)
    group_of = np.repeat(np.arange(n), groups)
    marked = bits[_ragged(at, groups)].astype(bool)
    n_marked = np.bincount(group_of, weights=marked, minlength=n).astype(np.int64)
    for i in np.flatnonzero(groups + GROUP * n_marked > 8 * n_bytes)[:1]:
        raise fail(
            i, f"code table of {n_marked[i]} marked groups needs more than table_bits={n_bits[i]}"
        )
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
    width = np.array([length_bits(s) for s in sizes], dtype=np.int64)
    start = groups + GROUP * n_marked
    for i in np.flatnonzero(start + width * used != n_bits)[:1]:
        raise fail(
            i,
            f"code table of {used[i]} coded symbols takes {start[i] + width[i] * used[i]} bits, "
            f"header says table_bits={n_bits[i]}",
        )
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
    values = read_bits(buffer, at, width)
    pad_at = np.array(
        [8 * b + e["block_width"] * s for b, (_, e), s in zip(begin, entries, stored)], np.int64
    )
    padding = read_bits(buffer, pad_at, 8 * (np.asarray(begin) + np.asarray(n_bytes)) - pad_at)
    for i in np.flatnonzero(padding)[:1]:
        raise SidecarError(
            f"stream {entries[i][0]!r}: non-zero padding bits after the last packed field"
        )
    values += np.repeat([e["block_base"] for _, e in entries], stored)
    ends = np.concatenate(([0], np.cumsum(values)))[np.cumsum(stored)]
    last = np.array([e["bits"] for _, e in entries], np.int64) - (
        ends - np.concatenate(([0], ends[:-1]))
    )
    for i in np.flatnonzero((last < 0) & (np.asarray(n_blocks) > 0))[:1]:
        name, bits = entries[i][0], entries[i][1]["bits"]
        raise SidecarError(
            f"stream {name!r}: block index sums to more than the {bits} payload bits"
        )
    blocks = np.empty(sum(n_blocks), dtype=np.int64)
    first = np.cumsum(n_blocks) - n_blocks
    blocks[_ragged(first, stored)] = values
    has_blocks = np.flatnonzero(n_blocks)
    blocks[first[has_blocks] + np.asarray(n_blocks)[has_blocks] - 1] = last[has_blocks]
    return [blocks[f : f + m] for f, m in zip(first.tolist(), n_blocks)]
