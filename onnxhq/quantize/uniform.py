"""Uniform quantization: a grid of step ``step`` through 0, one cluster per occupied cell.

Cell ``j`` holds the weights with ``floor(w / step + 1/2) == j``, i.e. ``[(j - 1/2) step, (j + 1/2)
step)``. Its value is the importance-weighted mean of its members (the paper's choice, which
makes uniform quantization plus entropy coding close to the optimal entropy-constrained
quantizer at high rate) or the grid point ``j * step``.

No grid is finer than `finest_step`, two units in the last place of the largest weight: a finer
grid separates no more weights at the top, its thresholds (rounded to the weights' dtype) would
land on the weights and merge cells far apart, and its cell numbers would outgrow float64's
integers (and then int64). Weights far smaller than the largest then share the zero cell, with
an error below that step.
"""

from __future__ import annotations

import numpy as np

from ..options.vocabulary import CELL_VALUES  # noqa: F401  (re-exported: one list for options and here)
from ._sorted import SortedWeights, bounds_from_thresholds, interval_sums, means


def finest_step(sw: SortedWeights) -> float:
    """The smallest grid step worth using: ``2 * eps * max |w|`` in the weights' dtype (> 0).

    Cell numbers then stay below ``2**23`` (float32 weights) or ``2**52`` (float64).
    """
    top = max(abs(float(sw.values[0])), abs(float(sw.values[-1]))) if sw.size else 0.0
    return max(2.0 * float(np.finfo(sw.values.dtype).eps) * top, np.finfo(np.float64).tiny)


def occupied_cells(sw: SortedWeights, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell numbers of the occupied cells and the thresholds between them (in the weights' dtype).

    ``step`` is at least `finest_step`. Returns ``(cells (c,) int64, thresholds (c - 1,))``;
    weight ``x`` is in occupied cell ``searchsorted(thresholds, x, side="right")``.
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
    # Thresholds in the weights' dtype, rounded up: a weight below a cell's edge stays below the
    # rounded edge (rounded to nearest, it could land on the weight, empty the cell and merge the
    # weight with the next occupied cell, however far). The loop is a safety net only.
    while True:
        t = _round_up((cells[:-1] + 0.5) * step, v.dtype)
        counts = np.diff(bounds_from_thresholds(sw, t))
        if np.all(counts > 0):
            return cells, t
        cells = cells[counts > 0]


def _round_up(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The least value of ``dtype`` at or above each of ``x`` (float64)."""
    t = x.astype(dtype)
    low = t.astype(np.float64) < x
    if np.any(low):
        t[low] = np.nextafter(t[low], dtype.type(np.inf))
    return t


def _cell(x: float, step: float) -> int:
    return int(np.floor(x / step + 0.5))


def cell_centers(
    sw: SortedWeights, cells: np.ndarray, thresholds: np.ndarray, step: float, *, cell_value: str
) -> tuple[np.ndarray, np.ndarray]:
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
    lo = hi * 2.0**-60
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
