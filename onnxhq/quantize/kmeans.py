"""Weighted k-means in one dimension: k-means++ seeding and Lloyd's iteration on sorted weights.

Minimises ``sum_i h_i (w_i - c_{a(i)})^2``. Clusters are intervals of the sorted weights, so an
assignment step is one ``searchsorted`` of the k - 1 midpoints and an update step reads the
intervals' moments from prefix sums: O(k log n) per iteration however many weights there are.
Seeding is greedy k-means++ (as scikit-learn's): each new center is the best of a few candidates
drawn with probability proportional to ``h_i D(w_i)^2``; drawing and scoring a candidate also
use the prefix sums. (`quantize` starts Lloyd from a coarse DP partition by default instead, see
``init`` there, whose boundaries `refine` then moves to the best places nearby: in one dimension
that is as cheap and lands much nearer the optimum, so Lloyd stops after a few steps.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._sorted import SortedWeights, bounds_from_thresholds, drop_empty, interval_sums, means, sse

#: Candidates per boundary and level in `refine`: its cost grows as
#: k REFINE_WIDTH^2 log(m) / log(REFINE_WIDTH).
REFINE_WIDTH = 16
#: `refine` stops once candidates are this few weights apart: Lloyd's iteration converges fast
#: from there.
REFINE_FINEST = 64


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
    """Lloyd's iteration from ``centers`` (sorted, k <= distinct values) until the partition is
    stable.

    Stops when the partition repeats, when the objective falls by less than ``tol`` (relative) in
    one step, or after ``max_iter`` steps. Clusters that empty out are refilled by splitting the
    interval with the largest error, so the result keeps ``len(centers)`` clusters.
    """
    dtype = sw.values.dtype
    c = np.sort(np.asarray(centers, dtype=np.float64))
    prev_bounds, prev_obj = np.zeros(0, dtype=np.int64), np.inf
    for it in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        cuts = np.empty(c.size + 1, dtype=dtype)  # the k - 1 thresholds, between -inf and inf
        cuts[0], cuts[-1] = -np.inf, np.inf
        cuts[1:-1] = (c[1:] + c[:-1]) / 2
        bounds = sw.values.searchsorted(
            cuts, side="left"
        )  # 0 and m at the ends: weights are finite
        t = cuts[1:-1]
        if not (bounds[1:] > bounds[:-1]).all():
            t, bounds = _refill(sw, drop_empty(sw, t), c.size)
        c, obj = _update(sw, bounds)
        if bounds.size == prev_bounds.size and (bounds == prev_bounds).all():
            break
        if math.isfinite(prev_obj) and prev_obj - obj <= tol * prev_obj:
            break
        prev_bounds, prev_obj = bounds, obj
    return LloydResult(t, c, obj, it, np.diff(bounds))


def _update(sw: SortedWeights, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """The intervals' weighted means and the partition's objective ``sum h (w - mean)^2``.

    An interval's error ``S2 - 2 d S1 + d^2 S0`` about its mean (``d = S1 / S0`` from the shift) is
    ``S2 - d S1``: the short form keeps Lloyd's inner loop to a few numpy calls.
    """
    sums = interval_sums(sw, bounds)
    s0, s1, s2 = sums
    if not (s0 > 0).all():  # intervals of zero importance: see `means`
        c = means(sw, bounds, sums)
        return c, float(sse(sw, sums, c).sum())
    d = s1 / s0
    return d + sw.shift, float(np.maximum(s2 - d * s1, 0.0).sum())


def refine(
    sw: SortedWeights, bounds: np.ndarray, *, width: int = REFINE_WIDTH, finest: int = REFINE_FINEST
) -> np.ndarray:
    """Move the inner boundaries of a partition to the best places near them; never makes it worse.

    ``bounds`` (k + 1,) int64: 0, the inner boundaries (ascending, each at the start of a run of
    equal values), m; the same comes back. Level by level, each inner boundary gets ``width + 1``
    candidate positions ``step`` apart around it (its current one among them), and a DP over the
    candidates of all boundaries picks the best partition: O(k width^2) per level. ``step`` starts
    at the smaller neighbouring interval over ``width`` and shrinks ``width / 2``-fold per level,
    each window spanning the last one's neighbouring candidates, until it is at most ``finest``.
    From a coarse DP optimum that lands within ``finest`` weights of the best nearby partition, and
    Lloyd's iteration, which converges in a few steps from there, does the rest.
    """
    m, half = sw.size, width // 2
    b = np.asarray(bounds, dtype=np.int64)
    if b.size < 3:
        return b
    gaps = np.diff(b)
    step = np.maximum(np.minimum(gaps[:-1], gaps[1:]) // width, 1)
    offsets = np.arange(-half, half + 1)
    while True:
        cand = np.clip(b[1:-1, None] + step[:, None] * offsets, 1, m - 1)
        cand = sw.values.searchsorted(sw.values[cand], side="left")  # ties stay in one interval
        b = np.concatenate([[0], _best_path(sw, cand), [m]])
        if np.all(step <= finest):
            return b
        step = np.maximum(step // half, 1)


def _best_path(sw: SortedWeights, cand: np.ndarray) -> np.ndarray:
    """One position per row of ``cand`` ((k - 1, c), each row ascending): the best k intervals.

    The intervals' ``S2`` sum to a constant, so the least error is the largest ``sum S1^2 / S0``,
    which needs two moments. Interval ``j`` runs from row ``j - 1``'s choice to row ``j``'s.
    """
    m, rows = sw.size, np.arange(cand.shape[0])
    p = sw.prefix(np.append(cand.ravel(), m))[:2]
    total, p = p[:, -1], p[:, :-1].reshape(2, *cand.shape)
    first = np.where(cand[0] > 0, _explained(p[:, 0]), -np.inf)  # [0, cand[0, b])
    last = _explained(total[:, None] - p[:, -1])  # [cand[-1, a], m)
    inner = p[:, 1:, None, :] - p[:, :-1, :, None]  # (2, k - 2, c, c): [cand[j, a], cand[j + 1, b])
    links = np.where(cand[1:, None, :] > cand[:-1, :, None], _explained(inner), -np.inf)
    score, cols = first, np.arange(cand.shape[1])
    back = np.empty((links.shape[0], cand.shape[1]), dtype=np.intp)
    for j, link in enumerate(links):
        via = (
            link + score[:, None]
        )  # via[a, b]: best score ending at cand[j, a], then on to cand[j + 1, b]
        back[j] = via.argmax(axis=0)
        score = via[back[j], cols]
    pick = np.empty(cand.shape[0], dtype=np.intp)
    pick[-1] = np.argmax(score + last)
    for j in range(len(back) - 1, -1, -1):
        pick[j] = back[j, pick[j + 1]]
    return cand[rows, pick]


def _explained(s: np.ndarray) -> np.ndarray:
    """``S1^2 / S0`` of moments ``s`` (2, ...): the part of ``S2`` an interval's mean takes away
    (0 where ``S0`` is)."""
    out = np.zeros_like(s[1])
    np.divide(s[1] * s[1], s[0], out=out, where=s[0] > 0)
    return out


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
        mean = means(sw, bounds[j : j + 2], sums[:, j : j + 1])[0]
        p = int(np.clip(np.searchsorted(sw.values, mean, side="left"), lo[j] + 1, hi[j] - 1))
        p = int(np.searchsorted(sw.values, sw.values[p], side="left"))
        if p <= lo[j]:
            p = int(np.searchsorted(sw.values, sw.values[lo[j]], side="right"))
        t = np.sort(np.append(t, sw.values[p]))
    return t, bounds_from_thresholds(sw, t)


def seed_centers(
    sw: SortedWeights, k: int, rng: np.random.Generator, *, n_trials: int | None = None
) -> np.ndarray:
    """Greedy weighted k-means++: up to ``k`` distinct sorted centers drawn from the weights.

    Each step draws ``n_trials`` candidates (default ``2 + floor(ln k)``, as scikit-learn) with
    probability proportional to ``h_i D(w_i)^2`` and keeps the one that lowers the potential most.
    Fewer than ``k`` centers come back only when every weight of positive importance already sits
    on a center; Lloyd's refill then splits intervals.
    """
    n_trials = 2 + int(np.log(k)) if n_trials is None else n_trials
    m = sw.size
    u = rng.random() * sw.prefix([m])[0, 0]
    first = _search(
        sw, np.zeros(1, np.int64), np.full(1, m), np.zeros(1), np.array([u]), weight_only=True
    )[0]
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


def _gain(
    sw: SortedWeights, c: np.ndarray, bounds: np.ndarray, pot: np.ndarray, x: np.ndarray
) -> np.ndarray:
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


def _search(
    sw: SortedWeights,
    lo: np.ndarray,
    hi: np.ndarray,
    c: np.ndarray,
    target: np.ndarray,
    *,
    weight_only: bool = False,
    fan: int = 64,
) -> np.ndarray:
    """Per query, the position p in [lo, hi) where the running potential of ``[lo, p]`` passes
    target.

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
