"""Exact optima by dynamic programming over the sorted weights (Wang & Song's Ckmeans.1d.dp idea).

**k-means.** ``F[j][b] = min_a F[j-1][a] + D(a, b)``, where ``D(a, b)`` is the weighted squared
error of units ``a..b-1`` around their weighted mean. ``D`` obeys the quadrangle inequality, so
the best ``a`` is nondecreasing in ``b`` and each layer is solved by divide and conquer in
O(m log m), vectorised across all subproblems of one recursion depth: O(k m log m) in all. Up to
``DENSE_UNITS`` units a layer is instead one vectorised minimum over all pairs (fewer numpy calls).

**ECSQ.** ``F[b] = min_a F[a] + D(a, b) + lam * n_ab * log2(N / n_ab)``: the entropy term breaks the
quadrangle inequality, so this one is the plain O(m^2) recursion (run on at most
``ECSQ_UNITS`` units). With equal importances the optimum over interval partitions is the exact
ECSQ optimum; with unequal ones the iterative ECSQ may leave intervals and go lower still.

**Units.** Up to ``max_units`` sorted weights the units are the weights themselves and the DP is
exact. Beyond, units are bins: the union of equal-width and equal-count bins, so each bin is both
narrow and light. Restricting boundaries to bin edges costs at most (see `make_units`)

    bound = (max w - min w) * max_b (r_b * H_b)

with ``r_b`` the value range and ``H_b`` the importance of bin ``b``. Take the true optimum and
move each boundary that falls inside a bin to that bin's cheaper edge, keeping the centers. The
two possible moves cost ``2 (c_B - c_A) sum_bin h |w - mid|`` together (``mid`` between the
centers ``c_A < c_B`` lies in the bin, so ``|w - mid| <= r_b``), hence the cheaper one at most
``(c_B - c_A) r_b H_b``; the gaps ``c_B - c_A`` sum to at most the range of the weights. The
result respects bin edges and costs at most ``bound`` more, and the DP finds the best such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._sorted import SortedWeights

#: Default number of DP units for k-means (bins beyond this many weights).
KMEANS_UNITS = 1 << 16
#: Up to this many units, each k-means layer is one dense (u x u) minimum instead of divide and
#: conquer.
DENSE_UNITS = 512
#: Default number of DP units for the O(m^2) ECSQ recursion.
ECSQ_UNITS = 1 << 12


@dataclass(frozen=True)
class Units:
    """Consecutive runs of sorted weights that the DP keeps together.

    Attributes
    ----------
    bounds : (u + 1,) int64 ndarray, positions in the sorted weights where units start (and m).
    cum : (3, u + 1) float64 ndarray, moments ``S0, S1, S2`` (about ``shift``) up to each bound.
    shift : float.
    loss_bound : float, most the optimum over bin edges can exceed the true optimum (0 if exact).
    """

    bounds: np.ndarray
    cum: np.ndarray
    shift: float
    loss_bound: float

    @property
    def size(self) -> int:
        return len(self.bounds) - 1


def make_units(sw: SortedWeights, max_units: int) -> Units:
    """Single weights when there are at most ``max_units``, else equal-width + equal-count bins."""
    m, v = sw.size, sw.values
    if m <= max_units:
        bounds = np.arange(m + 1, dtype=np.int64)
    else:
        half = max(max_units // 2, 1)
        width = v[0] + (np.float64(v[-1]) - v[0]) * np.arange(1, half) / half
        count = v[(np.arange(1, half) * m) // half]
        edges = np.concatenate([width.astype(v.dtype), count])
        bounds = np.unique(np.concatenate([[0], sw.positions(edges), [m]])).astype(np.int64)
    cum = sw.prefix(bounds)
    spread = v[bounds[1:] - 1].astype(np.float64) - v[bounds[:-1]]
    loss = float((np.float64(v[-1]) - v[0]) * np.max(spread * np.diff(cum[0]))) if m else 0.0
    return Units(bounds, cum, sw.shift, loss)


def _sse(cum: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s0 = cum[0, b] - cum[0, a]
    s1 = cum[1, b] - cum[1, a]
    s2 = cum[2, b] - cum[2, a]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = s2 - s1 * s1 / s0
    return np.where(s0 > 0, np.maximum(d, 0.0), 0.0)


def kmeans_dp(units: Units, k: int) -> np.ndarray:
    """Unit boundaries ``(k + 1,)`` of the optimal partition of the units into ``k`` intervals."""
    u, cum = units.size, units.cum
    idx = np.arange(u + 1)
    f = _sse(cum, np.zeros_like(idx), idx)
    f[0] = 0.0
    opt = np.zeros((k + 1, u + 1), dtype=np.int32)
    dense = _dense_costs(cum, u) if u <= DENSE_UNITS else None
    for j in range(2, k + 1):
        g = np.full(u + 1, np.inf)
        if dense is not None and j < k:
            val = dense[j:, j - 1 :] + f[j - 1 :]  # val[b - j, a - j + 1] = F[j-1][a] + D(a, b)
            best = np.argmin(val, axis=1)
            opt[j, j:] = best + j - 1
            g[j:] = val[np.arange(best.size), best]
        elif j == k:
            a = np.arange(k - 1, u)
            val = f[a] + _sse(cum, a, np.full_like(a, u))
            best = int(np.argmin(val))
            g[u], opt[j, u] = val[best], a[best]
        else:
            _layer(f, g, opt[j], cum, j, u)
        f = g
    out = [u]
    for j in range(k, 1, -1):
        out.append(int(opt[j, out[-1]]))
    out.append(0)
    return np.array(out[::-1], dtype=np.int64)


def _dense_costs(cum: np.ndarray, u: int) -> np.ndarray:
    """``out[b, a] = D(a, b)`` for all unit pairs, ``inf`` where ``a >= b``: (u + 1, u + 1)."""
    b, a = np.tril_indices(u + 1, k=-1)
    out = np.full((u + 1, u + 1), np.inf)
    out[b, a] = _sse(cum, a, b)
    return out


def _layer(f: np.ndarray, g: np.ndarray, opt: np.ndarray, cum: np.ndarray, j: int, u: int) -> None:
    """One DP layer, divide and conquer: ``g[b] = min_{a in [j-1, b-1]} f[a] + D(a, b)``, b >= j."""
    b_lo, b_hi = np.array([j]), np.array([u])
    o_lo, o_hi = np.array([j - 1]), np.array([u - 1])
    while b_lo.size:
        mid = (b_lo + b_hi) // 2
        a_hi = np.minimum(o_hi, mid - 1)
        lens = a_hi - o_lo + 1
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        seg = np.repeat(np.arange(lens.size), lens)
        a = np.arange(lens.sum()) - np.repeat(starts - o_lo, lens)
        val = f[a] + _sse(cum, a, mid[seg])
        low = np.minimum.reduceat(val, starts)
        hit = np.flatnonzero(val <= low[seg])
        first = hit[np.concatenate([[True], seg[hit][1:] != seg[hit][:-1]])]
        best = a[first]
        g[mid], opt[mid] = low, best
        left = b_lo <= mid - 1
        right = mid + 1 <= b_hi
        b_lo, b_hi = (
            np.concatenate([b_lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, b_hi[right]]),
        )
        o_lo, o_hi = (
            np.concatenate([o_lo[left], best[right]]),
            np.concatenate([best[left], o_hi[right]]),
        )


def ecsq_dp(units: Units, lam: float, n_total: int) -> np.ndarray:
    """Unit boundaries of the interval partition minimising
    ``D + lam * sum_j n_j log2(n_total / n_j)``."""
    u, cum = units.size, units.cum
    count = units.bounds.astype(np.float64)
    f = np.zeros(u + 1)
    arg = np.zeros(u + 1, dtype=np.int64)
    for b in range(1, u + 1):
        a = np.arange(b)
        n = count[b] - count[a]
        val = f[a] + _sse(cum, a, np.full_like(a, b)) + lam * n * np.log2(n_total / n)
        best = int(np.argmin(val))
        f[b], arg[b] = val[best], best
    out = [u]
    while out[-1] > 0:
        out.append(int(arg[out[-1]]))
    return np.array(out[::-1], dtype=np.int64)
