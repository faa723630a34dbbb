"""The cross-entropy estimators (fisher, empirical-fisher, hutchinson) and the Adam alternative.

Each returns float32 arrays keyed by parameter name, shaped like the parameters, finite and
floored above zero (`onnxhq.hessian.common.finalize`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..data import Dataset
from ..errors import ConfigError, DataError
from .common import (
    DEFAULT_BATCH,
    DEFAULT_REL_STEP,
    Diag,
    Draws,
    Progress,
    check_finite,
    finalize,
    squares,
)
from .files import read_second_moment

if TYPE_CHECKING:
    from ..training.engine import GradientEngine

log = logging.getLogger(__name__)


def fisher(
    engine: GradientEngine,
    data: Dataset,
    *,
    samples: int = 1000,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: Progress | None = None,
) -> Diag:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} [g(x, y)^2]`` with labels sampled from the model.

    Sampled-label score vectors ``s_i`` have zero mean and are independent across samples, so for
    a batch of B samples the mean-loss gradient ``g = (1/B) sum s_i`` has
    ``E[B g^2] = (1/B) sum E[s_i^2]``: batching is exact in expectation and B times cheaper than
    per-sample gradients. The cross terms add variance: on the test MLP, batches of 8 give about
    twice the relative error of per-sample gradients for the same samples, at a seventh of the
    cost.
    """
    draws = Draws(samples, batch_size, seed)
    check_class_scores(engine, data)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        b = len(batch)
        labels = engine.sample_labels(batch.inputs, rng)
        _, grads = engine.loss_and_gradients(batch.inputs, labels)
        return squares(grads, "gradient", scale=b * b)  # b samples, each contributing b g^2

    return finalize(draws.mean(data, step, progress=progress, method="fisher"))


def empirical_fisher(
    engine: GradientEngine,
    data: Dataset,
    *,
    samples: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> Diag:
    """Mean of squared per-sample gradients with the true labels: ``mean_i g(x_i, y_i)^2``.

    Deterministic given the inputs drawn, so ``samples`` is capped at the data size.
    """
    draws = Draws(samples, seed=seed)
    check_labels(engine, data, "empirical-fisher")
    if 0 < data.source_size < draws.samples:
        log.info(
            "empirical-fisher: using all %d samples (asked for %d; repeats would add nothing)",
            data.source_size,
            draws.samples,
        )
        draws = replace(draws, samples=data.source_size)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        total: Diag = {}
        for i in range(len(batch)):
            one = batch.subset(np.array([i]))
            assert one.labels is not None  # check_labels
            _, grads = engine.loss_and_gradients(one.inputs, one.labels)
            for p, sq in squares(grads, "gradient").items():
                total[p] = total.get(p, 0.0) + sq
        return total

    return finalize(draws.mean(data, step, progress=progress, method="empirical-fisher"))


def hutchinson(
    engine: GradientEngine,
    data: Dataset,
    *,
    samples: int = 1000,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    rel_step: float = DEFAULT_REL_STEP,
    progress: Progress | None = None,
) -> Diag:
    """Hutchinson's ``E_z[z * (H z)]`` for the Hessian of the mean true-label cross-entropy.

    One Rademacher probe per batch; ``H z`` by central differences ``(g(w + e z) - g(w - e z)) / 2``
    with a step per tensor ``e_t = rel_step * rms(w_t)`` (rms(z) = 1), so each weight moves by
    ``rel_step`` of its tensor's scale whatever that scale is; dividing entry i by ``e_t`` again
    keeps the estimate unbiased. The default 1e-4 was measured on the trained LeNet-5 (ReLU,
    max-pool): ``H z`` at relative steps 1e-5..1e-4 agree within 3-4%; larger steps straddle ReLU
    kinks (15% apart at 1e-3), smaller ones lose float32 digits (6% at 3e-6). Averaged estimates
    that come out negative (noise, or genuinely negative curvature away from a minimum) are
    clipped at 0 and then floored: the quantizer needs nonnegative importances, and the absolute
    value would turn noise around zero into a spurious large importance.
    """
    draws = Draws(samples, batch_size, seed)
    if not rel_step > 0:
        raise ConfigError(f"rel_step={rel_step} must be positive (e.g. 1e-2)")
    check_labels(engine, data, "hutchinson")
    values = engine.values
    steps = _steps(values, rel_step)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        b = len(batch)
        z = {
            p: rng.integers(0, 2, size=v.shape).astype(np.float64) * 2 - 1
            for p, v in values.items()
        }
        plus = {p: (v + steps[p] * z[p]).astype(v.dtype) for p, v in values.items()}
        minus = {p: (v - steps[p] * z[p]).astype(v.dtype) for p, v in values.items()}
        labels = batch.labels
        assert labels is not None  # check_labels
        _, g_plus = engine.loss_and_gradients(batch.inputs, labels, plus)
        _, g_minus = engine.loss_and_gradients(batch.inputs, labels, minus)
        check_finite(g_plus, "gradient")
        check_finite(g_minus, "gradient")
        return {
            p: b * z[p] * (g_plus[p].astype(np.float64) - g_minus[p]) / (2 * steps[p]) for p in z
        }

    raw = draws.mean(data, step, progress=progress, method="hutchinson")
    check_finite(raw, "Hutchinson estimate")
    negative = sum(int((v < 0).sum()) for v in raw.values())
    if negative:
        log.info(
            "hutchinson: clipped %d negative entries of %d at 0",
            negative,
            sum(v.size for v in raw.values()),
        )
    return finalize({p: np.maximum(v, 0.0) for p, v in raw.items()})


def adam(
    state: str | os.PathLike | Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> Diag:
    """``sqrt(v_hat)`` of Adam's bias-corrected second moment for each name of ``shapes``.

    ``state`` is an npz keyed by initializer name (``tools/train_mnist.py`` writes one) or a
    mapping; names missing from it, wrong shapes, non-finite or negative entries raise
    `DataError`.
    """
    second = read_second_moment(state, shapes)
    return finalize({p: np.sqrt(v) for p, v in second.items()})


def check_class_scores(engine: GradientEngine, data: Dataset, *, rows: int = 64) -> np.ndarray:
    """Refuse an output that already holds probabilities with no Softmax node before it.

    The loss treats the class-score tensor as logits; probabilities fed as logits give a wrong
    Hessian. Returns the class scores (rows, classes) of the first ``rows`` samples.
    """
    scores = engine.logits(data.head(rows).inputs)
    name = engine.logits_name
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise DataError(
            f"class scores {name!r} have shape {scores.shape}; the cross-entropy Hessians need "
            "(N, classes >= 2); use the 'gauss-newton' Hessian for other outputs"
        )
    sums = scores.astype(np.float64).sum(axis=1)
    if scores.min() >= 0 and scores.max() <= 1 and np.abs(sums - 1).max() < 1e-3:
        raise DataError(
            f"output {name!r} holds probabilities (every row in [0, 1] sums to 1) but no Softmax "
            "node produces it, so it cannot serve as logits; name the logits with --output-name "
            "(output=), or use the 'gauss-newton' Hessian"
        )
    return scores


def check_labels(engine: GradientEngine, data: Dataset, method: str) -> None:
    """Refuse data without labels, or labels outside the model's classes."""
    if data.labels is None:
        raise DataError(
            f"the {method!r} Hessian needs the true labels: add an integer 'labels' array to the "
            "data file, or use 'fisher', which samples labels from the model"
        )
    classes = check_class_scores(engine, data).shape[1]
    labels = data.labels
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"labels range over [{labels.min()}, {labels.max()}] but the model scores "
            f"{classes} classes (0..{classes - 1})"
        )


def _steps(values: Mapping[str, np.ndarray], rel_step: float) -> dict[str, float]:
    """Finite-difference step per tensor: ``rel_step`` times its rms (the global rms if zero)."""
    sq = [np.square(v, dtype=np.float64) for v in values.values()]
    count = max(sum(s.size for s in sq), 1)
    overall = float(np.sqrt(sum(s.sum() for s in sq) / count)) or 1.0
    return {
        p: rel_step * (float(np.sqrt(np.mean(s))) if s.size and s.any() else overall)
        for p, s in zip(values, sq)
    }
