"""The codeword each entry takes, ``argmin_j a * (x - c_j)^2 + p_j``, for many entries at once.

`onnxhq.compensate` asks this for every entry of a column (a whole Conv-group stack of them),
thousands of times per layer, with codebooks of up to thousands of codewords. Evaluating every
codeword costs entries x codewords per column; `SortedCells` keeps each codebook row's live
codewords sorted by value and evaluates only a window that provably holds the minimum: with
``j0`` the nearer of the two codewords around ``x`` and ``C0`` its cost, a codeword ``j`` can
only tie or win where ``a * (x - c_j)^2 <= C0 - min(p)``, an interval around ``x`` found by
bisection. The costs in the window are computed with the same expression as the full search, and
ties go to the smallest codeword index (as ``numpy.argmin`` over all codewords), so the choice
equals the full search's. Pure numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Entries x codewords up to which `SortedCells.best` evaluates every codeword (fewer numpy
#: calls than the window, which pays for larger codebooks).
FULL = 8192
#: Relative slack on the window's radius, far above the rounding of the costs (so a codeword the
#: full search would pick on a rounding tie stays inside).
_SLACK = 1e-9


class Penalties(NamedTuple):
    """The rate term of each codeword: ``full`` (rows, k), ``ordered`` like `SortedCells.values`
    (inf past each row's count), ``least`` (rows,) each row's smallest."""

    full: np.ndarray
    ordered: np.ndarray
    least: np.ndarray


class SortedCells:
    """The live codewords of a codebook (``rows`` x ``k`` values), each row sorted by value.

    Parameters
    ----------
    book : (rows, k) float codeword values.
    live : (rows, k) bool, the codewords an entry of that row may take.
    """

    def __init__(self, book: np.ndarray, live: np.ndarray) -> None:
        book = np.asarray(book, np.float64)
        self.book = book
        masked = np.where(live, book, np.inf)
        order = np.argsort(masked, axis=1, kind="stable")
        self.count = np.count_nonzero(live, axis=1)
        width = max(int(self.count.max(initial=0)), 1)
        self.values = np.take_along_axis(masked, order, axis=1)[:, :width]
        self.index = order[:, :width]
        self.k = book.shape[1]

    def penalties(self, pen: np.ndarray) -> Penalties:
        """``pen`` (rows, k; inf for dead codewords) as `best` reads it."""
        pen = np.asarray(pen, np.float64)
        sorted_pen = np.take_along_axis(pen, self.index, axis=1)
        sorted_pen[np.arange(self.values.shape[1]) >= self.count[:, None]] = np.inf
        return Penalties(pen, sorted_pen, sorted_pen.min(axis=1))

    def best(self, x: np.ndarray, a: np.ndarray, rows: np.ndarray, pen: Penalties) -> np.ndarray:
        """(N,) codeword index minimising ``a * (x - c_j)^2 + p_j`` over the live codewords of
        each entry's row (smallest index on ties).

        ``x``, ``a`` (>= 0; 0 searches the whole row), ``rows``: (N,); ``pen``: `penalties`.
        Every row in ``rows`` has a live codeword.
        """
        if len(x) * self.k <= FULL:  # every codeword, as the reference does
            cost = a[:, None] * np.square(x[:, None] - self.book[rows]) + pen.full[rows]
            return np.argmin(cost, axis=1)
        width = self.values.shape[1]
        v, p, ix = self.values.ravel(), pen.ordered.ravel(), self.index.ravel()
        base = rows * width
        n = self.count[rows]
        pos = self._count_below(x, rows, side="left")
        lo, hi = np.maximum(pos - 1, 0), np.minimum(pos, n - 1)  # the codewords around x
        c_lo = a * np.square(x - v.take(base + lo)) + p.take(base + lo)
        c_hi = a * np.square(x - v.take(base + hi)) + p.take(base + hi)
        j_lo, j_hi = ix.take(base + lo), ix.take(base + hi)
        upper = (c_hi < c_lo) | ((c_hi == c_lo) & (j_hi < j_lo))
        choice = np.where(upper, j_hi, j_lo)
        c0 = np.minimum(c_lo, c_hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            slack = c0 - pen.least[rows] + _SLACK * np.abs(c0)
            rad = np.where(a > 0, np.sqrt(np.maximum(slack, 0.0) / a), np.inf) * (1 + _SLACK)
            rad = np.where(np.isnan(rad), np.inf, rad)
        # entries whose window reaches past the two codewords around x
        wide = (lo > 0) & (v.take(base + np.maximum(lo - 1, 0)) >= x - rad)
        wide |= (hi < n - 1) & (v.take(base + np.minimum(hi + 1, width - 1)) <= x + rad)
        if np.any(wide):
            e = np.flatnonzero(wide)
            left = np.minimum(self._count_below(x[e] - rad[e], rows[e], side="left"), lo[e])
            right = np.minimum(self._count_below(x[e] + rad[e], rows[e], side="right"), n[e])
            choice[e] = self._window(x[e], a[e], base[e], p, left, np.maximum(right, hi[e] + 1))
        return choice

    def _window(self, x, a, base, p, left, right) -> np.ndarray:
        """The best codeword among sorted positions ``[left, right)`` of each entry."""
        at = left[:, None] + np.arange(int(np.max(right - left)))
        inside = at < right[:, None]
        at = np.minimum(at, right[:, None] - 1)  # (live codewords only: no inf * 0)
        flat = base[:, None] + at
        cost = a[:, None] * np.square(x[:, None] - self.values.ravel().take(flat))
        cost += p.take(flat)
        cost[~inside] = np.inf
        low = cost.min(axis=1, keepdims=True)
        return np.where(inside & (cost == low), self.index.ravel().take(flat), self.k).min(axis=1)

    def _count_below(self, x: np.ndarray, rows: np.ndarray, *, side: str) -> np.ndarray:
        """Per entry, how many of its row's sorted values are ``< x`` (``left``) or ``<= x``."""
        v = self.values
        if len(v) == 1:
            return np.searchsorted(v[0], x, side=side)  # type: ignore[call-overload]
        sorted_row = v[rows]
        hits = sorted_row < x[:, None] if side == "left" else sorted_row <= x[:, None]
        return np.count_nonzero(hits, axis=1)
