"""Decoding one large stream a group of blocks at a time, in bounded memory.

`huffdecode.decode_joined` decodes all blocks of many streams in one lock-step loop, which is
what small streams need, but holds several 4- and 8-byte arrays per symbol at once. A stream of
millions of symbols has enough blocks for a long loop on its own, so here its blocks are taken
`GROUP_SYMBOLS` symbols at a time: each group's payload bytes, decode entries and symbols are
temporaries of a few MB, and the caller turns each group's symbols into indices before the next.
The stream needs a block index (as every sidecar stream has); the checks and messages are
those of `huffdecode`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .huffdecode import Coded, _Code
from .huffman import read_bits
from .kernels import LEN_BITS, LEN_MASK, decode_blocks, decode_table, windows

#: Symbols per lock-step loop: long enough vectors that numpy's per-call cost is small.
GROUP_SYMBOLS = 1 << 19


def decode_groups(
    coded: Coded, name: str | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(symbols, extra_at, extra)`` of consecutive groups of blocks of one stream, in order.

    ``symbols`` (intp) are the group's symbols; ``extra[j]`` is the extra value of
    ``symbols[extra_at[j]]`` (symbols with no extra bits left out). ``coded.block_bits`` must be
    given. SidecarError (naming ``name``) as `huffdecode.decode` raises it.
    """
    if coded.block_bits is None:
        raise ValueError("decode_groups needs the block index (block_bits)")
    code = _Code([coded], [name] if name is not None else None)
    count, size = code.counts[0], code.block_sizes[0]
    if not count:
        return
    table, top = decode_table(code.lengths, code.widths)
    starts, n_bits, payload = code.starts[0], code.n_bits[0], code.payloads[0]
    widths = code.widths if code.widths.any() else None
    n_blocks, per = starts.size, max(1, GROUP_SYMBOLS // size)
    pending = None  # a block that does not tile, reported after any bad code word (as huffdecode)
    for g0 in range(0, n_blocks, per):
        g1 = min(g0 + per, n_blocks)
        stop = int(starts[g1]) if g1 < n_blocks else n_bits
        first = int(starts[g0]) >> 3
        data = bytes(payload[first : (stop + 7) >> 3])
        pos = starts[g0:g1] - 8 * first
        nsym = np.full(g1 - g0, size, dtype=np.int64)
        if g1 == n_blocks:
            nsym[-1] = count - size * (n_blocks - 1)
        drop = np.full(g1 - g0, 32 - top, dtype=np.int64)
        entries, ends = decode_blocks(
            windows(data, 4), table, pos, drop, np.zeros(g1 - g0, np.int64), nsym
        )
        flat = _in_order(entries, nsym)
        _check_words(code, flat, g0 * size)
        pending = pending or _misplaced(ends, pos, stop - 8 * first, g0, g1 == n_blocks)
        yield _symbols(flat, widths, data, int(pos[0]))
    if pending:
        code.fail(0, pending)


def _in_order(entries: np.ndarray, nsym: np.ndarray) -> np.ndarray:
    """The entries (steps, blocks) block by block: full blocks by one transposed copy."""
    size, total = entries.shape[0], int(nsym.sum())
    full = int(np.count_nonzero(nsym == size))
    flat = np.empty(total, dtype=entries.dtype)
    flat[: full * size].reshape(full, size)[...] = entries[:, :full].T
    if full < nsym.size:
        flat[full * size :] = entries[: total - full * size, -1]
    return flat


def _check_words(code: _Code, flat: np.ndarray, before: int) -> None:
    if flat.min() == 0:  # a valid entry has a length >= 1
        at = before + int(np.argmin(flat))
        code.fail(0, f"payload holds a bit pattern that is no code word at symbol {at}")


def _misplaced(ends, pos, stop: int, g0: int, last: bool) -> str | None:
    """The message for the first block that does not end where the next one starts."""
    wrong = ends != np.append(pos[1:], stop)
    if not wrong.any():
        return None
    b = int(np.argmax(wrong))
    where = "the last block" if last and b == wrong.size - 1 else f"block {g0 + b}"
    return f"payload is too short or inconsistent with its block index at {where}"


def _symbols(flat: np.ndarray, widths, data: bytes, begin: int):
    """The group's symbols, and its extra values read from ``data`` (the group's bytes, whose
    first symbol starts at bit ``begin``)."""
    empty = np.zeros(0, dtype=np.int64)
    if widths is None:
        np.right_shift(flat, LEN_BITS, out=flat)
        return flat.astype(np.intp), empty, empty
    advance = (flat & LEN_MASK).astype(np.int64)
    np.right_shift(flat, LEN_BITS, out=flat)
    symbols = flat.astype(np.intp)
    width = widths.take(symbols)
    has_extra = np.flatnonzero(width)
    np.cumsum(advance, out=advance)  # where each symbol's bits end: blocks are contiguous
    width = width[has_extra]
    return symbols, has_extra, read_bits(data, advance[has_extra] + begin - width, width)
