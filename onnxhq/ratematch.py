"""The smallest rate multiplier ``lam`` whose assignment fits a size, in few assignments.

`onnxhq.compensate` with ``match_bits`` needs the smallest ``lam`` (to `TOL`) whose compensated
codes cost at most the plain assignment's bits; each try is a whole column walk over every
layer, so the number of tries is what matters. The size's fall from ``lam = 0`` is close to a
power of ``lam`` (``lam**0.5`` on the OCR recognizer, ``lam**1`` on the MiniLM encoder), so the
next ``lam`` is the secant on ``log lam`` against ``log(g(0) - g(lam))`` (``g`` = size - target),
kept inside the bracket found so far and moved just inside its ends, so that a try near an end
settles the bracket: 5-7 assignments where bisection took 12-16. Pure Python around a black box.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import DataError

log = logging.getLogger(__name__)

#: Relative precision of the multiplier: ``hi - lo <= TOL * hi`` at the end.
TOL = 0.05
#: Most tries before giving up.
TRIES = 60

C = TypeVar("C")


def match_rate(
    assign: Callable[[float], C], size: Callable[[C], float], target: float, unit: float
) -> tuple[float, C]:
    """The smallest ``lam`` (to `TOL`, assuming the size falls as ``lam`` grows) with
    ``size(assign(lam)) <= target``, and its ``assign(lam)``.

    ``unit`` is the first nonzero multiplier tried (the scale of ``lam``: the mean distortion
    per weight). Raises `DataError` when no multiplier fits.
    """
    g = _Sizes(assign, size, target)
    g0 = g(0.0)
    if g0 <= 0:
        return 0.0, g.best
    lo, hi, lam = 0.0, math.inf, unit
    for _ in range(TRIES):
        if g(lam) <= 0:
            hi = lam
        else:
            lo = lam
        if hi < math.inf and (hi - lo <= TOL * hi or hi < unit * 4.0**-30):
            return hi, g.best
        lam = _next(g, g0, lo, hi)
    raise DataError("no rate multiplier meets the plain assignment's coded size")


def _next(g: _Sizes, g0: float, lo: float, hi: float) -> float:
    """The next multiplier to try: ``lo`` the largest too big so far (0 if none), ``hi`` the
    smallest fitting (inf if none)."""
    known = sorted((lam, math.log(g0 - v)) for lam, v in g.known.items() if lam > 0 and v < g0)
    if len(known) >= 2 and lo > 0 and hi < math.inf:
        ends = [p for p in known if p[0] in (lo, hi)]
    else:
        ends = known[:1] + known[-1:] if lo == 0 else known[-2:]
    goal = math.log(g0)
    if len(ends) == 2 and ends[1][1] > ends[0][1]:
        (x0, y0), (x1, y1) = (math.log(ends[0][0]), ends[0][1]), (math.log(ends[1][0]), ends[1][1])
        slope = min(max((y1 - y0) / (x1 - x0), 0.1), 2.0)
        x = x1 + (goal - y1) / slope
    elif known:
        x = math.log(known[-1][0]) + (goal - known[-1][1]) / 0.75  # between sqrt and linear
    else:
        x = math.log(hi / 4.0 if lo == 0 else lo * 4.0)
    inner, outer = 1 - 0.9 * TOL, 1 / (1 - 0.9 * TOL)
    if lo == 0 or hi == math.inf:  # not bracketed yet: at most 4**6 away
        ref = math.log(hi if lo == 0 else lo)
        x = min(max(x, ref - 6 * math.log(4.0)), ref + 6 * math.log(4.0))
        return min(math.exp(x), hi * inner) if lo == 0 else max(math.exp(x), lo * outer)
    a, b = math.log(lo), math.log(hi)
    lam = math.exp(min(max(x, a + 0.1 * (b - a)), b - 0.1 * (b - a)))
    return min(max(lam, lo * outer), hi * inner)


class _Sizes(Generic[C]):
    """``lam -> size(assign(lam)) - target``, each ``lam`` assigned once (`known`); the result
    of the smallest fitting one kept (`best`)."""

    def __init__(self, assign: Callable[[float], C], size: Callable[[C], float], target: float):
        self.assign, self.size, self.target = assign, size, target
        self.known: dict[float, float] = {}
        self.best_lam = math.inf
        self.best: C

    def __call__(self, lam: float) -> float:
        if lam not in self.known:
            got = self.assign(lam)
            self.known[lam] = self.size(got) - self.target
            log.debug("rate multiplier %.6g: %+.6g bits over the target", lam, self.known[lam])
            if self.known[lam] <= 0 and lam < self.best_lam:
                self.best_lam, self.best = lam, got
        return self.known[lam]
