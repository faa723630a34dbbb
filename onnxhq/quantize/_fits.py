"""Each method at each kind of rate, on the sorted unpruned weights: the kernels behind `quantize`.

A fit is the clustering of the unpruned weights only; `_quantize` adds the pruned weights' 0.0
codeword afterwards. Rates count that codeword's share (``n_pruned``) so that a target in bits
per weight refers to all weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..numeric import entropy_bits
from . import exact as dp
from ._sorted import SortedWeights, bounds_from_thresholds, interval_sums, means, sse
from .ecsq import code_lengths, ecsq
from .kmeans import lloyd, refine, seed_centers
from .rate import search_falling, search_k
from .uniform import cell_centers, finest_step, occupied_cells, step_for_levels

log = logging.getLogger(__name__)

#: Units of the coarse DP that starts Lloyd's iteration (``init="dp"``, then `refine`): so many
#: per cluster, within bounds.
INIT_PER_CLUSTER = 6
INIT_UNITS = (128, 512)
#: Units of ECSQ's first stage (see `onnxhq.quantize.ecsq`), and most iterations of its
#: per-weight stage.
ECSQ_UNITS = 1 << 14
ECSQ_POLISH = 0
#: Most cells of the grid ECSQ starts from.
ECSQ_START_CELLS = 4096


@dataclass(frozen=True)
class Task:
    """Validated options of one quantization (see `onnxhq.quantize.quantize`)."""

    method: str
    k: int | None
    lam: float | None
    target_bits: float | None
    exact: bool
    seed: int
    max_iter: int
    tol: float
    cell_value: str
    init: str


@dataclass(frozen=True)
class Fit:
    """Clusters of the unpruned weights: centers (ascending), sizes, distortion, and the mapping.

    Interval methods give ``thresholds`` (weight ``x`` is in cluster
    ``searchsorted(thresholds, x, side="right")``); ECSQ gives ``labels`` per weight.
    """

    centers: np.ndarray
    counts: np.ndarray
    distortion: float
    thresholds: np.ndarray | None = None
    labels: np.ndarray | None = None


def fit(
    sw: SortedWeights,
    wu: np.ndarray,
    hu: np.ndarray | None,
    n_pruned: int,
    task: Task,
    *,
    cap: bool,
) -> tuple[Fit, bool]:
    """The fit ``task`` asks for; with ``cap``, a rate beyond the distinct weights is lossless."""
    distinct = sw.distinct()
    on_grid = task.method == "uniform" and task.cell_value == "grid"  # no lossless shortcut
    if task.k is not None:
        clusters = task.k - (n_pruned > 0)
        if clusters < 1:
            raise ConfigError(
                f"k={task.k} leaves no codeword for the {sw.size} unpruned weights: the pruned "
                "weights take the 0.0 codeword; use k >= 2"
            )
        if clusters >= distinct and not on_grid:
            if clusters > distinct and not cap:
                extra = " (plus 1 for the pruned weights' 0.0)" if n_pruned else ""
                raise ConfigError(
                    f"k={task.k} exceeds the {distinct} distinct unpruned weights{extra}; "
                    f"use k <= {distinct + (n_pruned > 0)}"
                )
            return lossless(sw), clusters > distinct
        if task.method in ("kmeans", "hkmeans"):
            return fit_kmeans(sw, clusters, task), False
        return fit_uniform(
            sw, step_for_levels(float(sw.values[0]), float(sw.values[-1]), clusters), task
        ), False
    if task.lam is not None:
        return fit_ecsq(sw, wu, hu, n_pruned, task.lam, task), False
    assert task.target_bits is not None  # check_task gives exactly one rate
    return _fit_target(sw, wu, hu, n_pruned, distinct, task.target_bits, task), False


def _fit_target(sw, wu, hu, n_pruned: int, distinct: int, target: float, task: Task) -> Fit:
    if sw.lossless_bits(n_pruned) <= target:
        if task.method == "uniform" and task.cell_value == "grid":
            return fit_uniform(sw, finest_step(sw), task)
        return lossless(sw)
    floor = entropy_bits([sw.size, n_pruned])
    if target < floor:
        raise ConfigError(
            f"target_bits={target:g} is below {floor:.4f} bits/weight, the entropy of the "
            "pruned/unpruned split alone (one cluster for all unpruned weights)"
        )
    if task.method in ("kmeans", "hkmeans"):
        return search_k(
            _rated(lambda k: fit_kmeans(sw, int(k), task), n_pruned), target, 1, distinct
        )
    step0 = _uniform_step_for(sw, n_pruned, target)
    if task.method == "uniform":
        return search_falling(
            _rated(lambda s: fit_uniform(sw, s, task), n_pruned),
            target,
            step0,
            lowest_x=finest_step(sw),
        )
    # lam in units of the mean importance: a scale-free search
    scale = sw.prefix([sw.size])[0, 0] / sw.size
    run = _rated(lambda mu: fit_ecsq(sw, wu, hu, n_pruned, mu * scale, task), n_pruned)
    return search_falling(run, target, step0**2 * np.log(2) / 6)


def _rated(make, n_pruned: int):
    """``make`` returning ``(rate in bits/weight, fit)``, as the rate searches want."""

    def run(x):
        f = make(x)
        return entropy_bits(np.append(f.counts, n_pruned)), f

    return run


def _uniform_step_for(sw: SortedWeights, n_pruned: int, target: float) -> float:
    """A grid step whose uniform quantizer's rate is near ``target``: where the searches start."""

    def run(step):
        counts = np.diff(bounds_from_thresholds(sw, occupied_cells(sw, step)[1]))
        return entropy_bits(np.append(counts, n_pruned)), step

    top = max(abs(float(sw.values[0])), abs(float(sw.values[-1])), np.finfo(np.float64).tiny)
    return search_falling(run, target, 2.0 * top, tol=0.05, lowest_x=finest_step(sw))


def lossless(sw: SortedWeights) -> Fit:
    """Every distinct value its own cluster."""
    v = sw.values
    first = np.concatenate([[True], v[1:] != v[:-1]])
    t = v[first][1:]
    return Fit(
        v[first].astype(np.float64), np.diff(bounds_from_thresholds(sw, t)), 0.0, thresholds=t
    )


def fit_kmeans(sw: SortedWeights, k: int, task: Task) -> Fit:
    """Lloyd from the task's init; with ``exact``, also the DP optimum, polished: the better one."""
    best = None
    if task.exact:
        units = dp.make_units(sw, dp.KMEANS_UNITS)
        best = lloyd(sw, _dp_centers(sw, units, k), max_iter=task.max_iter, tol=task.tol)
        log.info(
            "exact k-means, k=%d: %d units, objective %.6g; binning costs at most %.3g",
            k,
            units.size,
            best.objective,
            units.loss_bound,
        )
        if units.loss_bound == 0:
            return Fit(best.centers, best.counts, best.objective, thresholds=best.thresholds)
    if task.init == "dp":
        start = _dp_centers(
            sw, dp.make_units(sw, int(np.clip(INIT_PER_CLUSTER * k, *INIT_UNITS))), k
        )
    else:
        start = seed_centers(sw, k, np.random.default_rng(task.seed))
    res = lloyd(sw, start, max_iter=task.max_iter, tol=task.tol)
    if best is None or res.objective < best.objective:
        best = res
    return Fit(best.centers, best.counts, best.objective, thresholds=best.thresholds)


def _dp_centers(sw: SortedWeights, units: dp.Units, k: int) -> np.ndarray:
    """Weighted means of the optimal partition of ``units`` into ``min(k, units)`` intervals,
    refined.

    `refine` moves its boundaries, which lie on unit edges, to the best places nearby.
    """
    pos = refine(sw, units.bounds[dp.kmeans_dp(units, min(k, units.size))])
    c = means(sw, pos, interval_sums(sw, pos))
    if len(c) < k:  # fewer units than clusters: Lloyd's refill splits the worst intervals
        c = np.unique(
            np.concatenate([c, sw.values[np.linspace(0, sw.size - 1, k - len(c)).astype(int)]])
        )
    return c


def fit_uniform(sw: SortedWeights, step: float, task: Task) -> Fit:
    """The occupied cells of the grid of ``step`` (at least `finest_step`) through 0."""
    step = max(step, finest_step(sw))
    cells, t = occupied_cells(sw, step)
    centers, sums = cell_centers(sw, cells, t, step, cell_value=task.cell_value)
    counts = np.diff(bounds_from_thresholds(sw, t))
    return Fit(centers, counts, float(sse(sw, sums, centers).sum()), thresholds=t)


def fit_ecsq(sw: SortedWeights, wu, hu, n_pruned: int, lam: float, task: Task) -> Fit:
    """ECSQ at ``lam``, from a fine grid (or from the interval DP optimum with ``exact``)."""
    n_total = sw.size + n_pruned
    units = dp.make_units(sw, dp.ECSQ_UNITS if task.exact else ECSQ_UNITS)
    if task.exact:
        pos = units.bounds[dp.ecsq_dp(units, lam, n_total)]
        centers, counts = means(sw, pos, interval_sums(sw, pos)), np.diff(pos)
    else:
        step = _ecsq_start_step(sw, lam)
        cells, t = occupied_cells(sw, step)
        centers, _ = cell_centers(sw, cells, t, step, cell_value="mean")
        counts = np.diff(bounds_from_thresholds(sw, t))
    res = ecsq(
        sw,
        wu,
        hu,
        units,
        centers,
        code_lengths(counts, n_total),
        lam=lam,
        n_total=n_total,
        max_iter=task.max_iter,
        tol=task.tol,
        polish=ECSQ_POLISH,
    )
    return Fit(res.centers, res.counts, res.distortion, labels=res.labels)


def _ecsq_start_step(sw: SortedWeights, lam: float) -> float:
    """Half the grid step whose high-rate slope is ``lam``: ``-dD/dR = lam`` at
    ``step^2 = 6 lam / (ln 2 mean h)``.

    Starting finer than the optimum leaves ECSQ clusters to drop; at most ECSQ_START_CELLS cells,
    and no finer than `finest_step`. (A huge ``lam`` gives a step beyond the weights: one cell.)
    """
    mean_h = sw.prefix([sw.size])[0, 0] / sw.size
    with np.errstate(over="ignore"):
        step = 0.5 * np.sqrt(6 * lam / (np.log(2) * mean_h))
    span = float(sw.values[-1]) - float(sw.values[0])
    top = max(abs(float(sw.values[0])), abs(float(sw.values[-1])))
    return float(min(max(step, span / ECSQ_START_CELLS, finest_step(sw)), 4.0 * top + 1.0))
