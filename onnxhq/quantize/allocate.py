"""Scope ``allocated``: one codebook per tensor, rates set by one Hessian-weighted slope.

At high rate a uniform grid of step ``D`` on weights of mean importance ``m`` costs about
``m D**2 / 12`` per weight in importance-weighted squared error and ``log2(1 / D)`` + const bits
per weight; minimising the network's total error at a total rate makes the marginal error per bit
equal in every tensor, which gives ``D_l = c / sqrt(m_l)``: one constant ``c`` for the network.
`allocate_layers` tries, for every tensor, the grids ``c_j / sqrt(m_l)`` on one ladder of
constants ``c_j`` (steps ``STEP_RATIO`` apart) and measures each: its importance-weighted squared
error and its bits (the indices at their entropy plus 32 bits per codebook value, as
`onnxhq.quantize.coded_bits`: a small tensor on a fine grid pays for its codebook). For one
multiplier ``lam`` (error per bit) each tensor takes the grid minimising ``error + lam * bits``;
``lam`` is searched so that all the tensors together take at most ``target_bits`` per weight. So
the tensors differ in rate, more bits going where the importances say errors cost more, and where
codebook values cost nothing and the high-rate model holds every tensor takes the same ``c``.
Network scope shares one step (right only when the tensors' mean importances are equal); layer
scope meets the target in each tensor (equal rates, unequal slopes). Uniform quantization at
``target_bits`` only; without importances every ``m_l`` is 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from ..numeric import entropy_bits
from ._fits import Fit, Task, fit_uniform
from ._quantize import _assemble, _labels
from ._sorted import SortedWeights, sort_weights
from .uniform import finest_step

#: Most cells of one tensor's grid: a codebook holds at most 65,536 codewords (uint16 indices),
#: one of them kept for the pruned weights' 0.0. A tensor far more important than the rest
#: would otherwise be given a grid finer than its codebook can hold.
MAX_CELLS = 65_535
#: Ratio of neighbouring grid steps tried per tensor (about 1/4 bit per weight apart at high
#: rate), and how many: from a grid of about one cell per tensor down to 2**-20 of it.
STEP_RATIO = 2.0**0.25
STEPS = 84
#: Bits per codebook value (float32), as `onnxhq.quantize.coded_bits` counts them.
VALUE_BITS = 32.0


def allocate_layers(
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]], task: Task
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per tensor a codebook and indices on the grid chosen by one slope (see the module doc).

    Parameters
    ----------
    tensors : name -> (weights of any shape, importances flat or None, pruned mask flat or None),
        validated (`onnxhq.quantize.scope`); the importances floored, not all zero.
    task : a uniform `Task` with ``target_bits``: bits per weight over all the tensors' weights,
        the indices at their entropy (pruned weights as their 0.0 codeword) plus 32 bits per
        codebook value.

    Returns
    -------
    (codebooks, indices) : name -> float32 codebook (k_l,); name -> int32 indices, the weight's
    shape. At most ``task.target_bits`` per weight where any choice of grids reaches it (else
    the finest grids).
    """
    if task.method != "uniform" or task.target_bits is None:
        raise ConfigError(
            f"scope 'allocated' sets each tensor's grid step from one rate target: it takes "
            f"method 'uniform' with target_bits (got method {task.method!r}"
            f"{', target_bits' if task.target_bits is not None else ', no target_bits'})"
        )
    layers = {name: _Layer(*t) for name, t in sorted(tensors.items())}
    top = max(layer.span * layer.root for layer in layers.values()) * 2.0
    c = top * STEP_RATIO ** -np.arange(STEPS, dtype=np.float64)
    tables = {name: layer.table(c, task) for name, layer in layers.items()}
    budget = task.target_bits * sum(layer.size for layer in layers.values())
    choice = _choose(tables, budget)
    books, indices = {}, {}
    for name, layer in layers.items():
        books[name], indices[name] = layer.codes(layer.fit(c[choice[name]], task))
    return books, indices


def _choose(tables: dict[str, np.ndarray], budget: float) -> dict[str, int]:
    """Per tensor the index of the grid minimising ``error + lam * bits`` (``tables``: name ->
    (2, STEPS) error and bits), ``lam`` the smallest (to 1e-6 in log) whose total bits fit
    ``budget``; where none fits, every tensor's fewest-bits grid."""

    def pick(lam: float) -> tuple[float, dict[str, int]]:
        choice = {n: int(np.argmin(t[0] + lam * t[1])) for n, t in tables.items()}
        return sum(float(tables[n][1, j]) for n, j in choice.items()), choice

    error = sum(float(np.max(t[0])) for t in tables.values())
    lo, hi = -60.0, float(np.log(max(error, 1e-300) + 1.0)) + 40.0  # log lam
    bits, best = pick(float(np.exp(hi)))
    if bits > budget:
        return {n: int(np.argmin(t[1])) for n, t in tables.items()}
    bits, choice = pick(float(np.exp(lo)))
    if bits <= budget:
        return choice
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        bits, choice = pick(float(np.exp(mid)))
        if bits <= budget:
            hi, best = mid, choice
        else:
            lo = mid
    return best


class _Layer:
    """One tensor's sorted unpruned weights and its share of the slope: ``sqrt(mean h)``."""

    def __init__(self, w: np.ndarray, h: np.ndarray | None, p: np.ndarray | None) -> None:
        self.shape, self.w, self.h, self.p = w.shape, w.ravel(), h, p
        self.size = self.w.size
        self.n_pruned = 0 if p is None else int(np.count_nonzero(p))
        self.wu = self.w if p is None else self.w[~p]
        hu = None if h is None else (h if p is None else h[~p])
        self.sw: SortedWeights = sort_weights(self.wu, hu)
        mean = 1.0 if hu is None or not hu.size else float(np.mean(hu, dtype=np.float64))
        self.root = float(np.sqrt(mean)) if mean > 0 else 1.0
        v = self.sw.values
        self.span = float(max(abs(v[0]), abs(v[-1]))) if v.size else 0.0
        self.least_step = 2.0 * self.span / (MAX_CELLS - 1)  # at most MAX_CELLS cells

    def fit(self, c: float, task: Task) -> Fit | None:
        if not self.wu.size:
            return None
        return fit_uniform(self.sw, max(c / self.root, self.least_step), task)

    def table(self, c: np.ndarray, task: Task) -> np.ndarray:
        """(2, len(c)): the importance-weighted squared error and the bits at each ``c``; grids
        finer than the weights resolve repeat the finest one's figures."""
        out = np.zeros((2, c.size))
        finest = finest_step(self.sw) if self.wu.size else 0.0
        for j, cj in enumerate(c):
            if j and max(cj / self.root, self.least_step) <= finest:
                out[:, j] = out[:, j - 1]
                continue
            f = self.fit(cj, task)
            counts = np.append(np.zeros(0, np.int64) if f is None else f.counts, self.n_pruned)
            k = int(np.count_nonzero(counts))
            out[0, j] = 0.0 if f is None else f.distortion
            out[1, j] = entropy_bits(counts) * self.size + VALUE_BITS * k
        return out

    def codes(self, fit: Fit | None) -> tuple[np.ndarray, np.ndarray]:
        if fit is None:  # every weight pruned: the 0.0 codeword alone
            return np.zeros(1, np.float32), np.zeros(self.shape, np.int32)
        assert fit.thresholds is not None  # fit_uniform gives thresholds
        labels = _labels(self.sw, self.wu, fit.thresholds)
        q = _assemble(self.w, self.h, self.p, fit, labels)
        return q.codebook.astype(np.float32), q.indices.reshape(self.shape)
