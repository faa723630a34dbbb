"""``quantize``: one flat array of weights to a codebook and indices, by any method and rate.

Pruned weights never take part: they are set aside, the rest are quantized, and the pruned ones
get the exact 0.0 codeword. ``k`` counts that codeword, so with pruned weights ``k - 1`` clusters
are left for the others and indices always fit in ``ceil(log2 k)`` bits.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from . import exact as dp
from .ecsq import code_lengths, ecsq
from .kmeans import lloyd, seed_centers
from .rate import RATE_TOL, entropy_bits, search_falling, search_k
from ._sorted import CHUNK, SortedWeights, bounds_from_thresholds, interval_sums, means, sort_weights
from .uniform import CELL_VALUES, cell_centers, occupied_cells, step_for_levels

log = logging.getLogger(__name__)

METHODS = ("kmeans", "hkmeans", "uniform", "ecsq")
#: Most cells the ECSQ starting grid may have.
ECSQ_START_CELLS = 4096


@dataclass(frozen=True)
class Quantization:
    """The quantization of one flat array.

    Attributes
    ----------
    codebook : (k,) float64 ndarray, ascending and unique. It contains 0.0 whenever pruned weights
        exist (otherwise only if a cluster's value is exactly 0.0, e.g. the zero cell of a grid).
    indices : (n,) int32 ndarray in ``[0, k)``; pruned weights point at the 0.0 codeword.
    distortion : float, ``sum_i h_i (w_i - codebook[indices_i])^2`` over all weights.
    entropy_bits : float, empirical entropy of ``indices`` in bits per weight.
    """

    codebook: np.ndarray
    indices: np.ndarray
    distortion: float
    entropy_bits: float


@dataclass(frozen=True)
class _Fit:
    """Clusters of the unpruned weights: centers (ascending), sizes, and how weights map to them."""

    centers: np.ndarray
    counts: np.ndarray
    thresholds: np.ndarray | None = None  # interval methods: cluster = searchsorted(thresholds, w, "right")
    labels: np.ndarray | None = None      # ECSQ: cluster per weight


@dataclass(frozen=True)
class _Task:
    """Validated options of one quantization."""

    method: str
    k: int | None
    lam: float | None
    target_bits: float | None
    exact: bool
    seed: int
    max_iter: int
    tol: float
    cell_value: str


def quantize(w, h=None, *, method: str = "uniform", k: int | None = None, bits: int | None = None,
             lam: float | None = None, target_bits: float | None = None, pruned=None, exact: bool = False,
             seed: int = 0, max_iter: int = 100, tol: float = 1e-7, cell_value: str = "mean") -> Quantization:
    """Quantize a flat array of weights with importances.

    Parameters
    ----------
    w : (n,) array of float weights.
    h : (n,) array of nonnegative finite importances (Hessian diagonal), or None for all ones.
        ``method="kmeans"`` ignores it.
    method : ``"kmeans"`` (plain), ``"hkmeans"`` (Hessian-weighted), ``"uniform"`` or ``"ecsq"``.
    k, bits, lam, target_bits : the rate, exactly one. ``k`` codewords at most (``bits``: ``2**bits``),
        for kmeans, hkmeans and uniform (whose grid then spans the weights with k cells);
        ``lam``, ECSQ's Lagrange multiplier in distortion per bit (ECSQ only); ``target_bits``,
        an entropy budget in bits per weight (all weights, the pruned symbol included), met from
        below within 0.01 bits where the method's resolution allows.
    pruned : (n,) bool array or None. Pruned weights become exactly 0.0 and move no center.
    exact : use the dynamic-programming optimum (kmeans, hkmeans, ecsq); see `onnxhq.quantize.exact`.
    seed : seed of k-means++.
    max_iter, tol : iteration limit and relative objective decrease that stop Lloyd and ECSQ.
    cell_value : uniform only: ``"mean"`` (weighted mean of each cell, the paper's) or ``"grid"``.

    Returns
    -------
    Quantization

    Raises
    ------
    DataError : arrays of wrong shape or dtype, non-finite values, negative or all-zero importances.
    ConfigError : unknown method, not exactly one rate, ``k`` above the distinct unpruned weights
        (plus one for the pruned codeword), an unreachable ``target_bits``.
    """
    w, h, pruned = check_arrays(w, h, pruned)
    task = check_task(method=method, k=k, bits=bits, lam=lam, target_bits=target_bits, exact=exact, seed=seed,
                      max_iter=max_iter, tol=tol, cell_value=cell_value)
    return solve(w, h, pruned, task)[0]


def check_arrays(w, h, pruned, *, name: str = "w"):
    """Validated ``(w, h, pruned)``: float32/float64 1-D weights, float importances, bool mask or None."""
    w = np.asarray(w)
    if w.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {w.shape}; flatten it (or use quantize_weights)")
    if w.size == 0:
        raise DataError(f"{name} is empty: there is nothing to quantize")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise DataError(f"{name} has dtype {w.dtype}; expected floating-point weights")
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32 if w.dtype == np.float16 else np.float64)
    if not np.all(np.isfinite(w)):
        raise DataError(f"{name} has {np.count_nonzero(~np.isfinite(w))} non-finite values")
    if h is not None:
        h = np.asarray(h)
        if h.shape != w.shape:
            raise DataError(f"importances of {name} have shape {h.shape}, the weights {w.shape}")
        if h.dtype not in (np.float32, np.float64):
            h = h.astype(np.float64)
        bad = ~np.isfinite(h) | (h < 0)
        if np.any(bad):
            i = int(np.argmax(bad))
            raise DataError(f"importances of {name} must be finite and >= 0; {np.count_nonzero(bad)} are not "
                            f"(first at index {i}: {h[i]})")
    if pruned is not None:
        pruned = np.asarray(pruned)
        if pruned.shape != w.shape or pruned.dtype != np.bool_:
            raise DataError(f"pruned mask of {name} must be bool of shape {w.shape}, got {pruned.dtype} {pruned.shape}")
        if not pruned.any():
            pruned = None
    return w, h, pruned


def check_task(*, method, k, bits, lam, target_bits, exact, seed, max_iter, tol, cell_value) -> _Task:
    """Validated options; ``bits`` becomes ``k = 2**bits``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    given = [n for n, v in (("k", k), ("bits", bits), ("lam", lam), ("target_bits", target_bits)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of k, bits, lam, target_bits; got {', '.join(given) or 'none'}")
    if lam is not None and method != "ecsq":
        raise ConfigError(f"lam={lam} is ECSQ's multiplier; method {method!r} takes k, bits or target_bits")
    if method == "ecsq" and (k is not None or bits is not None):
        raise ConfigError(f"method 'ecsq' sets its number of codewords from the rate: give lam or target_bits, "
                          f"not {given[0]}={k if k is not None else bits} (use hkmeans or uniform for a fixed k)")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or bits != int(bits) or not 0 <= bits <= 30:
            raise ConfigError(f"bits={bits} must be a whole number from 0 to 30; for a fractional rate use target_bits")
        k = 2 ** int(bits)
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ConfigError(f"k={k} must be an integer >= 1")
    if lam is not None and not (isinstance(lam, numbers.Real) and np.isfinite(lam) and lam >= 0):
        raise ConfigError(f"lam={lam} must be a finite number >= 0")
    if target_bits is not None and not (isinstance(target_bits, numbers.Real) and 0 <= target_bits < 64):
        raise ConfigError(f"target_bits={target_bits} must be a number of bits per weight in [0, 64)")
    if exact and method == "uniform":
        raise ConfigError("exact=True applies to kmeans, hkmeans and ecsq; method 'uniform' has no DP solver")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"max_iter={max_iter} must be an integer >= 1")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ConfigError(f"tol={tol} must be >= 0")
    if cell_value not in CELL_VALUES:
        raise ConfigError(f"cell_value={cell_value!r}; choose one of {', '.join(CELL_VALUES)}")
    return _Task(method, None if k is None else int(k), None if lam is None else float(lam),
                 None if target_bits is None else float(target_bits), bool(exact), int(seed), int(max_iter),
                 float(tol), cell_value)


def solve(w: np.ndarray, h: np.ndarray | None, pruned: np.ndarray | None, task: _Task, *,
          cap: bool = False) -> tuple[Quantization, bool]:
    """Quantize validated arrays. With ``cap``, a ``k`` or ``target_bits`` beyond what the distinct
    weights need keeps every distinct value (lossless) instead of raising. Returns (result, capped)."""
    n_pruned = 0 if pruned is None else int(np.count_nonzero(pruned))
    wu = w if pruned is None else w[~pruned]
    hu = None if h is None or task.method == "kmeans" else (h if pruned is None else h[~pruned])
    if wu.size == 0:
        return _assemble(w, h, pruned, np.zeros(0), np.zeros(0, np.int32)), False
    sw = sort_weights(wu, hu)
    if hu is not None and not sw.prefix([sw.size])[0, 0] > 0:
        raise DataError(f"all {sw.size} importances of the unpruned weights are 0; every quantization would "
                        "look free. Check the Hessian estimate or use method='kmeans'")
    fit, capped = _fit(sw, wu, hu, n_pruned, task, cap)
    labels = fit.labels if fit.labels is not None else _labels(wu, fit.thresholds)
    return _assemble(w, h, pruned, fit.centers, labels), capped


def _fit(sw: SortedWeights, wu, hu, n_pruned: int, task: _Task, cap: bool) -> tuple[_Fit, bool]:
    distinct = sw.distinct()
    if task.k is not None:
        clusters = task.k - (n_pruned > 0)
        if clusters < 1:
            raise ConfigError(f"k={task.k} leaves no codeword for the {sw.size} unpruned weights: the pruned "
                              "weights take the 0.0 codeword; use k >= 2")
        if clusters >= distinct:
            if clusters > distinct and not cap:
                extra = " (plus 1 for the pruned weights' 0.0)" if n_pruned else ""
                raise ConfigError(f"k={task.k} exceeds the {distinct} distinct unpruned weights{extra}; "
                                  f"use k <= {distinct + (n_pruned > 0)}")
            return _lossless(sw), clusters > distinct
        if task.method in ("kmeans", "hkmeans"):
            return _fit_kmeans(sw, clusters, task), False
        return _fit_uniform(sw, step_for_levels(float(sw.values[0]), float(sw.values[-1]), clusters), task), False
    if task.lam is not None:
        return _fit_ecsq(sw, wu, hu, n_pruned, task.lam, task), False
    return _fit_target(sw, wu, hu, n_pruned, distinct, task)


def _fit_target(sw, wu, hu, n_pruned, distinct, task) -> tuple[_Fit, bool]:
    target = task.target_bits

    lossless = _lossless(sw)
    if entropy_bits(np.append(lossless.counts, n_pruned)) <= target:
        return lossless, False
    floor = entropy_bits([sw.size, n_pruned])
    if target < floor:
        raise ConfigError(f"target_bits={target:g} is below {floor:.4f} bits/weight, the entropy of the pruned/"
                          "unpruned split alone (one cluster for all unpruned weights)")

    if task.method in ("kmeans", "hkmeans"):
        return search_k(_rated(lambda k: _fit_kmeans(sw, int(k), task), n_pruned), target, 1, distinct), False
    step0 = _uniform_step_for(sw, n_pruned, target)
    if task.method == "uniform":
        return search_falling(_rated(lambda s: _fit_uniform(sw, s, task), n_pruned), target, step0), False
    scale = sw.prefix([sw.size])[0, 0] / sw.size  # lam in units of the mean importance: scale-free search
    fit = _rated(lambda mu: _fit_ecsq(sw, wu, hu, n_pruned, mu * scale, task), n_pruned)
    return search_falling(fit, target, step0 ** 2 * np.log(2) / 6), False


def _rated(fit, n_pruned: int):
    """``fit`` returning ``(rate in bits/weight, fit)`` as the rate searches want."""
    def run(x):
        f = fit(x)
        return entropy_bits(np.append(f.counts, n_pruned)), f
    return run


def _uniform_step_for(sw: SortedWeights, n_pruned: int, target: float) -> float:
    """Grid step whose uniform quantizer's rate is near ``target`` (cheap: a start for the searches)."""
    def run(step):
        counts = np.diff(bounds_from_thresholds(sw, occupied_cells(sw, step)[1]))
        return entropy_bits(np.append(counts, n_pruned)), step
    top = max(abs(float(sw.values[0])), abs(float(sw.values[-1])), np.finfo(np.float64).tiny)
    return search_falling(run, target, 2.0 * top, tol=0.05)


def _lossless(sw: SortedWeights) -> _Fit:
    v = sw.values
    first = np.concatenate([[True], v[1:] != v[:-1]])
    t = v[first][1:]
    bounds = bounds_from_thresholds(sw, t)
    return _Fit(v[first].astype(np.float64), np.diff(bounds), thresholds=t)


def _fit_kmeans(sw: SortedWeights, k: int, task: _Task) -> _Fit:
    res = None
    if task.exact:
        units = dp.make_units(sw, dp.KMEANS_UNITS)
        pos = units.bounds[dp.kmeans_dp(units, k)]
        res = lloyd(sw, means(sw, pos, interval_sums(sw, pos)), max_iter=task.max_iter, tol=task.tol)
        log.info("exact k-means, k=%d: %d units, objective %.6g, binning costs at most %.3g", k, units.size,
                 res.objective, units.loss_bound)
        if units.loss_bound == 0:
            return _interval_fit(sw, res.thresholds, res.centers)
    plain = lloyd(sw, seed_centers(sw, k, np.random.default_rng(task.seed)), max_iter=task.max_iter, tol=task.tol)
    if res is None or plain.objective < res.objective:
        res = plain
    return _interval_fit(sw, res.thresholds, res.centers)


def _interval_fit(sw: SortedWeights, thresholds: np.ndarray, centers: np.ndarray) -> _Fit:
    return _Fit(centers, np.diff(bounds_from_thresholds(sw, thresholds)), thresholds=thresholds)


def _fit_uniform(sw: SortedWeights, step: float, task: _Task) -> _Fit:
    cells, t = occupied_cells(sw, step)
    centers, sums = cell_centers(sw, cells, t, step, cell_value=task.cell_value)
    return _interval_fit(sw, t, centers)


def _fit_ecsq(sw: SortedWeights, wu, hu, n_pruned: int, lam: float, task: _Task) -> _Fit:
    n_total = sw.size + n_pruned
    if task.exact:
        units = dp.make_units(sw, dp.ECSQ_UNITS)
        pos = units.bounds[dp.ecsq_dp(units, lam, n_total)]
        centers, counts = means(sw, pos, interval_sums(sw, pos)), np.diff(pos)
    else:
        step = _ecsq_start_step(sw, lam)
        cells, t = occupied_cells(sw, step)
        centers, sums = cell_centers(sw, cells, t, step, cell_value="mean")
        counts = np.diff(bounds_from_thresholds(sw, t))
    res = ecsq(wu, hu, centers, code_lengths(counts, n_total), lam=lam, n_total=n_total, max_iter=task.max_iter,
               tol=task.tol)
    return _Fit(res.centers, res.counts, labels=res.labels)


def _ecsq_start_step(sw: SortedWeights, lam: float) -> float:
    """Half the grid step whose high-rate slope is ``lam``: ``dD/dR = -lam`` at ``step^2 = 6 lam N / (ln 2 H)``.

    Starting finer than the optimum leaves ECSQ clusters to drop; at most ECSQ_START_CELLS cells.
    """
    mean_h = sw.prefix([sw.size])[0, 0] / sw.size
    step = 0.5 * np.sqrt(6 * lam / (np.log(2) * mean_h))
    span = float(sw.values[-1]) - float(sw.values[0])
    return max(step, span / ECSQ_START_CELLS, np.finfo(np.float64).tiny)


def _labels(wu: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    out = np.empty(wu.size, dtype=np.int32)
    for s in range(0, wu.size, CHUNK):
        out[s:s + CHUNK] = np.searchsorted(thresholds, wu[s:s + CHUNK], side="right")
    return out


def _assemble(w, h, pruned, centers: np.ndarray, labels: np.ndarray) -> Quantization:
    """Add the pruned weights' 0.0 codeword, merge equal codewords, measure distortion and entropy."""
    book = np.asarray(centers, dtype=np.float64)
    if pruned is None:
        indices = labels.astype(np.int32, copy=False)
    else:
        book = np.append(book, 0.0)
        indices = np.full(w.size, book.size - 1, dtype=np.int32)
        indices[~pruned] = labels
    if book.size > 1 and not np.all(np.diff(book) > 0):
        book, inverse = np.unique(book, return_inverse=True)
        indices = inverse.astype(np.int32)[indices]
    book = book + 0.0  # -0.0 -> 0.0
    counts = np.bincount(indices, minlength=book.size)
    return Quantization(book, indices, _distortion(w, h, book, indices), entropy_bits(counts))


def _distortion(w, h, book, indices) -> float:
    total = 0.0
    for s in range(0, w.size, CHUNK):
        e = (w[s:s + CHUNK].astype(np.float64) - book[indices[s:s + CHUNK]]) ** 2
        total += float(e.sum() if h is None else np.dot(h[s:s + CHUNK].astype(np.float64), e))
    return total
