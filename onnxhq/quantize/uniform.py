"""Uniform quantization: a grid of step ``step`` through 0, one cluster per occupied cell.

Cell ``j`` holds the weights with ``floor(w / step + 1/2) == j``, i.e. ``[(j - 1/2) step, (j + 1/2)
step)``. Its value is the importance-weighted mean of its members (the paper's choice, which
makes uniform quantization plus entropy coding close to the optimal entropy-constrained
quantizer at high rate) or the grid point ``j * step``.
"""

from __future__ import annotations

import numpy as np

from ._sorted import SortedWeights, bounds_from_thresholds, interval_sums, means

CELL_VALUES = ("mean", "grid")


def occupied_cells(sw: SortedWeights, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell numbers of the occupied cells and the thresholds between them (in the weights' dtype).

    Returns ``(cells (c,) int64, thresholds (c - 1,))``; weight ``x`` is in occupied cell
    ``searchsorted(thresholds, x, side="right")``.
    """
    v = sw.values
    lo, hi = _cell(float(v[0]), step), _cell(float(v[-1]), step)
    if hi - lo + 1 <= 2 * sw.size + 2:
        edges = (np.arange(lo, hi, dtype=np.float64) + 0.5) * step
        counts = np.diff(bounds_from_thresholds(sw, edges))
        cells = np.arange(lo, hi + 1)[counts > 0]
    else:
        ids = np.floor(v / np.float64(step) + 0.5)
        cells = ids[np.concatenate([[True], ids[1:] != ids[:-1]])].astype(np.int64)
    while True:  # thresholds are rounded to the weights' dtype: drop any cell that rounding emptied
        t = ((cells[:-1] + 0.5) * step).astype(v.dtype)
        counts = np.diff(bounds_from_thresholds(sw, t))
        if np.all(counts > 0):
            return cells, t
        cells = cells[counts > 0]


def _cell(x: float, step: float) -> int:
    return int(np.floor(x / step + 0.5))


def cell_centers(sw: SortedWeights, cells: np.ndarray, thresholds: np.ndarray, step: float, *,
                 cell_value: str) -> tuple[np.ndarray, np.ndarray]:
    """Each occupied cell's value and the cells' moments ``(3, c)``.

    ``cell_value="mean"`` takes the weighted mean (the grid point where a cell has zero importance);
    ``"grid"`` the grid point.
    """
    bounds = bounds_from_thresholds(sw, thresholds)
    sums = interval_sums(sw, bounds)
    grid = cells * np.float64(step)
    if cell_value == "grid":
        return grid, sums
    c = means(sw, bounds, sums)
    return np.where(sums[0] > 0, c, grid), sums


def step_for_levels(vmin: float, vmax: float, levels: int) -> float:
    """Smallest step whose grid spans ``[vmin, vmax]`` with at most ``levels`` cells.

    The number of cells spanned, ``cell(vmax) - cell(vmin) + 1``, never grows with the step, so a
    bisection on the step finds the boundary.
    """
    top = max(abs(vmin), abs(vmax))
    if top == 0.0:
        return 1.0
    hi = 2.0 * top * (1 + 1e-9) + np.finfo(np.float64).tiny
    lo = hi * 2.0 ** -60
    if _cell(vmax, lo) - _cell(vmin, lo) + 1 <= levels:
        return lo
    for _ in range(200):
        mid = np.sqrt(lo * hi) if hi / lo > 1 + 1e-6 else (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if _cell(vmax, mid) - _cell(vmin, mid) + 1 <= levels:
            hi = mid
        else:
            lo = mid
    return hi
