"""Weighted k-means in one dimension: k-means++ seeding and Lloyd's iteration on sorted weights.

Minimises ``sum_i h_i (w_i - c_{a(i)})^2``. Clusters are intervals of the sorted weights, so an
assignment step is one ``searchsorted`` of the k - 1 midpoints and an update step reads the
intervals' moments from prefix sums: O(k log n) per iteration however many weights there are.
Seeding is greedy k-means++ (as scikit-learn's): each new center is the best of a few candidates
drawn with probability proportional to ``h_i D(w_i)^2``; drawing and scoring a candidate also
use the prefix sums. (`quantize` starts Lloyd from a coarse DP partition by default instead, see
``init`` there: in one dimension that is as cheap and lands much nearer the optimum.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._sorted import SortedWeights, bounds_from_thresholds, drop_empty, interval_sums, means, sse


@dataclass(frozen=True)
class LloydResult:
    """A partition of the sorted weights into intervals and the intervals' weighted means.

    Attributes
    ----------
    thresholds : (k - 1,) ndarray in the weights' dtype; weight ``x`` is in cluster
        ``searchsorted(thresholds, x, side="right")``.
    centers : (k,) float64 ndarray, ascending: the clusters' weighted means.
    objective : float, ``sum h (w - center)^2`` of the partition.
    iterations : int, assignment steps run.
    counts : (k,) int64 ndarray, weights per cluster.
    """

    thresholds: np.ndarray
    centers: np.ndarray
    objective: float
    iterations: int
    counts: np.ndarray


def lloyd(sw: SortedWeights, centers: np.ndarray, *, max_iter: int, tol: float) -> LloydResult:
    """Lloyd's iteration from ``centers`` (sorted, k <= distinct values) until the partition is stable.

    Stops when the partition repeats, when the objective falls by less than ``tol`` (relative) in
    one step, or after ``max_iter`` steps. Clusters that empty out are refilled by splitting the
    interval with the largest error, so the result keeps ``len(centers)`` clusters.
    """
    k, m, dtype = len(centers), sw.size, sw.values.dtype
    c = np.sort(np.asarray(centers, dtype=np.float64))
    prev_bounds, prev_obj = None, np.inf
    for it in range(1, max_iter + 1):
        t = ((c[1:] + c[:-1]) / 2).astype(dtype)
        bounds = np.empty(k + 1, dtype=np.int64)
        bounds[0], bounds[-1] = 0, m
        bounds[1:-1] = np.searchsorted(sw.values, t, side="left")
        if np.any(bounds[1:] == bounds[:-1]):
            t, bounds = _refill(sw, drop_empty(sw, t), k)
            k = len(bounds) - 1
        sums = interval_sums(sw, bounds)
        c = means(sw, bounds, sums)
        obj = float(sse(sw, sums, c).sum())
        if prev_bounds is not None and np.array_equal(bounds, prev_bounds):
            break
        if np.isfinite(prev_obj) and prev_obj - obj <= tol * prev_obj:
            break
        prev_bounds, prev_obj = bounds, obj
    return LloydResult(t, c, obj, it, np.diff(bounds))


def _refill(sw: SortedWeights, thresholds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the worst intervals (those with two or more distinct values) until there are k."""
    t = thresholds
    while len(t) < k - 1:
        bounds = bounds_from_thresholds(sw, t)
        sums = interval_sums(sw, bounds)
        err = sse(sw, sums, means(sw, bounds, sums))
        lo, hi = bounds[:-1], bounds[1:]
        splittable = sw.values[lo] < sw.values[hi - 1]
        if not np.any(splittable):
            break
        j = int(np.argmax(np.where(splittable, err, -1.0)))
        mean = means(sw, bounds[j:j + 2], sums[:, j:j + 1])[0]
        p = int(np.clip(np.searchsorted(sw.values, mean, side="left"), lo[j] + 1, hi[j] - 1))
        p = int(np.searchsorted(sw.values, sw.values[p], side="left"))
        if p <= lo[j]:
            p = int(np.searchsorted(sw.values, sw.values[lo[j]], side="right"))
        t = np.sort(np.append(t, sw.values[p]))
    return t, bounds_from_thresholds(sw, t)


def seed_centers(sw: SortedWeights, k: int, rng: np.random.Generator, *, n_trials: int | None = None) -> np.ndarray:
    """Greedy weighted k-means++: up to ``k`` distinct sorted centers drawn from the weights.

    Each step draws ``n_trials`` candidates (default ``2 + floor(ln k)``, as scikit-learn) with
    probability proportional to ``h_i D(w_i)^2`` and keeps the one that lowers the potential most.
    Fewer than ``k`` centers come back only when every weight of positive importance already sits
    on a center; Lloyd's refill then splits intervals.
    """
    n_trials = 2 + int(np.log(k)) if n_trials is None else n_trials
    m = sw.size
    u = rng.random() * sw.prefix([m])[0, 0]
    first = _search(sw, np.zeros(1, np.int64), np.full(1, m), np.zeros(1), np.array([u]), weight_only=True)[0]
    c = np.array([float(sw.values[first])])
    stalls = 0
    while len(c) < k and stalls < 3:
        bounds = _voronoi_bounds(sw, c)
        pot = sse(sw, interval_sums(sw, bounds), c)
        cum = np.cumsum(pot)
        if not cum[-1] > 0:
            break
        draws = rng.random(n_trials) * cum[-1]
        j = np.minimum(np.searchsorted(cum, draws, side="right"), len(c) - 1)
        rest = draws - np.concatenate([[0.0], cum])[j]
        cand = sw.values[_search(sw, bounds[j], bounds[j + 1], c[j], rest)].astype(np.float64)
        best = cand[int(np.argmin(_gain(sw, c, bounds, pot, cand)))]
        grown = np.unique(np.append(c, best))
        stalls = stalls + 1 if len(grown) == len(c) else 0
        c = grown
    return c


def _voronoi_bounds(sw: SortedWeights, c: np.ndarray) -> np.ndarray:
    """Bounds of each center's interval (empty ones kept, so interval j belongs to c[j])."""
    return bounds_from_thresholds(sw, (c[1:] + c[:-1]) / 2)


def _gain(sw: SortedWeights, c: np.ndarray, bounds: np.ndarray, pot: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Change of the potential when each candidate ``x`` joins the centers ``c``.

    A new center only takes weights from the intervals of its two neighbours, so each candidate
    costs four prefix-sum lookups.
    """
    i = np.searchsorted(c, x)
    cext = np.concatenate([[np.nan], c, [np.nan]])
    bext = np.concatenate([[0], bounds, [sw.size]])
    pext = np.concatenate([[0.0], pot, [0.0]])
    left, right = cext[i], cext[i + 1]
    lo, hi = bext[i], bext[i + 2]
    p1 = np.where(np.isnan(left), lo, np.clip(sw.positions((left + x) / 2), lo, hi))
    p2 = np.where(np.isnan(right), hi, np.clip(sw.positions((x + right) / 2), p1, hi))
    s = sw.prefix(np.concatenate([lo, p1, p2, hi])).reshape(3, 4, -1)
    parts = np.diff(s, axis=1)
    centers = np.stack([np.where(np.isnan(left), x, left), x, np.where(np.isnan(right), x, right)])
    d = centers - sw.shift
    new = np.maximum(parts[2] - 2 * d * parts[1] + d * d * parts[0], 0.0).sum(axis=0)
    return new - pext[i] - pext[i + 1]


def _search(sw: SortedWeights, lo: np.ndarray, hi: np.ndarray, c: np.ndarray, target: np.ndarray, *,
            weight_only: bool = False, fan: int = 64) -> np.ndarray:
    """Per query, the position p in [lo, hi) where the running potential of ``[lo, p]`` passes target.

    The running potential is ``sum h (w - c)^2`` (or ``sum h`` with ``weight_only``) from ``lo``;
    it is nondecreasing in p, so a vectorised search over all queries finds p, narrowing each
    bracket ``fan``-fold per round (log_fan n rounds of prefix lookups).
    """
    a = np.asarray(lo, np.int64).copy()
    b = np.asarray(hi, np.int64).copy()
    d = (np.asarray(c, np.float64) - sw.shift)[:, None]
    base = sw.prefix(a)[:, :, None]
    steps = np.arange(1, fan)[None, :]
    target = np.asarray(target, np.float64)[:, None]
    while np.any(b - a > 1):
        p = a[:, None] + ((b - a)[:, None] * steps) // fan
        s = sw.prefix(p.ravel()).reshape(3, *p.shape) - base
        run = s[0] if weight_only else s[2] - 2 * d * s[1] + d * d * s[0]
        n_go = np.count_nonzero(run <= target, axis=1)
        a_new = np.where(n_go > 0, p[np.arange(len(a)), np.maximum(n_go - 1, 0)], a)
        b = np.where(n_go < fan - 1, p[np.arange(len(a)), np.minimum(n_go, fan - 2)], b)
        a = np.maximum(a_new, a)
        b = np.where(b <= a, a + 1, b)
    return a
