"""Weights sorted once, with prefix sums: the shared core of every 1-D quantizer.

For fixed centers, the weighted squared error puts each weight with its nearest center, so in one
dimension every cluster is an interval of the sorted weights. Any interval's importance ``S0 = sum
h``, first moment ``S1 = sum h (w - shift)`` and second moment ``S2 = sum h (w - shift)^2`` are
differences of prefix sums, which makes one Lloyd step O(k log n) instead of O(n k).

Prefix sums are kept at block boundaries (every ``block`` sorted weights), and the few weights
inside a block are summed when queried: building them is a few passes over the weights, memory
stays small at tens of millions of weights, and the values stay in their input dtype (float32
stays float32). ``shift`` (the median) keeps ``S2 - S1^2 / S0`` away from cancellation when
weights sit far from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Up to this many weights, a sort that makes a permutation keeps it (labels are then a scatter).
ORDER_MAX = 1 << 22
#: Positions between stored prefix sums.
BLOCK = 32
#: Elements per chunk when a pass over all weights would otherwise make float64 copies of them.
CHUNK = 1 << 22
#: Elements per chunk of the passes that make float64 temporaries (prefix sums, labels).
PASS_CHUNK = 1 << 16


@dataclass(frozen=True, eq=False)
class SortedWeights:
    """Weights in ascending order with their importances and block prefix sums.

    Attributes
    ----------
    values : (m,) float32 or float64 ndarray, ascending.
    weights : (m,) ndarray of importances in the same order, or None for all ones.
    shift : float, subtracted from the values inside the moments.
    block : int, positions between stored prefix sums.
    cum : (3, m // block + 1) float64 ndarray, ``S0, S1, S2`` of ``values[:j * block]``.
    order : (m,) intp ndarray with ``values == w[order]`` where the sort made one (see
        `sort_weights`) and ``m <= ORDER_MAX``; else None.
    """

    values: np.ndarray
    weights: np.ndarray | None
    shift: float
    block: int
    cum: np.ndarray
    order: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.values.size)

    def prefix(self, pos: np.ndarray | list[int]) -> np.ndarray:
        """Moments ``(S0, S1, S2)`` of ``values[:p]`` for each ``p`` in ``pos``: (3, len(pos))."""
        pos = np.asarray(pos, dtype=np.int64)
        if not self.size:
            return np.zeros((3, pos.size))
        start = pos - pos % self.block
        lane = np.arange(self.block)
        idx = np.minimum(
            start[:, None] + lane, self.size - 1
        )  # (len(pos), block): the block from start
        h = (lane < (pos - start)[:, None]).astype(np.float64)  # only the weights before p count
        if self.weights is not None:
            h *= self.weights[idx]
        x = self.values[idx].astype(np.float64) - self.shift
        hx = h * x
        inside = np.stack([h.sum(axis=1), hx.sum(axis=1), np.einsum("ij,ij->i", hx, x)])
        return self.cum[:, start // self.block] + inside

    def positions(self, thresholds: np.ndarray) -> np.ndarray:
        """Number of weights below each threshold (thresholds are compared in the values' dtype)."""
        return np.searchsorted(
            self.values, np.asarray(thresholds).astype(self.values.dtype), side="left"
        )

    def distinct(self) -> int:
        """Number of distinct values."""
        v, last = self.values, self.values.size - 1
        return (
            1
            + sum(
                int(
                    np.count_nonzero(
                        v[s + 1 : min(s + CHUNK, last) + 1] != v[s : min(s + CHUNK, last)]
                    )
                )
                for s in range(0, last, CHUNK)
            )
            if v.size
            else 0
        )

    def lossless_bits(self, extra: int = 0) -> float:
        """Entropy in bits of the distinct values' multiplicities, with a symbol of ``extra``
        counts.

        Runs of equal values are counted chunk by chunk, so no array of all run lengths is made.
        """
        v, total, carry = self.values, 0.0, 0
        for s in range(0, v.size, CHUNK):
            e = min(s + CHUNK, v.size)
            starts = np.flatnonzero(v[s + 1 : e] != v[s : e - 1]) + 1
            runs = np.diff(np.concatenate([[0], starts, [e - s]])).astype(np.float64)
            runs[0] += carry
            carry = 0
            if e < v.size and v[e] == v[e - 1]:
                carry, runs = int(runs[-1]), runs[:-1]
            total += float(np.dot(runs, np.log2(runs)))
        n = v.size + extra
        total += extra * np.log2(extra) if extra else 0.0
        return max(float(np.log2(n) - total / n), 0.0) if n else 0.0


def sort_weights(w: np.ndarray, h: np.ndarray | None) -> SortedWeights:
    """Sort ``w`` (1-D float32/float64, finite) with importances ``h`` (same length, or None).

    float32 weights need no permutation: their labels come from `labels_f32`, and float32
    importances (or, beyond ORDER_MAX, float64 ones rounded to float32) ride along in the sort.
    Only float64 importances up to ORDER_MAX, and float64 weights, are gathered.
    """
    order = None
    if w.dtype == np.float32 and h is None:
        values, weights = np.sort(w), None
    elif w.dtype == np.float32 and h is not None and (h.dtype == np.float32 or w.size > ORDER_MAX):
        values, bits = _sort_f32(w, h.astype(np.float32, copy=False).view(np.uint32), stable=False)
        weights = bits.view(np.float32).astype(h.dtype, copy=False)
    elif w.dtype == np.float32 and h is not None:  # float64 importances, kept exact: gather them
        values, order = _sort_f32(w, np.arange(w.size, dtype=np.uint32), stable=True)
        order = order.astype(np.intp)
        weights = h[order]
    else:
        order = np.argsort(w, kind="stable")
        values, weights = w[order], None if h is None else h[order]
        order = order if w.size <= ORDER_MAX else None
    m = values.size
    shift = float(values[m // 2]) if m else 0.0
    return SortedWeights(
        values, weights, shift, BLOCK, _block_prefix(values, weights, shift, BLOCK), order
    )


def _sort_f32(w: np.ndarray, tag: np.ndarray, *, stable: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sort float32 ``w`` carrying a 32-bit ``tag`` (an index, or the bits of an importance) along.

    Returns ``(values, tags)``, both (n,), ascending by value; ``-0.0`` comes back as 0.0. With
    ``stable``, ties are ascending by tag, so index tags give exactly the order of
    ``np.argsort(w, kind="stable")``; without, ties among negative values are descending by tag.

    Each pair becomes one float64 key, w's bits above the tag's: finite float32 bits as the top half
    of a float64 give a non-NaN number of the same sign and order (larger bits are smaller numbers
    where w < 0, hence the tag's bits are inverted there for ``stable``). numpy's vectorised sort of
    float64 beats its uint64 sort and, several times over, an argsort; a tag of importance bits
    saves the random-access gather of the importances.

    The keys, then the values and tags unpacked beside them, share one allocation that lives as long
    as the values: releasing arrays as large as the weights on every call lets malloc hand their
    pages back to the system, and faulting them in again on the next call costs more than the sort.
    """
    n = w.size
    buf = np.empty(2 * n, dtype=np.float64)
    key = buf[:n]
    halves = key.view(np.uint32).reshape(n, 2)
    lo, hi = (0, 1) if np.little_endian else (1, 0)
    sign = np.empty(
        min(n, CHUNK) if stable else 0, dtype=np.int32
    )  # 0, or -1 (all bits set) where w < 0
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        top = halves[s:e, hi]
        np.add(w[s:e], np.float32(0.0), out=top.view(np.float32))  # -0.0 + 0.0 is 0.0
        if stable:
            np.right_shift(top.view(np.int32), 31, out=sign[: e - s])
            np.bitwise_xor(tag[s:e], sign[: e - s].view(np.uint32), out=halves[s:e, lo])
        else:
            halves[s:e, lo] = tag[s:e]
    key.sort()
    unpacked = buf[n:].view(np.uint32)
    values, tags = unpacked[:n].view(np.float32), unpacked[n:]
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        np.copyto(values[s:e].view(np.uint32), halves[s:e, hi])
        if stable:
            np.right_shift(values[s:e].view(np.int32), 31, out=sign[: e - s])
            np.bitwise_xor(halves[s:e, lo], sign[: e - s].view(np.uint32), out=tags[s:e])
        else:
            tags[s:e] = halves[s:e, lo]
    return values, tags


def _block_prefix(
    values: np.ndarray, weights: np.ndarray | None, shift: float, block: int
) -> np.ndarray:
    """Moments of ``values[:j * block]`` for each ``j``: shape (3, m // block + 1).

    Each block's sums are one ``einsum`` over a (blocks, block) view, chunk by chunk: the float64
    temporaries stay small (in cache, and never a fresh allocation as large as the weights).
    """
    nb = values.size // block
    cum = np.empty((3, nb + 1))
    cum[:, 0] = 0.0
    step = max(1, PASS_CHUNK // block) * block
    for s in range(0, nb * block, step):
        e = min(nb * block, s + step)
        rows = slice(s // block + 1, e // block + 1)
        x = values[s:e].astype(np.float64).reshape(-1, block)
        x -= shift
        if weights is None:
            cum[0, rows], hx = block, x
        else:
            h = weights[s:e].reshape(-1, block)
            np.einsum("ij->i", h, out=cum[0, rows], dtype=np.float64)
            hx = h * x
        np.einsum("ij->i", hx, out=cum[1, rows])
        np.einsum("ij,ij->i", hx, x, out=cum[2, rows])
    for row in cum:
        np.cumsum(row, out=row)
    return cum


def interval_sums(sw: SortedWeights, bounds: np.ndarray) -> np.ndarray:
    """Moments of the intervals ``[bounds[j], bounds[j + 1])``; shape (3, len(bounds) - 1)."""
    p = sw.prefix(bounds)
    return p[:, 1:] - p[:, :-1]


def bounds_from_thresholds(sw: SortedWeights, thresholds: np.ndarray) -> np.ndarray:
    """Interval boundaries ``[0, positions..., m]`` of thresholds (weights >= a threshold go
    right)."""
    return np.concatenate([[0], sw.positions(thresholds), [sw.size]]).astype(np.int64)


def drop_empty(sw: SortedWeights, thresholds: np.ndarray) -> np.ndarray:
    """The thresholds (in the values' dtype) that separate nonempty intervals, ascending."""
    t = np.asarray(thresholds).astype(sw.values.dtype)
    pos = sw.positions(t)
    keep = (pos > 0) & (pos < sw.size)
    keep[1:] &= pos[1:] != pos[:-1]
    return t[keep]


def means(sw: SortedWeights, bounds: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Weighted mean of each (nonempty) interval; one of zero importance takes its midrange."""
    s0, s1 = sums[0], sums[1]
    weighed = s0 > 0
    if weighed.all():
        return s1 / s0 + sw.shift
    c = np.divide(s1, s0, out=np.zeros_like(s1), where=weighed) + sw.shift
    zero = ~weighed
    lo, hi = bounds[:-1][zero], bounds[1:][zero] - 1
    c[zero] = (sw.values[lo].astype(np.float64) + sw.values[hi]) / 2
    return c


def sse(sw: SortedWeights, sums: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Weighted squared error of each interval around its center; shape (len(centers),)."""
    d = centers - sw.shift
    return np.maximum(sums[2] - 2 * d * sums[1] + d * d * sums[0], 0.0)


def labels_f32(w: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``searchsorted(thresholds, w, side="right")`` as int32, for float32 ``w`` and ``thresholds``.

    The top 16 bits of a float32 (sign, exponent, 7 mantissa bits) name a bucket, an interval of
    the line. A bucket with no threshold in it gives all its weights one label, read from a table
    of 2^16 entries; only the weights in the other (at most ``len(thresholds)``) buckets are
    searched.
    """
    t = np.asarray(thresholds, dtype=np.float32)
    first = (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)).view(
        np.float32
    )  # a float in each bucket
    with np.errstate(invalid="ignore"):  # NaN buckets, which hold no finite weight
        table = np.searchsorted(t, first, side="right").astype(np.int32)
    table[t.view(np.uint32) >> np.uint32(16)] = -1
    if np.any(t == 0):  # 0.0 and -0.0 are equal, and in two buckets
        table[[0x0000, 0x8000]] = -1
    out = np.empty(w.size, dtype=np.int32)
    bucket = np.empty(min(w.size, PASS_CHUNK), dtype=np.uint32)
    for s in range(0, w.size, PASS_CHUNK):
        e = min(w.size, s + PASS_CHUNK)
        b = bucket[: e - s]
        np.right_shift(w[s:e].view(np.uint32), np.uint32(16), out=b)
        np.take(table, b, out=out[s:e], mode="clip")  # always in range; mode "raise" would buffer
        mixed = s + np.flatnonzero(out[s:e] < 0)
        out[mixed] = np.searchsorted(t, w[mixed], side="right")
    return out
