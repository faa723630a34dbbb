"""Small numeric facts shared by the quantizers and the coders: integer checks and entropy."""

from __future__ import annotations

import numbers

import numpy as np


def is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def entropy_bits(counts: np.ndarray | list[int] | list[float]) -> float:
    """Empirical (order-0) entropy ``-sum p log2 p`` of symbol counts, in bits per symbol.

    ``counts`` is array-like of shape (k,), nonnegative; zero counts are ignored and an empty or
    all-zero histogram has entropy 0.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    c = c[c > 0]
    n = c.sum()
    if n == 0:
        return 0.0
    p = c / n
    return float(max(-np.dot(p, np.log2(p)), 0.0))
