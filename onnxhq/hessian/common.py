"""What every Hessian estimator shares: the draws and their averaging loop, the checks, and the
floor."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..data import Dataset
from ..errors import ConfigError, DataError, NumericalError
from ..numeric import is_int

log = logging.getLogger(__name__)

#: The most samples of data whose draws are whole permutations of it (128 MiB of indices).
WHOLE_PERMUTATIONS = 2**24
#: Samples the estimators draw unless told otherwise.
DEFAULT_SAMPLES = 1000
#: Samples per gradient in the batched estimators (fisher, hutchinson, gauss-newton).
DEFAULT_BATCH = 16
#: Hutchinson's finite-difference step relative to each tensor's rms (see `hutchinson`).
DEFAULT_REL_STEP = 1e-4
#: Called with (samples done, samples in all).
Progress = Callable[[int, int], None]
#: A diagonal: weight name -> array shaped like the weight.
Diag = dict[str, np.ndarray]
#: One batch's contribution: the sum over its samples, keyed like the diagonal.
Step = Callable[[Dataset, np.random.Generator], Diag]


@dataclass(frozen=True)
class Draws:
    """How a sampling estimator draws from the data, checked on construction.

    ``samples`` inputs (whole random permutations of the data, so it may exceed the data size)
    cut into batches of ``batch_size``; ``seed`` fixes both the inputs drawn and the generator
    each batch's step gets (for random labels or probes), independently of ``batch_size``.
    Integral floats (``1000.0``) are taken as integers.
    """

    samples: int = DEFAULT_SAMPLES
    batch_size: int = DEFAULT_BATCH
    seed: int = 0

    def __post_init__(self) -> None:
        check_sizes(samples=self.samples, batch_size=self.batch_size)
        object.__setattr__(self, "samples", int(self.samples))
        object.__setattr__(self, "batch_size", int(self.batch_size))

    def order(self, n: int) -> np.ndarray:
        """The indices (into data of ``n`` samples) the draws visit, in order: ``samples`` of
        them, whole random permutations of ``range(n)`` one after another (past
        `WHOLE_PERMUTATIONS` samples of data, fewer samples are drawn without replacement
        straight away, with memory for them alone)."""
        if n < 1:
            raise DataError("the data holds no samples")
        data_rng = np.random.default_rng(self.seed).spawn(2)[0]
        if n > WHOLE_PERMUTATIONS and self.samples < n:  # not n indices for a few samples
            return data_rng.choice(n, self.samples, replace=False)
        passes = -(-self.samples // n)
        return np.concatenate([data_rng.permutation(n) for _ in range(passes)])[: self.samples]

    def rows(self, n: int) -> np.ndarray:
        """The samples of data of ``n`` samples that the draws read (sorted, each once): what
        `onnxhq.data.load_data` needs to read (``rows=``), for any ``batch_size``."""
        return np.unique(self.order(n))

    def mean(self, data: Dataset, step: Step, *, progress: Progress | None, method: str) -> Diag:
        """Mean over the draws of ``step``'s per-batch sums (float64), not yet floored.

        ``data`` may hold only the samples the draws read (`rows`, `onnxhq.data.Dataset.take`).
        """
        samples, batch_size = self.samples, self.batch_size
        order = self.order(data.source_size)
        draw_rng = np.random.default_rng(self.seed).spawn(2)[1]
        total: Diag = {}
        start_time = time.perf_counter()
        for start in range(0, samples, batch_size):
            for p, v in step(data.take(order[start : start + batch_size]), draw_rng).items():
                total[p] = total[p] + v if p in total else np.asarray(v, np.float64).copy()
            if progress is not None:
                progress(min(start + batch_size, samples), samples)
        log.info(
            "%s Hessian: %d samples in batches of %d, %.2f s",
            method,
            samples,
            batch_size,
            time.perf_counter() - start_time,
        )
        return {p: t / samples for p, t in total.items()}


def finalize(diag: Mapping[str, np.ndarray], *, floor_ratio: float = 1e-8) -> Diag:
    """Check finiteness and floor tiny entries at ``floor_ratio`` times the largest one.

    An entry that is exactly zero (a dead unit, a pruned weight, a clipped negative estimate)
    would let its weight move anywhere at no cost, and a cluster made only of such weights would
    have no weighted mean.

    Parameters
    ----------
    diag : name -> array (any shape), nonnegative.

    Returns
    -------
    name -> float32 array of the same shape, every entry ``>= floor_ratio * max``. A float32
    input with nothing to floor is returned itself, not a copy (the estimators' own arrays: a
    large model's diagonal is not held twice).
    """
    check_finite(diag, "Hessian diagonal")
    peak = max((float(np.max(v)) for v in diag.values() if np.size(v)), default=0.0)
    if peak <= 0:
        raise NumericalError(
            "every Hessian diagonal entry is zero; the loss does not depend on these weights"
        )
    floor = peak * floor_ratio
    floored = sum(int((np.asarray(v) < floor).sum()) for v in diag.values())
    if floored:
        log.info(
            "floored %d Hessian diagonal entries at %.3g (%.0e of the largest)",
            floored,
            floor,
            floor_ratio,
        )
    # a float32 tensor with nothing to floor is returned as it is: no second copy of a model
    return {p: _floored(v, floor) for p, v in diag.items()}


def _floored(v: np.ndarray, floor: float) -> np.ndarray:
    if isinstance(v, np.ndarray) and v.dtype == np.float32 and not (v < floor).any():
        return v
    return np.maximum(v, floor).astype(np.float32)


def check_sizes(*, samples: int, batch_size: int) -> None:
    """Refuse a sample count or batch size that is not a positive integer."""
    if not (_whole(samples) and samples >= 1):
        raise ConfigError(f"samples={samples} must be a positive integer")
    if not (_whole(batch_size) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")


def _whole(value: object) -> bool:
    # integral floats (1000.0) have always been accepted here
    if is_int(value):
        return True
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and float(value).is_integer()
    )


def squares(grads: Mapping[str, np.ndarray], what: str, *, scale: float = 1.0) -> Diag:
    """``scale * g^2`` (float64) of every gradient ``g`` in ``grads``, once all are checked
    finite (`check_finite`, ``what`` naming them): one batch's contribution to a diagonal."""
    check_finite(grads, what)
    if scale == 1:
        return {p: np.square(g, dtype=np.float64) for p, g in grads.items()}
    return {p: scale * np.square(g, dtype=np.float64) for p, g in grads.items()}


def check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Raise `NumericalError` naming the first tensor with a non-finite entry, and where."""
    for name, a in arrays.items():
        finite = np.isfinite(a)
        if not finite.all():
            first = np.unravel_index(int(np.argmin(finite)), np.shape(a))
            at = tuple(int(i) for i in first)
            raise NumericalError(
                f"the {what} of {name!r} has {np.size(a) - int(finite.sum())} non-finite entries "
                f"(first at index {at}: {np.asarray(a)[first]}); check the inputs' scaling and "
                "the weights for overflow or NaN"
            )
