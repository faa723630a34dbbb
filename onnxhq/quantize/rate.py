"""Rate: empirical entropy of the indices, and searches that meet a target rate.

The rate of a quantization is the empirical entropy of its indices in bits per weight, the
average code length an ideal entropy coder reaches (Huffman comes within a fraction of a bit).
A target rate is met by bisection on the knob that moves it: the number of clusters for k-means
(rate grows with k), the grid step for uniform and lambda for ECSQ (rate falls as they grow).
Each search returns the fit whose rate is at most the target and closest to it, stopping once
it is within ``tol`` bits below the target.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Default tolerance of a target rate, bits per weight.
RATE_TOL = 0.01

P = TypeVar("P")
Fit = Callable[[float], tuple[float, P]]


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy ``-sum p log2 p`` of symbol counts, in bits per symbol."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    n = counts.sum()
    if n == 0:
        return 0.0
    p = counts / n
    return float(max(-np.dot(p, np.log2(p)), 0.0))


def search_k(fit: Callable[[int], tuple[float, P]], target: float, k_min: int, k_max: int, *,
             tol: float = RATE_TOL) -> P:
    """Largest ``k`` in ``[k_min, k_max]`` whose rate is at most ``target`` (rate grows with k).

    ``fit(k_min)`` must meet the target. Brackets by doubling, then bisects on integers.
    """
    good_k, (good_bits, good) = k_min, fit(k_min)
    bad_k = None
    k = k_min
    while bad_k is None and good_bits < target - tol and k < k_max:
        k = min(2 * k, k_max)
        bits, payload = fit(k)
        if bits <= target:
            good_k, good_bits, good = k, bits, payload
        else:
            bad_k = k
    while bad_k is not None and bad_k - good_k > 1 and good_bits < target - tol:
        k = (good_k + bad_k) // 2
        bits, payload = fit(k)
        if bits <= target:
            good_k, good_bits, good = k, bits, payload
        else:
            bad_k = k
    log.debug("target %.4f bits: k=%d gives %.4f bits", target, good_k, good_bits)
    return good


def search_falling(fit: Fit, target: float, start: float, *, tol: float = RATE_TOL, max_steps: int = 60) -> P:
    """A knob value ``x > 0`` whose rate is at most ``target``, within ``tol`` of it if it can (rate falls with x).

    Starts at ``start``, moves by factors of 4 until the target is bracketed, then bisects in log
    space. Raises ConfigError when no knob value tried reaches the target.
    """
    x = start
    bits, payload = fit(x)
    good = (x, bits, payload) if bits <= target else None
    bad = None if bits <= target else x
    lowest = bits
    for _ in range(max_steps):
        if (good is not None and bad is not None) or (good is not None and good[1] >= target - tol):
            break
        x = x / 4 if bad is None else x * 4
        bits, payload = fit(x)
        lowest = min(lowest, bits)
        if bits <= target:
            good = (x, bits, payload)
        else:
            bad = x
    if good is None:
        raise ConfigError(f"target_bits={target:g} is not reached: the lowest rate found was {lowest:.4f} "
                          "bits/weight; ask for more bits")
    for _ in range(max_steps):
        if bad is None or good[1] >= target - tol:
            break
        x = float(np.sqrt(bad * good[0]))
        if not bad < x < good[0]:
            break
        bits, payload = fit(x)
        if bits <= target:
            good = (x, bits, payload)
        else:
            bad = x
    log.debug("target %.4f bits: knob %.6g gives %.4f bits", target, good[0], good[1])
    return good[2]
