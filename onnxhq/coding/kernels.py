"""The array kernels of Huffman decoding: decode tables, byte windows, the lock-step block loop,
and pointer doubling to find block starts. Arguments are trusted: `huffdecode` checks them.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

#: Decode-table entries are ``(symbol << LEN_BITS) | (length + extra bits)``; 0 marks an
#: invalid code.
LEN_BITS = 6
LEN_MASK = (1 << LEN_BITS) - 1


def decode_table(lengths: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """One code's decode table: ``2**top`` entries ``(symbol << LEN_BITS) | (length + extra)``."""
    tables, _, top = decode_tables(lengths, widths, np.zeros(lengths.size, np.int64), 1)
    return tables, int(top[0])


def decode_tables(lengths, widths, stream_of, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decode tables of ``n`` codes end to end: ``(tables, table_base (n + 1,), top (n,))``.

    Code i's table has ``2**top[i]`` entries (its longest length): ``(symbol << LEN_BITS) |
    (length + extra bits)`` at every window that starts with a code word, symbols numbered across
    all codes; windows that start no code word (of an incomplete code) hold 0, marking them invalid.
    """
    top = np.zeros(n, dtype=np.int64)
    np.maximum.at(top, stream_of, lengths)
    used = np.flatnonzero(lengths > 0)
    order = used[np.lexsort((used, lengths[used], stream_of[used]))]  # by code, length, symbol
    code_of = stream_of[order]
    span = np.left_shift(1, top[code_of] - lengths[order])
    filled = np.bincount(code_of, weights=span, minlength=n).astype(np.int64)
    values = (order << LEN_BITS) | (lengths[order] + widths[order])
    last = np.searchsorted(
        code_of, np.arange(n), side="right"
    )  # each code's invalid rest: after it
    values = np.insert(values, last, 0)
    span = np.insert(span, last, (1 << top) - filled)
    size = 1 << top
    return np.repeat(values.astype(np.uint32), span), np.concatenate(([0], np.cumsum(size))), top


def windows(payload: bytes, pad: int) -> np.ndarray:
    """The 32-bit MSB-first window at every byte of ``payload`` (zeros past its end); uint32."""
    n = len(payload) + pad
    raw = payload + bytes(pad + 3 + (-n) % 4)
    words = np.empty(n + (-n) % 4, dtype=np.uint32)
    for r in range(4):  # the windows at bytes r, r + 4, ... are the big-endian words of raw[r:]
        words[r::4] = np.frombuffer(raw, dtype=">u4", count=words.size // 4, offset=r)
    return words[:n]


def decode_blocks(words, table, pos, drop, base, nsym):
    """Decode from each block start ``pos`` in lock-step, block b for ``nsym[b]`` symbols.

    ``drop`` (32 - the code's longest length) and ``base`` (where its table starts in ``table``)
    are per block. Returns the entries, shape (max nsym, blocks), and each block's end position.
    Positions and windows are intp, so the two table lookups per step need no index conversion.
    """
    pos = pos.astype(np.intp)
    out = np.empty((int(nsym.max()), pos.size), dtype=np.uint32)
    ends = pos.copy()
    finishing = {int(n): np.flatnonzero(nsym == n) for n in np.unique(nsym)}
    window, shift = np.empty_like(pos), np.empty_like(pos)
    word = np.empty(pos.size, dtype=np.uint32)
    mask = (np.int64(1) << (32 - drop)) - 1
    if drop.min() == drop.max():  # one longest code length: scalar operands are cheaper
        drop, mask = drop[0], mask[0]
    offset = base.any()
    for step, row in enumerate(out):  # a symbol per block per step: a loop over block positions
        np.right_shift(pos, 3, out=window)
        words.take(window, out=word, mode="clip")
        np.bitwise_and(pos, 7, out=shift)
        np.subtract(drop, shift, out=shift)
        # the window's top bits, at the right
        np.right_shift(word, shift, out=window, casting="unsafe")
        np.bitwise_and(window, mask, out=window)
        if offset:
            window += base
        table.take(window, out=row, mode="clip")
        np.bitwise_and(row, LEN_MASK, out=shift, casting="unsafe")
        pos += shift
        done = finishing.get(step + 1)
        if done is not None:
            ends[done] = pos[done]
    return out, ends


def find_block_starts(words, table, top, n_bits, n_blocks, block_size):
    """Bit offset of every ``block_size``-th symbol, by pointer doubling over all bit positions."""
    if block_size & (block_size - 1):
        raise ConfigError(
            f"block_size={block_size} must be a power of two when block_bits is not given"
        )
    lens = np.empty((words.size, 8), dtype=np.int64)
    for s in range(8):
        lens[:, s] = table[(words << s) >> (32 - top)] & LEN_MASK
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
