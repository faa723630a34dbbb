"""Diagonal Hessian estimates: the importance ``h_ii`` of each weight's quantization error.

Every estimator returns float32 arrays keyed by parameter name, shaped like the parameters, finite
and nonnegative. Their absolute scale does not matter to the quantizers (only ratios do).

``fisher`` (default, label-free)
    ``E_x E_{y~p(y|x)} g(x, y)^2`` with labels drawn from the model's own softmax: the Fisher
    diagonal, equal to the Gauss-Newton diagonal of the cross-entropy. Batched without bias (see
    `fisher`).
``empirical-fisher``
    ``E_x g(x, y_true)^2`` from per-sample gradients with the data's true labels.
``hutchinson``
    ``E_z[z * (H z)]`` for the Hessian ``H`` of the mean true-label cross-entropy, Rademacher ``z``,
    ``H z`` by central differences of two gradients. Needs labels.
``gauss-newton``
    ``diag(J^T J)`` of any float output (regression, embeddings) via random output projections;
    see `onnxhq.hessian_gn`.
``adam``
    ``sqrt(v_hat)`` of a supplied Adam second moment, the paper's free alternative to the Hessian.
``none``
    No weighting (plain k-means): `estimate` returns None.

Draws: ``samples`` inputs are drawn from the data as whole random permutations (so ``samples`` may
exceed the data size: each pass brings fresh labels or probes), then cut into batches. ``seed``
fixes both the inputs drawn and the random labels/probes, independently of ``batch_size``.

Floor: an entry that is exactly zero (a dead unit, a pruned weight, a clipped negative estimate)
would let its weight move anywhere at no cost, and a cluster made only of such weights would have
no weighted mean. `finalize` raises such entries to ``1e-8`` times the largest entry of all tensors.

Files: `save_hessian` / `load_hessian` (from `onnxhq.hessian_io`) write and validate ``.npz``
diagonals keyed by weight name.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Mapping

import numpy as np
import onnx

from .data import Dataset
from .errors import ConfigError, DataError, NumericalError
from .gradients import GradientEngine
from .hessian_gn import ProjectionEngine
from .hessian_io import load_hessian, read_second_moment, save_hessian  # noqa: F401  (public API)
from .model import initializer_map

log = logging.getLogger(__name__)

METHODS = ("fisher", "empirical-fisher", "hutchinson", "gauss-newton", "adam", "none")
#: Methods that need the data's true labels.
NEEDS_LABELS = ("empirical-fisher", "hutchinson")
Progress = Callable[[int, int], None]
Diag = dict[str, np.ndarray]


def fisher(engine: GradientEngine, data: Dataset, *, samples: int = 1000, batch_size: int = 16, seed: int = 0,
           progress: Progress | None = None) -> Diag:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} [g(x, y)^2]`` with labels sampled from the model's softmax.

    Sampled-label score vectors ``s_i`` have zero mean and are independent across samples, so for a
    batch of B samples the mean-loss gradient ``g = (1/B) sum s_i`` has
    ``E[B g^2] = (1/B) sum E[s_i^2]``: batching is exact in expectation and B times cheaper than
    per-sample gradients. The cross terms add variance: on the test MLP, batches of 8 give about
    twice the relative error of per-sample gradients for the same samples, at a seventh of the cost.
    """
    _check_sizes(samples=samples, batch_size=batch_size)
    _check_class_scores(engine, data)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        b = len(batch)
        _, grads = engine.loss_and_gradients(batch.inputs, engine.sample_labels(batch.inputs, rng))
        _check_finite(grads, "gradient")
        return {p: (b * b) * np.square(g, dtype=np.float64) for p, g in grads.items()}  # b samples x (b g^2)

    return finalize(_accumulate(data, step, samples=samples, batch_size=batch_size, seed=seed,
                                progress=progress, method="fisher"))


def empirical_fisher(engine: GradientEngine, data: Dataset, *, samples: int = 1000, seed: int = 0,
                     progress: Progress | None = None) -> Diag:
    """Mean of squared per-sample gradients with the true labels: ``mean_i g(x_i, y_i)^2``.

    Deterministic given the inputs drawn, so ``samples`` is capped at the data size.
    """
    _check_sizes(samples=samples, batch_size=1)
    _check_labels(engine, data, "empirical-fisher")
    if samples > len(data):
        log.info("empirical-fisher: using all %d samples (asked for %d; repeats would add nothing)", len(data), samples)
        samples = len(data)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        total: Diag = {}
        for i in range(len(batch)):
            one = batch.subset(np.array([i]))
            _, grads = engine.loss_and_gradients(one.inputs, one.labels)
            _check_finite(grads, "gradient")
            for p, g in grads.items():
                total[p] = total.get(p, 0.0) + np.square(g, dtype=np.float64)
        return total

    return finalize(_accumulate(data, step, samples=samples, batch_size=16, seed=seed, progress=progress,
                                method="empirical-fisher"))


def hutchinson(engine: GradientEngine, data: Dataset, *, samples: int = 1000, batch_size: int = 16, seed: int = 0,
               rel_step: float = 1e-4, progress: Progress | None = None) -> Diag:
    """Hutchinson's ``E_z[z * (H z)]`` for the Hessian of the mean true-label cross-entropy.

    One Rademacher probe per batch; ``H z`` by central differences ``(g(w + e z) - g(w - e z)) / 2``
    with a step per tensor ``e_t = rel_step * rms(w_t)`` (rms(z) = 1), so each weight moves by
    ``rel_step`` of its tensor's scale whatever that scale is; dividing entry i by ``e_t`` again keeps
    the estimate unbiased. The default 1e-4 was measured on the trained LeNet-5 (ReLU, max-pool):
    ``H z`` at relative steps 1e-5..1e-4 agree within 3-4%; larger steps straddle ReLU kinks (15%
    apart at 1e-3), smaller ones lose float32 digits (6% at 3e-6). Averaged estimates that come out negative (noise, or genuinely negative
    curvature away from a minimum) are clipped at 0 and then floored: the quantizer needs
    nonnegative importances, and the absolute value would turn noise around zero into a spurious
    large importance.
    """
    _check_sizes(samples=samples, batch_size=batch_size)
    if not rel_step > 0:
        raise ConfigError(f"rel_step={rel_step} must be positive (e.g. 1e-2)")
    _check_labels(engine, data, "hutchinson")
    steps = _steps(engine.values, rel_step)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        b = len(batch)
        z = {p: rng.integers(0, 2, size=v.shape).astype(np.float64) * 2 - 1 for p, v in engine.values.items()}
        plus = {p: (v + steps[p] * z[p]).astype(v.dtype) for p, v in engine.values.items()}
        minus = {p: (v - steps[p] * z[p]).astype(v.dtype) for p, v in engine.values.items()}
        _, g_plus = engine.loss_and_gradients(batch.inputs, batch.labels, plus)
        _, g_minus = engine.loss_and_gradients(batch.inputs, batch.labels, minus)
        _check_finite(g_plus, "gradient")
        _check_finite(g_minus, "gradient")
        return {p: b * z[p] * (g_plus[p].astype(np.float64) - g_minus[p]) / (2 * steps[p]) for p in z}

    raw = _accumulate(data, step, samples=samples, batch_size=batch_size, seed=seed, progress=progress,
                      method="hutchinson")
    _check_finite(raw, "Hutchinson estimate")
    negative = sum(int((v < 0).sum()) for v in raw.values())
    if negative:
        log.info("hutchinson: clipped %d negative entries of %d at 0", negative, sum(v.size for v in raw.values()))
    return finalize({p: np.maximum(v, 0.0) for p, v in raw.items()})


def gauss_newton(engine: ProjectionEngine, data: Dataset, *, samples: int = 1000, batch_size: int = 16, seed: int = 0,
                 progress: Progress | None = None) -> Diag:
    """Gauss-Newton diagonal ``E_x diag(J^T J)`` of the projected output, summed over output entries.

    With Rademacher ``r`` drawn independently for every output entry of the batch,
    ``E[(J^T r)^2] = sum over the batch of diag(J_x^T J_x)``, so one projected gradient per batch
    estimates the whole batch without bias, as in `fisher`.
    """
    _check_sizes(samples=samples, batch_size=batch_size)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        shape, dtype = engine.output_shape(batch.inputs)
        r = (rng.integers(0, 2, size=shape) * 2 - 1).astype(dtype)
        grads = engine.projected_gradients(batch.inputs, r)
        _check_finite(grads, "projected gradient")
        return {p: np.square(g, dtype=np.float64) for p, g in grads.items()}

    return finalize(_accumulate(data, step, samples=samples, batch_size=batch_size, seed=seed, progress=progress,
                                method="gauss-newton"))


def adam(state: str | os.PathLike | Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Diag:
    """``sqrt(v_hat)`` of Adam's bias-corrected second moment for each name of ``shapes``.

    ``state`` is an npz keyed by initializer name (``tools/train_mnist.py`` writes one) or a mapping;
    names missing from it, wrong shapes, non-finite or negative entries raise `DataError`.
    """
    second = read_second_moment(state, shapes)
    return finalize({p: np.sqrt(v) for p, v in second.items()})


def finalize(diag: Mapping[str, np.ndarray], *, floor_ratio: float = 1e-8) -> Diag:
    """Check finiteness and floor tiny entries at ``floor_ratio`` times the largest one (see module doc).

    Parameters
    ----------
    diag : name -> array (any shape), nonnegative.

    Returns
    -------
    name -> float32 array of the same shape, every entry ``>= floor_ratio * max``.
    """
    _check_finite(diag, "Hessian diagonal")
    peak = max((float(np.max(v)) for v in diag.values() if np.size(v)), default=0.0)
    if peak <= 0:
        raise NumericalError("every Hessian diagonal entry is zero; the loss does not depend on these weights")
    floor = peak * floor_ratio
    floored = sum(int((np.asarray(v) < floor).sum()) for v in diag.values())
    if floored:
        log.info("floored %d Hessian diagonal entries at %.3g (%.0e of the largest)", floored, floor, floor_ratio)
    return {p: np.maximum(v, floor).astype(np.float32) for p, v in diag.items()}


def estimate(method: str, engine: GradientEngine | None, data: Dataset | None, *, params: list[str],
             samples: int = 1000, batch_size: int | None = None, seed: int = 0, progress: Progress | None = None,
             rel_step: float | None = None, adam_state: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
             model: onnx.ModelProto | None = None, output: str | None = None) -> Diag | None:
    """Dispatch to the estimator called ``method``; ``none`` returns None (plain, unweighted).

    ``engine`` serves fisher, empirical-fisher and hutchinson. ``gauss-newton`` builds its own
    projection view of ``model`` (or of ``engine.model``) and ``output``; ``adam`` needs only
    ``adam_state`` and the parameters' shapes (from ``engine`` or ``model``). Options a method does
    not use must be left at None.
    """
    if method == "none":
        return None
    _check_options(method, batch_size=batch_size, rel_step=rel_step, adam_state=adam_state)
    if method == "adam":
        return adam(adam_state, _shapes(engine, model, params))
    if data is None:
        raise ConfigError(f"the {method!r} Hessian needs data: pass --data with model inputs")
    if method in NEEDS_LABELS and data.labels is None:
        raise DataError(f"the {method!r} Hessian needs the true labels: add an integer 'labels' array to the "
                        "data file, or use 'fisher', which samples labels from the model")
    common = dict(samples=samples, seed=seed, progress=progress, **({} if batch_size is None else
                                                                    {"batch_size": batch_size}))
    if method == "gauss-newton":
        source = model if model is not None else getattr(engine, "model", None)
        if source is None:
            raise ConfigError("the 'gauss-newton' Hessian needs the model")
        view = ProjectionEngine(source, params=list(params),
                                output=output if output is not None else getattr(engine, "output", None))
        diag = gauss_newton(view, data, **common)
    else:
        if engine is None:
            raise ConfigError(f"the {method!r} Hessian needs a gradient engine for the model")
        missing = [p for p in params if p not in engine.values]
        if missing:
            raise ConfigError(f"the gradient engine does not differentiate {missing[0]!r}; build it with params=")
        if method == "fisher":
            diag = fisher(engine, data, **common)
        elif method == "empirical-fisher":
            diag = empirical_fisher(engine, data, **common)
        else:
            diag = hutchinson(engine, data, **common, **({} if rel_step is None else {"rel_step": rel_step}))
    return {p: diag[p] for p in params}


# --- shared machinery ---------------------------------------------------------------------------------

def _accumulate(data: Dataset, step: Callable[[Dataset, np.random.Generator], Diag], *, samples: int,
                batch_size: int, seed: int, progress: Progress | None, method: str) -> Diag:
    """Mean over ``samples`` draws of ``step``'s per-batch sums (each batch sums over its samples)."""
    if len(data) == 0:
        raise DataError("the data holds no samples")
    data_rng, draw_rng = np.random.default_rng(seed).spawn(2)
    passes = -(-samples // len(data))
    order = np.concatenate([data_rng.permutation(len(data)) for _ in range(passes)])[:samples]
    total: Diag = {}
    start_time = time.perf_counter()
    for start in range(0, samples, batch_size):
        for p, v in step(data.subset(order[start:start + batch_size]), draw_rng).items():
            total[p] = total[p] + v if p in total else np.asarray(v, np.float64).copy()
        if progress is not None:
            progress(min(start + batch_size, samples), samples)
    log.info("%s Hessian: %d samples in batches of %d, %.2f s", method, samples, batch_size,
             time.perf_counter() - start_time)
    return {p: t / samples for p, t in total.items()}


def _check_options(method: str, *, batch_size, rel_step, adam_state) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown Hessian method {method!r}; choose one of {', '.join(METHODS)}")
    if rel_step is not None and method != "hutchinson":
        raise ConfigError(f"rel_step applies to the 'hutchinson' Hessian only, not to {method!r}")
    if adam_state is not None and method != "adam":
        raise ConfigError(f"an Adam state applies to the 'adam' Hessian only, not to {method!r}")
    if adam_state is None and method == "adam":
        raise ConfigError("the 'adam' Hessian needs an Adam second-moment state (.npz keyed by weight name)")
    if batch_size is not None and method in ("empirical-fisher", "adam"):
        raise ConfigError(f"batch_size does not apply to the {method!r} Hessian (it uses per-sample gradients "
                          "or no data)")


def _check_sizes(*, samples: int, batch_size: int) -> None:
    if int(samples) != samples or samples < 1:
        raise ConfigError(f"samples={samples} must be a positive integer")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")


def _check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    for name, a in arrays.items():
        finite = np.isfinite(a)
        if not finite.all():
            first = np.unravel_index(int(np.argmin(finite)), np.shape(a))
            raise NumericalError(f"the {what} of {name!r} has {np.size(a) - int(finite.sum())} non-finite entries "
                                 f"(first at index {tuple(int(i) for i in first)}: {np.asarray(a)[first]}); check "
                                 "the inputs' scaling and the weights for overflow or NaN")


def _check_class_scores(engine: GradientEngine, data: Dataset, *, rows: int = 64) -> np.ndarray:
    """Refuse an output that already holds probabilities with no Softmax node before it.

    The loss treats the class-score tensor as logits; probabilities fed as logits give a wrong
    Hessian. Returns the class scores of the first ``rows`` samples.
    """
    scores = engine.logits(data.head(rows).inputs)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise DataError(f"class scores {engine.logits_name!r} have shape {scores.shape}; the cross-entropy "
                        "Hessians need (N, classes >= 2); use the 'gauss-newton' Hessian for other outputs")
    sums = scores.astype(np.float64).sum(axis=1)
    if scores.min() >= 0 and scores.max() <= 1 and np.abs(sums - 1).max() < 1e-3:
        raise DataError(f"output {engine.logits_name!r} holds probabilities (every row in [0, 1] sums to 1) but no "
                        "Softmax node produces it, so it cannot serve as logits; name the logits with "
                        "--output-name (output=), or use the 'gauss-newton' Hessian")
    return scores


def _check_labels(engine: GradientEngine, data: Dataset, method: str) -> None:
    if data.labels is None:
        raise DataError(f"the {method!r} Hessian needs the true labels: add an integer 'labels' array to the "
                        "data file, or use 'fisher', which samples labels from the model")
    classes = _check_class_scores(engine, data).shape[1]
    if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= classes):
        raise DataError(f"labels range over [{data.labels.min()}, {data.labels.max()}] but the model scores "
                        f"{classes} classes (0..{classes - 1})")


def _steps(values: Mapping[str, np.ndarray], rel_step: float) -> dict[str, float]:
    """Finite-difference step per tensor: ``rel_step`` times its rms (the global rms for all-zero tensors)."""
    sq = [np.square(v, dtype=np.float64) for v in values.values()]
    overall = float(np.sqrt(sum(s.sum() for s in sq) / max(sum(s.size for s in sq), 1))) or 1.0
    return {p: rel_step * (float(np.sqrt(np.mean(s))) if s.size and s.any() else overall)
            for p, s in zip(values, sq)}


def _shapes(engine: GradientEngine | None, model: onnx.ModelProto | None, params: list[str]) -> dict[str, tuple]:
    if engine is not None and all(p in engine.values for p in params):
        return {p: engine.values[p].shape for p in params}
    if model is None:
        raise ConfigError("the 'adam' Hessian needs the model (or a gradient engine) to check the state's shapes")
    inits = initializer_map(model)
    missing = [p for p in params if p not in inits]
    if missing:
        raise ConfigError(f"the model has no initializer {missing[0]!r}")
    return {p: tuple(int(d) for d in inits[p].dims) for p in params}
