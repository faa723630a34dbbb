"""``quantize``: one flat array of weights to a codebook and indices, by any method and rate.

Pruned weights never take part: they are set aside, the rest are quantized, and the pruned ones
get the exact 0.0 codeword. ``k`` counts that codeword, so with pruned weights ``k - 1`` clusters
are left for the others and indices always fit in ``ceil(log2 k)`` bits.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError, DataError
from ..numeric import entropy_bits, is_int
from ._fits import Fit, Task, fit
from ._sorted import CHUNK, bounds_from_thresholds, labels_f32, sort_weights
from .uniform import CELL_VALUES

METHODS = ("kmeans", "hkmeans", "uniform", "ecsq")
INITS = ("dp", "k-means++")
#: Largest power of two (either way) of the weights' or importances' magnitude that `solve` takes
#: as it is; beyond, it scales them (see there).
SAFE_EXPONENT = 64
#: ECSQ's lam is capped here: at safe magnitudes all distortion is below 2**240, so one cluster is
#: already optimal, and ``lam`` times code lengths times counts stays finite.
LAM_CAP = 2.0**300


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


def quantize(
    w,
    h=None,
    *,
    method: str = "uniform",
    k: int | None = None,
    bits: int | None = None,
    lam: float | None = None,
    target_bits: float | None = None,
    pruned=None,
    exact: bool = False,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    init: str = "dp",
    cell_value: str = "mean",
) -> Quantization:
    """Quantize a flat array of weights with importances.

    Parameters
    ----------
    w : (n,) array of float weights.
    h : (n,) array of nonnegative finite importances (Hessian diagonal), or None for all ones.
        ``method="kmeans"`` clusters without it (the distortion reported still uses it).
    method : ``"kmeans"`` (plain), ``"hkmeans"`` (Hessian-weighted), ``"uniform"`` (see
        `onnxhq.quantize.uniform`) or ``"ecsq"`` (iterative ECSQ; see `onnxhq.quantize.ecsq`).
    k, bits, lam, target_bits : the rate, exactly one.
        ``k``: at most k codewords (``bits``: ``k = 2**bits``), the 0.0 of pruned weights included;
        kmeans, hkmeans and uniform (whose grid then spans the weights with k cells). Not ECSQ:
        its codewords die as lambda grows, and the lambda that leaves only k of them keeps
        outliers as codewords (on Laplacian weights, k=4 put almost every weight in one cluster:
        0.002 bits/weight, 5.6 times hkmeans' distortion).
        ``lam``: ECSQ's Lagrange multiplier, in distortion per bit (ECSQ only).
        ``target_bits``: an entropy budget in bits per weight over all weights (pruned included),
        met from below, within 0.01 bits where the method's resolution allows (k-means moves in
        whole clusters).
    pruned : (n,) bool array or None. Pruned weights become exactly 0.0 and move no center.
    exact : solve by dynamic programming (kmeans, hkmeans, ecsq); see `onnxhq.quantize.exact`.
    seed : seed of the k-means++ init.
    max_iter, tol : most iterations, and the relative fall of the objective per iteration below
        which Lloyd and ECSQ stop.
    init : how Lloyd starts: ``"dp"``, the optimal partition of coarse bins of the sorted weights
        (6 per cluster, 128 to 512) with each boundary then moved to the best place nearby
        (deterministic, faster than k-means++, and typically within 0.1 % of the optimum), or
        ``"k-means++"`` (greedy, weighted, seeded).
    cell_value : uniform only: ``"mean"`` (weighted mean of each cell, the paper's) or ``"grid"``.

    Returns
    -------
    Quantization

    Raises
    ------
    DataError : arrays of the wrong shape or dtype, non-finite values, negative importances, or
        importances that are all zero on the unpruned weights.
    ConfigError : unknown method, not exactly one rate, ``k`` above the distinct unpruned weights
        (plus one for the pruned codeword), an unreachable ``target_bits``.
    """
    w, h, pruned = check_arrays(w, h, pruned)
    task = check_task(
        method=method,
        k=k,
        bits=bits,
        lam=lam,
        target_bits=target_bits,
        exact=exact,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        cell_value=cell_value,
        init=init,
    )
    return solve(w, h, pruned, task)[0]


def check_arrays(w, h, pruned, *, name: str = "w"):
    """Validated ``(w, h, pruned)``: float32/float64 1-D weights, float importances, bool mask or
    None."""
    w = np.asarray(w)
    if w.ndim != 1:
        raise DataError(
            f"{name} must be 1-D, got shape {w.shape}; flatten it (or use quantize_weights)"
        )
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
        if not (np.issubdtype(h.dtype, np.floating) or np.issubdtype(h.dtype, np.integer)):
            raise DataError(f"importances of {name} have dtype {h.dtype}; expected numbers")
        if h.dtype not in (np.float32, np.float64):
            h = h.astype(np.float64)
        bad = ~np.isfinite(h) | (h < 0)
        if np.any(bad):
            i = int(np.argmax(bad))
            raise DataError(
                f"importances of {name} must be finite and >= 0; {np.count_nonzero(bad)} are not "
                f"(the first, at index {i}, is {h[i]})"
            )
    if pruned is not None:
        pruned = np.asarray(pruned)
        if pruned.shape != w.shape or pruned.dtype != np.bool_:
            raise DataError(
                f"the pruned mask of {name} must be bool of shape {w.shape}, got {pruned.dtype} "
                f"of shape {pruned.shape}"
            )
        if not pruned.any():
            pruned = None
    return w, h, pruned


def check_task(
    *,
    method,
    k,
    bits,
    lam,
    target_bits,
    exact=False,
    seed=0,
    max_iter=100,
    tol=1e-7,
    cell_value="mean",
    init="dp",
) -> Task:
    """Validated options (the solver settings default as in `quantize`); ``bits`` becomes
    ``k = 2**bits``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    given = [
        n
        for n, v in (("k", k), ("bits", bits), ("lam", lam), ("target_bits", target_bits))
        if v is not None
    ]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of k, bits, lam, target_bits; got {', '.join(given) or 'none'}"
        )
    if lam is not None and method != "ecsq":
        raise ConfigError(
            f"lam={lam} is ECSQ's multiplier; method {method!r} takes k, bits or target_bits"
        )
    if method == "ecsq" and (k is not None or bits is not None):
        raise ConfigError(
            f"method 'ecsq' takes its number of codewords from the rate: give lam or target_bits, "
            f"not {given[0]}={k if k is not None else bits} (hkmeans and uniform take a fixed k)"
        )
    if bits is not None:
        b = float(bits) if isinstance(bits, numbers.Real) and not isinstance(bits, bool) else -1.0
        if not (0 <= b <= 30 and b == int(b)):
            raise ConfigError(
                f"bits={bits} must be a whole number from 0 to 30; for a fractional rate use "
                "target_bits"
            )
        k = 2 ** int(b)
    if k is not None and (not is_int(k) or k < 1):
        raise ConfigError(f"k={k} must be an integer >= 1")
    if lam is not None and not (isinstance(lam, numbers.Real) and 0 <= float(lam) < math.inf):
        raise ConfigError(f"lam={lam} must be a finite number >= 0")
    if target_bits is not None and not (
        isinstance(target_bits, numbers.Real) and 0 <= float(target_bits) < 64
    ):
        raise ConfigError(
            f"target_bits={target_bits} must be a number of bits per weight in [0, 64)"
        )
    if exact and method == "uniform":
        raise ConfigError(
            "exact=True applies to kmeans, hkmeans and ecsq; method 'uniform' has no DP solver"
        )
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    if not is_int(max_iter) or max_iter < 1:
        raise ConfigError(f"max_iter={max_iter!r} must be an integer >= 1")
    if not (isinstance(tol, numbers.Real) and float(tol) >= 0):
        raise ConfigError(f"tol={tol!r} must be a number >= 0")
    if cell_value not in CELL_VALUES:
        raise ConfigError(f"cell_value={cell_value!r}; choose one of {', '.join(CELL_VALUES)}")
    if init not in INITS:
        raise ConfigError(f"init={init!r}; choose one of {', '.join(INITS)}")
    return Task(
        method,
        None if k is None else int(k),
        None if lam is None else float(lam),
        None if target_bits is None else float(target_bits),
        bool(exact),
        int(seed),
        int(max_iter),
        float(tol),
        cell_value,
        init,
    )


def solve(
    w: np.ndarray, h: np.ndarray | None, pruned: np.ndarray | None, task: Task, *, cap: bool = False
) -> tuple[Quantization, bool]:
    """Quantize validated arrays; returns ``(result, capped)``.

    With ``cap``, a ``k`` beyond the distinct unpruned weights keeps them all instead of raising.

    Every method is scale-equivariant: weights times ``2**a`` and importances times ``2**b`` give
    the same indices, the codebook times ``2**a`` and the distortion times ``2**(b + 2a)`` (with
    ``lam`` scaled alike). Weights whose largest magnitude, or importances whose largest entry,
    lie outside ``[2**-SAFE_EXPONENT, 2**SAFE_EXPONENT]`` are therefore scaled by such a power of
    two (exactly) into [0.5, 1) and the result scaled back: the solvers' squares and sums of
    squares then neither overflow (weights of 1e300) nor underflow (denormal weights).
    """
    a, b = _exponent(w), _exponent(h)
    if task.lam is not None and task.lam > LAM_CAP:
        task = replace(task, lam=LAM_CAP)
    if a == 0 and b == 0:
        return _solve(w, h, pruned, task, cap=cap)
    e = b + 2 * a
    lam = None if task.lam is None else min(_ldexp(task.lam, -e), LAM_CAP)
    q, capped = _solve(
        np.ldexp(w, -a),
        None if h is None else np.ldexp(h, -b),
        pruned,
        replace(task, lam=lam),
        cap=cap,
    )
    return replace(q, codebook=np.ldexp(q.codebook, a), distortion=_ldexp(q.distortion, e)), capped


def _exponent(x: np.ndarray | None) -> int:
    """``e`` with ``max |x| / 2**e`` in [0.5, 1) where ``max |x|`` lies outside the safe range,
    else 0.
    """
    if x is None or x.size == 0:
        return 0
    top = max(float(np.max(x)), -float(np.min(x)))
    if top == 0.0 or 2.0**-SAFE_EXPONENT <= top <= 2.0**SAFE_EXPONENT:
        return 0
    return int(np.frexp(top)[1])


def _ldexp(x: float, e: int) -> float:
    """``x * 2**e``, infinite where that overflows."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def _solve(
    w: np.ndarray, h: np.ndarray | None, pruned: np.ndarray | None, task: Task, *, cap: bool
) -> tuple[Quantization, bool]:
    """`solve` on weights and importances of safe magnitude."""
    n_pruned = 0 if pruned is None else int(np.count_nonzero(pruned))
    wu = w if pruned is None else w[~pruned]
    hu = None if h is None or task.method == "kmeans" else (h if pruned is None else h[~pruned])
    if wu.size == 0:
        return _assemble(
            w, h, pruned, Fit(np.zeros(0), np.zeros(0, np.int64), 0.0), np.zeros(0, np.int32)
        ), False
    sw = sort_weights(wu, hu)
    if hu is not None and not sw.prefix([sw.size])[0, 0] > 0:
        raise DataError(
            f"all {sw.size} importances of the unpruned weights are 0, so every quantization looks "
            "free; check the Hessian estimate, or use method='kmeans'"
        )
    result, capped = fit(sw, wu, hu, n_pruned, task, cap=cap)
    if result.labels is not None:
        labels = result.labels
    else:
        assert result.thresholds is not None  # a Fit has one or the other
        labels = _labels(sw, wu, result.thresholds)
    q = _assemble(w, h, pruned, result, labels)
    if (
        hu is None and h is not None
    ):  # plain k-means clustered without h; its distortion still uses h
        q = replace(q, distortion=_distortion(w, h, q.codebook, q.indices))
    return q, capped


def _labels(sw, wu: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Cluster of each weight, ``searchsorted(thresholds, w, "right")``: a scatter of sorted runs,
    a table, or a search."""
    out = np.empty(wu.size, dtype=np.int32)
    if sw.order is not None:
        counts = np.diff(bounds_from_thresholds(sw, thresholds))
        out[sw.order] = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        return out
    if wu.dtype == np.float32 and thresholds.dtype == np.float32:
        return labels_f32(wu, thresholds)
    for s in range(0, wu.size, CHUNK):
        out[s : s + CHUNK] = np.searchsorted(thresholds, wu[s : s + CHUNK], side="right")
    return out


def _assemble(w, h, pruned, result: Fit, labels: np.ndarray) -> Quantization:
    """Add the pruned weights' 0.0 codeword, merge equal codewords, total distortion and entropy."""
    book, counts = (
        np.asarray(result.centers, dtype=np.float64),
        np.asarray(result.counts, dtype=np.int64),
    )
    distortion = result.distortion
    if pruned is None:
        indices = labels.astype(np.int32, copy=False)
    else:
        book, counts = np.append(book, 0.0), np.append(counts, np.count_nonzero(pruned))
        indices = np.full(w.size, book.size - 1, dtype=np.int32)
        indices[~pruned] = labels
        wp = w[pruned].astype(np.float64)
        distortion += float(np.dot(wp, wp) if h is None else np.dot(h[pruned], wp * wp))
    if book.size > 1 and not np.all(np.diff(book) > 0):
        book, inverse = np.unique(book, return_inverse=True)
        counts = np.bincount(inverse, weights=counts, minlength=book.size).astype(np.int64)
        indices = inverse.astype(np.int32)[indices]
    return Quantization(
        book + 0.0, indices, distortion, entropy_bits(counts)
    )  # + 0.0 turns -0.0 into 0.0


def _distortion(w, h, book, indices) -> float:
    total = 0.0
    for s in range(0, w.size, CHUNK):
        e = (w[s : s + CHUNK].astype(np.float64) - book[indices[s : s + CHUNK]]) ** 2
        total += float(e.sum() if h is None else np.dot(h[s : s + CHUNK].astype(np.float64), e))
    return total
