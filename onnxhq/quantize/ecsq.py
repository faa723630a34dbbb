"""Iterative entropy-constrained scalar quantization (Chou, Lookabaugh & Gray 1989), weighted.

Minimises ``J = D + lam R`` with ``D = sum_i h_i (w_i - c_{a(i)})^2`` and ``R = sum_i l_{a(i)}``, the
ideal code length ``l_j = -log2(n_j / N)`` in bits. Each iteration assigns every weight to
``argmin_j h_i (w_i - c_j)^2 + lam l_j``, then sets each center to its cluster's weighted mean and
each length to the cluster's ideal code length, and drops empty clusters; ``J`` never rises.

Cells are not intervals of ``w`` when importances differ: the boundary between neighbours ``j``
and ``j + 1`` sits at ``(c_j + c_{j+1}) / 2 + lam (l_{j+1} - l_j) / (2 h_i (c_{j+1} - c_j))``, which
depends on ``h_i``. The assignment therefore works per weight, but it only scores the centers that
can win: from the nearest center ``j0`` (one searchsorted), any winner ``j`` must satisfy
``h_i (w_i - c_j)^2 <= cost(j0) - lam min(l)``, a window of centers found by two more searchsorted.
The work is O(n log k) plus the windows' total width, in chunks so memory stays O(chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._sorted import CHUNK


@dataclass(frozen=True)
class EcsqResult:
    """Centers (ascending), each weight's cluster, the clusters' sizes and the Lagrangian.

    Attributes
    ----------
    centers : (c,) float64 ndarray.
    labels : (n,) int32 ndarray, index into ``centers`` per weight.
    counts : (c,) int64 ndarray.
    objective : float, ``D + lam R``.
    iterations : int.
    """

    centers: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    objective: float
    iterations: int


def code_lengths(counts: np.ndarray, n_total: int) -> np.ndarray:
    """Ideal code lengths ``-log2(count / n_total)`` in bits."""
    return -np.log2(np.asarray(counts, dtype=np.float64) / n_total)


def ecsq(w: np.ndarray, h: np.ndarray | None, centers: np.ndarray, lengths: np.ndarray, *, lam: float,
         n_total: int, max_iter: int, tol: float) -> EcsqResult:
    """Iterate ECSQ from ``centers`` (ascending) with code ``lengths`` until ``J`` stops falling.

    ``w`` and ``h`` (None: all ones) are the weights that clustering may move; ``n_total`` is the
    number of all weights, pruned ones included (it only shifts every length by one constant).
    Stops when ``J`` falls by less than ``tol`` (relative), or after ``max_iter`` iterations.
    """
    c = np.asarray(centers, dtype=np.float64)
    pen = lam * np.asarray(lengths, dtype=np.float64)
    prev = np.inf
    for it in range(1, max_iter + 1):
        labels = _assign(w, h, c, pen)
        c, labels, counts, dist = _update(w, h, labels, len(c))
        pen = lam * code_lengths(counts, n_total)
        obj = dist + float(np.dot(counts, pen))
        if np.isfinite(prev) and prev - obj <= tol * prev:
            break
        prev = obj
    return EcsqResult(c, labels, counts, obj, it)


def _assign(w: np.ndarray, h: np.ndarray | None, c: np.ndarray, pen: np.ndarray) -> np.ndarray:
    labels = np.empty(w.size, dtype=np.int32)
    mids = (c[1:] + c[:-1]) / 2
    pmin, pbest = float(pen.min()), int(np.argmin(pen))
    for s in range(0, w.size, CHUNK):
        x = w[s:s + CHUNK].astype(np.float64)
        hh = np.ones_like(x) if h is None else h[s:s + CHUNK].astype(np.float64)
        best = np.searchsorted(mids, x, side="right")
        d = x - c[best]
        cost = hh * d * d + pen[best]
        free = hh > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(free, np.sqrt(np.maximum(cost - pmin, 0.0) / hh), 0.0) * (1 + 1e-12)
        lo = np.searchsorted(c, x - r, side="left")
        width = np.searchsorted(c, x + r, side="right") - lo
        best[~free] = pbest
        act = np.flatnonzero(free & (width > 1))
        lo, width, step = lo[act], width[act], 0
        while act.size:
            j = lo + step
            cand = hh[act] * (x[act] - c[j]) ** 2 + pen[j]
            better = cand < cost[act]
            cost[act[better]], best[act[better]] = cand[better], j[better]
            step += 1
            more = width > step
            act, lo, width = act[more], lo[more], width[more]
        labels[s:s + CHUNK] = best
    return labels


def _update(w: np.ndarray, h: np.ndarray | None, labels: np.ndarray, k: int):
    """Centers as weighted means of the nonempty clusters (ascending), relabelled; their sizes and D."""
    counts = np.zeros(k, dtype=np.int64)
    s0, s1, sw = np.zeros(k), np.zeros(k), np.zeros(k)
    for s in range(0, w.size, CHUNK):
        lab, x = labels[s:s + CHUNK], w[s:s + CHUNK].astype(np.float64)
        hh = np.ones_like(x) if h is None else h[s:s + CHUNK].astype(np.float64)
        counts += np.bincount(lab, minlength=k)
        s0 += np.bincount(lab, weights=hh, minlength=k)
        s1 += np.bincount(lab, weights=hh * x, minlength=k)
        sw += np.bincount(lab, weights=x, minlength=k)
    keep = counts > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(s0 > 0, s1 / s0, sw / np.maximum(counts, 1))[keep]
    order = np.argsort(c, kind="stable")
    relabel = np.full(k, -1, dtype=np.int32)
    relabel[np.flatnonzero(keep)[order]] = np.arange(order.size, dtype=np.int32)
    labels = relabel[labels]
    c, counts = c[order], counts[keep][order]
    dist = 0.0
    for s in range(0, w.size, CHUNK):
        x = w[s:s + CHUNK].astype(np.float64)
        e = (x - c[labels[s:s + CHUNK]]) ** 2
        dist += float(e.sum() if h is None else np.dot(h[s:s + CHUNK].astype(np.float64), e))
    return c, labels, counts, dist
