"""Per-tensor quantization error, and the guard against tensors that a shared codebook wrecks.

Every quantized tensor's error is measured as its relative error ``||w - q|| / ||w||`` and its
SQNR ``20 log10(||w|| / ||w - q||)`` in dB (infinite when exact). One network codebook, or one per
group of output channels, can leave a single tensor far worse off than a codebook of its own
would: a layer whose weights span a small part of the shared range, or whose importances are
near zero, ends in one or two cells. The guard finds such tensors in two steps:

1. a screen: a tensor is a suspect when its SQNR is below ``WRECK_DB`` (a relative error above
   0.32: the layer is mostly noise) and below ``expected_sqnr_db(R) - FAR_WORSE_DB``, with ``R``
   the bit budget (``log2 k`` for a number of codewords, the target for a target rate, the
   codebook's entropy for ECSQ's lam) and `expected_sqnr_db` the SQNR of uniform quantization
   of a Gaussian at ``R`` bits, ``6.02 R - 1.53`` dB. A tensor above both is left alone even if
   a codebook of its own would do better: sharing precision unevenly is what a network codebook
   and the importances are for;
2. a suspect is *flagged* when the same task on the tensor alone (its own codebook, as at layer
   scope, at the same rate: the same ``k`` or target, or ECSQ at the codebook's rate) gives an
   SQNR more than ``FAR_WORSE_DB`` higher, i.e. less than half the relative error.

Policies (``guard=``): ``"requantize"`` (default) gives each flagged tensor that codebook of its
own, so no flagged tensor is left (that costs the rate of one more codebook, and the shared
codebook keeps the values it had); ``"warn"`` only flags and logs; ``"off"`` skips the check.
A tensor named like the shared codebook (``"shared"``) cannot get a codebook of its own at
network scope and stays flagged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..numeric import entropy_bits
from ..options.parts import GUARDS  # noqa: F401  (re-exported: one list for options and here)
from ._fits import Task
from .codes import QuantizedWeights, TensorCodes

log = logging.getLogger(__name__)

#: How much worse than its budget (screen) and than its own codebook (flag) a tensor may be, dB.
FAR_WORSE_DB = 6.0
#: Below this SQNR (dB) a tensor is a suspect, if also far below its budget.
WRECK_DB = 10.0
#: Elements per chunk of the error sums (float64 temporaries stay small).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorError:
    """How far one quantized tensor is from the original.

    Attributes
    ----------
    rel_error : float, ``||w - q|| / ||w||`` (0 when exact; inf when ``w`` is all zero and ``q``
        is not).
    sqnr_db : float, ``-20 log10(rel_error)`` in dB: inf when exact.
    """

    rel_error: float
    sqnr_db: float


def tensor_error(w: np.ndarray, q: np.ndarray) -> TensorError:
    """The error of ``q`` (any float array) as a quantization of ``w`` (same shape).

    Norms are summed in float64 with the arrays scaled by a power of two, so neither tiny nor
    huge magnitudes overflow or underflow.
    """
    w, q = np.asarray(w), np.asarray(q)
    nw, ew = _scaled_norm(w, None)
    nd, ed = _scaled_norm(w, q)
    if nd == 0.0:
        return TensorError(0.0, math.inf)
    if nw == 0.0:
        return TensorError(math.inf, -math.inf)
    rel = _ldexp(nd / nw, ed - ew)
    return TensorError(rel, -20.0 * math.log10(rel) if rel > 0 else math.inf)


def expected_sqnr_db(bits: float) -> float:
    """SQNR in dB of uniform quantization and entropy coding at ``bits`` (Gaussian, high rate)."""
    return 6.02 * bits - 1.53


def measure_errors(weights: Mapping[str, np.ndarray], qw) -> dict[str, TensorError]:
    """`tensor_error` of every tensor of ``qw`` (a `QuantizedWeights`) against ``weights``.

    Use it again after fine-tuning the codebooks: the errors stored on the result are those of the
    quantization itself.
    """
    return {name: tensor_error(weights[name], qw.dequantize(name)) for name in sorted(qw.tensors)}


def find_flagged(
    errors: Mapping[str, TensorError],
    budgets: Mapping[str, float],
    alone: Callable[[str], TensorError],
) -> dict[str, TensorError]:
    """The flagged tensors, each with the error its own codebook gives (see the module doc).

    ``budgets``: name -> bit budget of the tensors the guard checks. ``alone(name)`` quantizes a
    suspect alone and returns its error; it runs only for suspects, in sorted order.
    """
    flagged = {}
    for name in sorted(budgets):
        err = errors[name]
        if not err.sqnr_db < min(WRECK_DB, expected_sqnr_db(budgets[name]) - FAR_WORSE_DB):
            continue
        own = alone(name)
        if own.sqnr_db > err.sqnr_db + FAR_WORSE_DB:
            flagged[name] = own
    return flagged


def apply_guard(
    qw: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    task: Task,
    policy: str,
    solo: Callable[[str, Task], tuple[np.ndarray, np.ndarray]],
) -> QuantizedWeights:
    """``qw`` with each tensor its shared codebook wrecks flagged, or given a codebook of its own.

    Parameters
    ----------
    qw : a network or channel-group result, with its errors.
    weights : name -> the original weights.
    task : the quantization task of ``qw``.
    policy : ``"requantize"`` or ``"warn"`` (see the module doc).
    solo : ``solo(name, task)`` quantizes one tensor alone: (float32 codebook (k,), int32 indices
        of the weight's shape).
    """
    budgets = _budgets(qw, task)
    own = {}

    def alone(name: str) -> TensorError:
        # the same k or target; ECSQ's lam means another rate alone, so its codebook's rate
        same = task if task.lam is None else replace(task, lam=None, target_bits=budgets[name])
        book, idx = own[name] = solo(name, same)
        return tensor_error(weights[name], book[idx])

    flagged = find_flagged(qw.errors, budgets, alone)
    if not flagged:
        return qw
    report = ", ".join(
        f"{n} ({qw.errors[n].sqnr_db:.1f} dB; alone {e.sqnr_db:.1f} dB)" for n, e in flagged.items()
    )
    # a tensor's own codebook is keyed by its name: free unless another tensor uses that key
    used = {c.codebook for m, c in qw.tensors.items() if m not in flagged}
    moved = [n for n in flagged if policy == "requantize" and n not in used]
    if not moved:
        log.warning(
            "%d tensors are far worse off than in a codebook of their own (left as they are): %s",
            len(flagged),
            report,
        )
        return replace(qw, flagged=tuple(flagged))
    log.warning(
        "%d tensors were far worse off than in a codebook of their own, and now have one: %s",
        len(moved),
        report,
    )
    books, codes, errors = dict(qw.codebooks), dict(qw.tensors), dict(qw.errors)
    for name in moved:
        books[name], idx = own[name]
        codes[name] = TensorCodes(name, idx, None)
        errors[name] = flagged[name]
    left = tuple(n for n in flagged if n not in moved)
    return QuantizedWeights(books, codes, errors, left, tuple(moved))


def _budgets(qw: QuantizedWeights, task: Task) -> dict[str, float]:
    """Each tensor's bit budget: ``log2 k``, the target, or its codebook's entropy (lam)."""
    if task.k is not None:
        return {name: math.log2(task.k) for name in qw.tensors}
    if task.target_bits is not None:
        return {name: task.target_bits for name in qw.tensors}
    bits: dict[str, float] = {}
    for key in {c.codebook for c in qw.tensors.values()}:
        idx = [c.indices.ravel() for c in qw.tensors.values() if c.codebook == key]
        bits[key] = entropy_bits(np.bincount(np.concatenate(idx)))
    return {name: bits[c.codebook] for name, c in qw.tensors.items()}


def _scaled_norm(w: np.ndarray, q: np.ndarray | None) -> tuple[float, int]:
    """``(n, e)`` with ``||w - q|| = n * 2**e`` (``||w||`` when ``q`` is None)."""
    a, b = w.ravel(), None if q is None else q.ravel()
    top = 0.0
    for s in range(0, a.size, _CHUNK):
        x = a[s : s + _CHUNK].astype(np.float64)
        if b is not None:
            x -= b[s : s + _CHUNK]
        top = max(top, float(np.max(np.abs(x))) if x.size else 0.0)
    if top == 0.0:
        return 0.0, 0
    e = int(np.frexp(top)[1])
    total = 0.0
    for s in range(0, a.size, _CHUNK):
        x = a[s : s + _CHUNK].astype(np.float64)
        if b is not None:
            x -= b[s : s + _CHUNK]
        x = np.ldexp(x, -e)
        total += float(np.dot(x, x))
    return math.sqrt(total), e


def _ldexp(x: float, e: int) -> float:
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf
