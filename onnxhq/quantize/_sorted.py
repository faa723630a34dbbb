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
    """

    values: np.ndarray
    weights: np.ndarray | None
    shift: float
    block: int
    cum: np.ndarray

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
        h = inside.astype(np.float64) if self.weights is None else np.where(inside, self.weights[idx], 0.0)
        hv = h * v
        return out + np.stack([h.sum(axis=1), hv.sum(axis=1), (hv * v).sum(axis=1)])

    def positions(self, thresholds: np.ndarray) -> np.ndarray:
        """Number of weights below each threshold (thresholds are compared in the values' dtype)."""
        return np.searchsorted(self.values, np.asarray(thresholds).astype(self.values.dtype), side="left")

    def distinct(self) -> int:
        """Number of distinct values."""
        v = self.values
        return int(np.count_nonzero(v[1:] != v[:-1])) + 1 if v.size else 0


def sort_weights(w: np.ndarray, h: np.ndarray | None) -> SortedWeights:
    """Sort ``w`` (1-D float32/float64, finite) with importances ``h`` (same length, or None)."""
    if h is None:
        values, weights = np.sort(w), None
    elif w.dtype == np.float32 and h.dtype == np.float32:
        values, weights = _sort_pairs_f32(w, h)
    else:
        order = np.argsort(w, kind="stable")
        values, weights = w[order], h[order]
    m = values.size
    shift = float(values[m // 2]) if m else 0.0
    block = 1 if m <= FULL_PREFIX_MAX else BLOCK
    return SortedWeights(values, weights, shift, block, _block_prefix(values, weights, shift, block))


def _sort_pairs_f32(w: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort float32 pairs by ``w`` as one uint64 key: order-preserving bits of w, then h's bits.

    numpy's vectorised sort of uint64 is several times faster than an argsort followed by two
    random-access gathers, and needs no int64 permutation array.
    """
    n = w.size
    wb, hb = w.view(np.uint32), h.view(np.uint32)
    key = np.empty(n, dtype=np.uint64)
    for s in range(0, n, CHUNK):
        b = wb[s:s + CHUNK]
        flip = np.where(b >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
        k = (b ^ flip).astype(np.uint64)
        k <<= np.uint64(32)
        k |= hb[s:s + CHUNK]
        key[s:s + CHUNK] = k
    key.sort()
    values = np.empty(n, dtype=np.float32)
    weights = np.empty(n, dtype=np.float32)
    vb, wt = values.view(np.uint32), weights.view(np.uint32)
    for s in range(0, n, CHUNK):
        k = key[s:s + CHUNK]
        hi = (k >> np.uint64(32)).astype(np.uint32)
        vb[s:s + CHUNK] = hi ^ np.where(hi >> np.uint32(31), np.uint32(0x80000000), np.uint32(0xFFFFFFFF))
        wt[s:s + CHUNK] = k.astype(np.uint32)
    return values, weights


def _block_prefix(values: np.ndarray, weights: np.ndarray | None, shift: float, block: int) -> np.ndarray:
    nb = values.size // block
    cum = np.zeros((3, nb + 1))
    step = max(1, CHUNK // block)
    for s in range(0, nb, step):
        e = min(nb, s + step)
        v = values[s * block:e * block].astype(np.float64).reshape(-1, block)
        v -= shift
        if weights is None:
            h = np.ones_like(v)
        else:
            h = weights[s * block:e * block].astype(np.float64).reshape(-1, block)
        hv = h * v
        cum[0, s + 1:e + 1] = h.sum(axis=1)
        cum[1, s + 1:e + 1] = hv.sum(axis=1)
        cum[2, s + 1:e + 1] = (hv * v).sum(axis=1)
    np.cumsum(cum, axis=1, out=cum)
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
