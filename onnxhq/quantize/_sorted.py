"""Weights sorted once, with prefix sums: the shared core of every 1-D quantizer.

For fixed centers, the weighted squared error puts each weight with its nearest center, so in one
dimension every cluster is an interval of the sorted weights. Any interval's importance ``S0 = sum
h``, first moment ``S1 = sum h (w - shift)`` and second moment ``S2 = sum h (w - shift)^2`` are
differences of prefix sums, which makes one Lloyd step O(k log n) instead of O(n k).

Memory matters at tens of millions of weights, so prefix sums are kept only at block boundaries
(every ``block`` sorted weights) and the few weights inside a block are summed when queried; the
values stay in their input dtype (float32 stays float32). ``shift`` (the median) keeps ``S2 -
S1^2 / S0`` away from cancellation when weights sit far from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Up to this many weights, prefix sums are kept for every position (block of 1).
FULL_PREFIX_MAX = 1 << 22
#: Block length of the prefix sums beyond FULL_PREFIX_MAX.
BLOCK = 64
#: Elements per chunk when a pass over all weights would otherwise make float64 copies of them.
CHUNK = 1 << 22


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
    order : (m,) intp ndarray with ``values == w[order]``, kept up to FULL_PREFIX_MAX weights
        (then labels are a scatter, cheaper than a search); None beyond.
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

    def prefix(self, pos: np.ndarray) -> np.ndarray:
        """Moments ``(S0, S1, S2)`` of ``values[:p]`` for each ``p`` in ``pos``; shape (3, len(pos))."""
        pos = np.asarray(pos, dtype=np.int64)
        blk = pos // self.block
        out = self.cum[:, blk]
        if self.block == 1:
            return out
        offset = pos - blk * self.block
        lane = np.arange(self.block)
        inside = lane[None, :] < offset[:, None]
        idx = np.where(inside, blk[:, None] * self.block + lane[None, :], 0)
        v = self.values[idx].astype(np.float64) - self.shift
        h = inside.astype(np.float64)
        if self.weights is not None:
            h *= self.weights[idx]
        hv = h * v
        return out + np.stack([h.sum(axis=1), hv.sum(axis=1), (hv * v).sum(axis=1)])

    def positions(self, thresholds: np.ndarray) -> np.ndarray:
        """Number of weights below each threshold (thresholds are compared in the values' dtype)."""
        return np.searchsorted(self.values, np.asarray(thresholds).astype(self.values.dtype), side="left")

    def distinct(self) -> int:
        """Number of distinct values."""
        v, last = self.values, self.values.size - 1
        return 1 + sum(int(np.count_nonzero(v[s + 1:min(s + CHUNK, last) + 1] != v[s:min(s + CHUNK, last)]))
                       for s in range(0, last, CHUNK)) if v.size else 0

    def lossless_bits(self, extra: int = 0) -> float:
        """Entropy in bits of the distinct values' multiplicities, plus one symbol of ``extra`` counts.

        Runs of equal values are counted chunk by chunk, so no array of all run lengths is made.
        """
        v, total, carry = self.values, 0.0, 0
        for s in range(0, v.size, CHUNK):
            e = min(s + CHUNK, v.size)
            starts = np.flatnonzero(v[s + 1:e] != v[s:e - 1]) + 1
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
    """Sort ``w`` (1-D float32/float64, finite) with importances ``h`` (same length, or None)."""
    order = None
    if w.dtype == np.float32 and w.size <= FULL_PREFIX_MAX:  # carry the index: labels become a scatter
        values, order = _sort_f32(w, np.arange(w.size, dtype=np.uint32))
        order = order.astype(np.intp)
        weights = None if h is None else h[order]
    elif w.dtype == np.float32 and h is None:
        values, weights = np.sort(w), None
    elif w.dtype == np.float32:  # carry the importance's bits: no permutation, no gather (float64 h rounds)
        values, bits = _sort_f32(w, h.astype(np.float32, copy=False).view(np.uint32))
        weights = bits.view(np.float32).astype(h.dtype, copy=False)
    else:
        order = np.argsort(w, kind="stable")
        values, weights = w[order], None if h is None else h[order]
        order = order if w.size <= FULL_PREFIX_MAX else None
    m = values.size
    shift = float(values[m // 2]) if m else 0.0
    block = 1 if m <= FULL_PREFIX_MAX else BLOCK
    return SortedWeights(values, weights, shift, block, _block_prefix(values, weights, shift, block), order)


def _sort_f32(w: np.ndarray, tag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort float32 ``w`` carrying a 32-bit ``tag`` (an index, or the bits of an importance) along.

    Both go into one uint64 key, order-preserving bits of w above the tag: numpy's vectorised sort
    of uint64 is several times faster than an argsort, and a tag of importance bits saves the
    random-access gather of the importances (which matters at tens of millions of weights).
    """
    n = w.size
    wb = w.view(np.uint32)
    key = np.empty(n, dtype=np.uint64)
    halves = key.view(np.uint32).reshape(n, 2)
    lo, hi = (0, 1) if np.little_endian else (1, 0)
    buf = np.empty(min(n, CHUNK), dtype=np.uint32)
    for s in range(0, n, CHUNK):
        b, t = wb[s:s + CHUNK], buf[:min(CHUNK, n - s)]
        # Negative floats: flip all bits; positive: flip the sign bit. Then unsigned order = float order.
        np.right_shift(b, np.uint32(31), out=t)
        t *= np.uint32(0x7FFFFFFF)
        t += np.uint32(0x80000000)
        np.bitwise_xor(b, t, out=halves[s:s + CHUNK, hi])
        halves[s:s + CHUNK, lo] = tag[s:s + CHUNK]
    key.sort()
    values, tags = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.uint32)
    vb = values.view(np.uint32)
    for s in range(0, n, CHUNK):
        k, t = halves[s:s + CHUNK, hi], buf[:min(CHUNK, n - s)]
        np.right_shift(k, np.uint32(31), out=t)
        np.subtract(np.uint32(1), t, out=t)
        t *= np.uint32(0x7FFFFFFF)
        t += np.uint32(0x80000000)
        np.bitwise_xor(k, t, out=vb[s:s + CHUNK])
        tags[s:s + CHUNK] = halves[s:s + CHUNK, lo]
    return values, tags


def _block_prefix(values: np.ndarray, weights: np.ndarray | None, shift: float, block: int) -> np.ndarray:
    """Prefix sums of ``h, h (v - shift), h (v - shift)^2`` at block boundaries, in reused buffers."""
    nb = values.size // block
    cum = np.empty((3, nb + 1))
    cum[:, 0] = 0.0
    if block == 1:
        x = values.astype(np.float64)
        x -= shift
        if weights is None:
            cum[0, 1:] = 1.0
        else:
            np.copyto(cum[0, 1:], weights)
        np.multiply(cum[0, 1:], x, out=cum[1, 1:])
        np.multiply(cum[1, 1:], x, out=cum[2, 1:])
    else:
        step = max(1, CHUNK // block) * block
        x, h, p = np.empty(step), np.empty(step), np.empty(step)
        for s in range(0, nb * block, step):
            e = min(nb * block, s + step)
            xs, hs, ps, rows = x[:e - s], h[:e - s], p[:e - s], slice(s // block + 1, e // block + 1)
            np.copyto(xs, values[s:e])
            xs -= shift
            if weights is None:
                hs.fill(1.0)
            else:
                np.copyto(hs, weights[s:e])
            cum[0, rows] = hs.reshape(-1, block).sum(axis=1)
            np.multiply(hs, xs, out=ps)
            cum[1, rows] = ps.reshape(-1, block).sum(axis=1)
            ps *= xs
            cum[2, rows] = ps.reshape(-1, block).sum(axis=1)
    for row in cum:
        np.cumsum(row, out=row)
    return cum


def interval_sums(sw: SortedWeights, bounds: np.ndarray) -> np.ndarray:
    """Moments of the intervals ``[bounds[j], bounds[j + 1])``; shape (3, len(bounds) - 1)."""
    return np.diff(sw.prefix(bounds), axis=1)


def bounds_from_thresholds(sw: SortedWeights, thresholds: np.ndarray) -> np.ndarray:
    """Interval boundaries ``[0, positions..., m]`` for thresholds (weight >= threshold goes right)."""
    return np.concatenate([[0], sw.positions(thresholds), [sw.size]]).astype(np.int64)


def drop_empty(sw: SortedWeights, thresholds: np.ndarray) -> np.ndarray:
    """The thresholds (in the values' dtype) that separate nonempty intervals, ascending."""
    t = np.asarray(thresholds).astype(sw.values.dtype)
    pos = sw.positions(t)
    keep = (pos > 0) & (pos < sw.size)
    keep[1:] &= pos[1:] != pos[:-1]
    return t[keep]


def means(sw: SortedWeights, bounds: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Weighted mean of each (nonempty) interval; intervals of zero importance take their midrange."""
    s0, s1 = sums[0], sums[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = sw.shift + s1 / s0
    zero = ~(s0 > 0)
    if np.any(zero):
        lo, hi = bounds[:-1][zero], bounds[1:][zero] - 1
        c[zero] = (sw.values[lo].astype(np.float64) + sw.values[hi]) / 2
    return c


def sse(sw: SortedWeights, sums: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Weighted squared error of each interval around its center; shape (len(centers),)."""
    d = centers - sw.shift
    return np.maximum(sums[2] - 2 * d * sums[1] + d * d * sums[0], 0.0)
