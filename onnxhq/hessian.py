"""Diagonal Hessian estimates: the importance ``h_ii`` of each weight's quantization error.

All estimators return float32 arrays keyed by parameter name, shaped like the parameters, finite
and nonnegative. Their absolute scale does not matter to the quantizers (only ratios do).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import numpy as np

from .data import Dataset
from .errors import ConfigError, NumericalError
from .gradients import GradientEngine, check_finite

log = logging.getLogger(__name__)

METHODS = ("fisher", "none")


def fisher(engine: GradientEngine, data: Dataset, *, samples: int = 1000, batch_size: int = 16, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} [g(x, y)^2]`` with labels sampled from the model's softmax.

    Sampled-label score vectors have zero mean and are independent across samples, so for a batch of
    B samples with mean loss, ``B * g_batch^2`` is an unbiased estimate: batching is exact in
    expectation and B times cheaper than per-sample gradients.
    """
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples={samples} and batch_size={batch_size} must be at least 1")
    rng = np.random.default_rng(seed)
    n = min(samples, len(data))
    chosen = data.subset(rng.permutation(len(data))[:n])
    total = {p: np.zeros(engine.values[p].shape, np.float64) for p in engine.params}
    done = 0
    for inputs, _ in chosen.batches(batch_size):
        b = len(next(iter(inputs.values())))
        labels = engine.sample_labels(inputs, rng)
        _, grads = engine.loss_and_gradients(inputs, labels)
        check_finite(grads)
        for p, g in grads.items():
            total[p] += b * b * np.square(g, dtype=np.float64)  # b samples times the estimate b * g^2
        done += b
        if progress is not None:
            progress(done, n)
    return finalize({p: t / n for p, t in total.items()})


def finalize(diag: Mapping[str, np.ndarray], *, floor_ratio: float = 1e-8) -> dict[str, np.ndarray]:
    """Check finiteness and floor tiny entries at ``floor_ratio`` times the largest one.

    A weight whose estimated importance is exactly zero would otherwise be free to move anywhere;
    the floor keeps the clustering well-posed without changing any ratio that matters.
    """
    check_finite(diag, what="Hessian diagonal")
    peak = max((float(np.max(v)) for v in diag.values() if np.size(v)), default=0.0)
    if peak <= 0:
        raise NumericalError("every Hessian diagonal entry is zero; the loss does not depend on these weights")
    floor = peak * floor_ratio
    return {p: np.maximum(v, floor).astype(np.float32) for p, v in diag.items()}


def estimate(method: str, engine: GradientEngine | None, data: Dataset | None, *, params: list[str], **options) -> dict[str, np.ndarray] | None:
    """Dispatch to the estimator called ``method``; ``none`` returns None (plain, unweighted)."""
    if method == "none":
        return None
    if method not in METHODS:
        raise ConfigError(f"unknown Hessian method {method!r}; choose one of {', '.join(METHODS)}")
    if engine is None or data is None:
        raise ConfigError(f"the {method!r} Hessian needs data: pass --data with model inputs")
    diag = fisher(engine, data, **options)
    return {p: diag[p] for p in params}
