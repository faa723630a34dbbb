"""Long streams in bounded memory: bit fields packed MSB-first into 64-bit words, and histograms.

Packing n fields one numpy pass at a time over the whole stream would need several 8-byte
temporaries per field (tens of bytes per weight); `BitWriter` takes the fields `CHUNK` at a time,
so its temporaries stay a few MB, and its only large array is the packed result. Each field goes
into 64-bit words: its bit offset is a running sum of the widths, and every word is the OR of the
fields that start in it (a `reduceat` over the runs of fields sharing a word, since a field shorter
than 64 bits starts in every word it does not end in), plus the spill of the last field of the
word before.
"""

from __future__ import annotations

import numpy as np

#: Fields per step of `BitWriter.write` and values per step of `histogram` (a few MB of
#: temporaries, in cache-friendly pieces).
CHUNK = 1 << 16
_U63 = np.uint64(63)
_U64 = np.uint64(64)


class BitWriter:
    """Appends bit fields, MSB-first, to a buffer of ``n_bits`` bits made once.

    Parameters
    ----------
    n_bits : int
        Bits that will be written in all (the buffer's size; `payload` checks it).
    block_size : int, optional
        When > 0, the writer records the bit length of every ``block_size`` fields
        (`block_bits`).
    """

    def __init__(self, n_bits: int, block_size: int = 0):
        self.n_bits = int(n_bits)
        self.words = np.zeros(self.n_bits // 64 + 2, dtype=np.uint64)
        self.at = 0  # bits written
        self.count = 0  # fields written
        self.block_size = int(block_size)
        self._block_ends: list[np.ndarray] = []

    def write(self, aligned: np.ndarray, widths: np.ndarray) -> None:
        """Append ``len(aligned)`` fields (at most about `CHUNK` for bounded memory).

        ``aligned`` (uint64) holds each value shifted to the top of 64 bits, ``value << (64 -
        width)``; ``widths`` (unsigned ints, each < 64) their widths. Bits beyond a field's width
        must be 0.
        """
        m = aligned.size
        if m == 0:
            return
        ends = np.cumsum(widths, dtype=np.uint64)
        ends += np.uint64(self.at)
        starts = ends - widths
        shift = starts & _U63
        first, last = self.at >> 6, int(starts[-1]) >> 6
        # the first field of each word after the first (every word holds a start): a field
        # starts a word when its offset in the word is below its predecessor's (widths < 64)
        edges = np.flatnonzero(shift[1:] < shift[:-1])
        edges += 1
        heads = np.concatenate(([0], edges))
        self.words[first : last + 1] |= np.bitwise_or.reduceat(aligned >> shift, heads)
        tails = np.append(edges - 1, m - 1)  # the last field of each word spills into the next
        self.words[first + 1 : last + 2] |= aligned[tails] << (_U64 - shift[tails])
        if self.block_size:
            b = self.block_size
            self._block_ends.append(ends[(b - 1 - self.count) % b :: b].copy())  # not a view
        self.at = int(ends[-1])
        self.count += m

    def block_bits(self) -> np.ndarray:
        """Bit length of each block of ``block_size`` fields written so far (the last one may be
        shorter); int64."""
        ends = np.concatenate([*self._block_ends, np.zeros(0, np.uint64)]).astype(np.int64)
        if self.count % max(self.block_size, 1):
            ends = np.append(ends, self.at)
        return np.diff(ends, prepend=0)

    def payload(self) -> bytes:
        """The bytes written, zero-padded to a whole byte; the writer is spent afterwards."""
        if self.at != self.n_bits:
            raise AssertionError(f"wrote {self.at} bits, expected {self.n_bits}")
        self.words.byteswap(inplace=True)  # MSB-first words are big-endian
        data = self.words.view(np.uint8)[: (self.n_bits + 7) // 8].tobytes()
        self.words = np.zeros(0, np.uint64)
        return data


def histogram(values: np.ndarray, size: int) -> np.ndarray:
    """``np.bincount(values, minlength=size)`` (int64) in `CHUNK`-sized steps, so that integer
    values narrower than intp are not widened all at once."""
    flat = values.reshape(-1)
    if flat.dtype.itemsize >= np.dtype(np.intp).itemsize or flat.size <= CHUNK:
        return np.bincount(flat, minlength=size).astype(np.int64, copy=False)
    counts = np.zeros(size, dtype=np.int64)
    step = 16 * CHUNK
    for begin in range(0, flat.size, step):
        part = np.bincount(flat[begin : begin + step], minlength=size)
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, np.int64)])
        counts[: part.size] += part
    return counts
