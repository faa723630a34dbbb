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
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Default tolerance of a target rate, bits per weight.
RATE_TOL = 0.01
#: A search stops when its bracket is this narrow in log(knob): rates are step functions, and
#: below this the steps are the data's, not the knob's.
MIN_LOG_WIDTH = 1e-4

P = TypeVar("P")
Fit = Callable[[float], tuple[float, P]]


def search_k(
    fit: Callable[[int], tuple[float, P]],
    target: float,
    k_min: int,
    k_max: int,
    *,
    tol: float = RATE_TOL,
) -> P:
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


def search_falling(
    fit: Fit[P],
    target: float,
    start: float,
    *,
    tol: float = RATE_TOL,
    max_steps: int = 60,
    lowest_x: float = 0.0,
) -> P:
    """A knob value ``x > 0`` whose rate is at most ``target``, within ``tol`` of it if it can
    (rate falls with x).

    Starts at ``start`` and moves by factors of 4 until the target is bracketed, then narrows the
    bracket by false position on ``(log x, rate)`` (rates are close to linear in ``log x`` for both
    the grid step and lambda), falling back to bisection when a step would land near an end.
    It goes no lower than ``lowest_x`` (where the rate stops rising, e.g. the finest grid the
    weights' precision resolves), and no higher than a finite float: the fit at the end reached
    is then the answer, below the target. Raises ConfigError when no knob value tried reaches the
    target.
    """
    x = max(float(start), lowest_x)
    bits, payload = fit(x)
    good = (np.log(x), bits, payload) if bits <= target else None
    bad = None if bits <= target else (np.log(x), bits)
    lowest = bits
    for _ in range(max_steps):
        if (good is not None and bad is not None) or (good is not None and good[1] >= target - tol):
            break
        nxt = max(x / 4, lowest_x) if bad is None else x * 4
        if nxt == x or not np.isfinite(nxt) or nxt <= 0:
            break
        x = nxt
        bits, payload = fit(x)
        lowest = min(lowest, bits)
        if bits <= target:
            good = (np.log(x), bits, payload)
        else:
            bad = (np.log(x), bits)
    if good is None:
        raise ConfigError(
            f"target_bits={target:g} is not reached: the lowest rate found was {lowest:.4f} "
            "bits/weight; ask for more bits"
        )
    for _ in range(max_steps):
        if bad is None or good[1] >= target - tol or good[0] - bad[0] < MIN_LOG_WIDTH:
            break
        (ug, fg), (ub, fb) = good[:2], bad
        width = ug - ub
        u = ug - (fg - target) * (ub - ug) / (fb - fg) if fb > fg else ug - width / 2
        u = min(max(u, ub + 0.1 * width), ug - 0.1 * width)
        if not ub < u < ug:
            break
        bits, payload = fit(float(np.exp(u)))
        if bits <= target:
            good = (u, bits, payload)
        else:
            bad = (u, bits)
    log.debug("target %.4f bits: knob %.6g gives %.4f bits", target, np.exp(good[0]), good[1])
    return good[2]
