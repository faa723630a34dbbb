"""Pruning: zero the least important weights, then retrain the rest with the pruned ones at zero.

Two criteria rank the weights:

- ``magnitude``: ``|w_i|`` (Han et al., "Learning both weights and connections", 2015);
- ``saliency``: ``h_ii * w_i**2``, the second-order loss increase from setting ``w_i`` to zero
  when the Hessian is taken as diagonal (LeCun et al., "Optimal brain damage", 1990). ``h_ii``
  are the same importances the Hessian-weighted quantizers use.
- ``obs``: SparseGPT (Frantar & Alistarh 2023), Optimal Brain Surgeon per layer on the layer-wise
  Hessian ``X X^T`` of its inputs (`onnxhq.layer_inputs`): each block of 128 input columns
  prunes the entries of least ``w^2 / [H^-1]_cc`` and the surviving weights are updated to cancel
  the pruned ones' effect on the layer's outputs (`obs_prune`), so even one-shot pruning without
  retraining keeps much of the accuracy. Needs model inputs only (labels only to retrain). Per
  layer the target is met to rounding in each block; at ``global`` scope one ``|w|`` threshold
  over all weights sets each layer's share (layer-wise Hessians are not comparable across layers).
  Weights without a layer Hessian (other ops than MatMul, Gemm, Conv) are pruned by magnitude.

The ``global`` scope ranks all weights together, the ``layer`` scope prunes each tensor to its own
sparsity. Biases are never pruned. Pruning in a few steps with retraining between them loses much
less accuracy than pruning to a high sparsity in one shot; already-zero weights rank lowest, so
each step's mask lies inside the previous one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset, check_label_range
from .errors import ConfigError, DataError
from .hessian import fisher
from .layer_inputs import layer_hessians
from .layerwise import DAMP, LayerHessian, from_view, inverse_cholesky, matrix_view
from .layerwise import obs_prune_columns as _obs_columns
from .model import load_model, quantizable_weights, read_initializers, replace_initializers
from .options import PRUNE_CRITERIA as CRITERIA
from .options import PRUNE_SCOPES as SCOPES  # noqa: F401 (the scopes prune_masks takes)
from .options import OptionError
from .options.parts import check_choice
from .options.pruning import check_prune_options, check_sparsity
from .training.engine import GradientEngine
from .training.train import Augment, Rate, cosine_lr, train

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


def prune_masks(
    weights: Mapping[str, np.ndarray],
    *,
    sparsity: float | Mapping[str, float],
    criterion: str = "magnitude",
    importances: Mapping[str, np.ndarray] | None = None,
    scope: str | None = None,
) -> dict[str, np.ndarray]:
    """Boolean keep-masks that prune a fraction ``sparsity`` of ``weights``.

    Parameters
    ----------
    weights : name -> float array of any shape.
    sparsity : fraction in [0, 1) of the weights to set to zero: one number, or name -> fraction
        (per-layer targets; names left out are not pruned).
    criterion : ``magnitude`` (rank by ``|w|``) or ``saliency`` (rank by ``h * w**2``); for
        ``obs`` use `obs_prune`, which also updates the surviving weights.
    importances : name -> nonnegative array shaped like the weight (the Hessian diagonal ``h``);
        required by ``saliency``.
    scope : ``global`` ranks all weights together against one target; ``layer`` prunes each tensor
        to its own fraction. Default: ``global`` for one number, ``layer`` for a mapping.

    Returns
    -------
    masks : name -> bool array shaped like the weight, True where the weight is kept. Exactly
        ``round(sparsity * size)`` entries are False (of all weights together for ``global``);
        ties are broken by position, so the result is deterministic.
    """
    scope, targets = _check_targets(weights, sparsity, scope)
    scores = _scores(weights, criterion, importances)
    if scope == "global":
        return _prune_global(scores, targets)
    return {name: _prune_one(s, targets.get(name, 0.0)) for name, s in scores.items()}


def obs_prune(
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
    *,
    sparsity: float | Mapping[str, float],
    scope: str | None = None,
    keep: Mapping[str, np.ndarray] | None = None,
    damp: float = DAMP,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SparseGPT: prune ``weights`` and update the survivors to cancel the error (module doc).

    Parameters
    ----------
    weights : name -> float array.
    hessians : name -> `LayerHessian` (`onnxhq.layer_inputs.layer_hessians`); names left out
        are pruned by magnitude, without updates.
    sparsity, scope : as `prune_masks` (``global``: the layers' shares from one ``|w|``
        threshold).
    keep : earlier keep-masks; what they pruned stays pruned.
    damp : relative dampening of ``H``.

    Returns
    -------
    (weights, masks) : new arrays (the dtype of each input; pruned entries exactly 0) and name ->
        bool keep-mask.
    """
    scope, targets = _check_targets(weights, sparsity, scope)
    if scope == "global":
        shares = _prune_global({n: np.abs(np.asarray(w, np.float64)) for n, w in weights.items()},
                               targets)  # fmt: skip
        targets = {n: 1.0 - float(np.mean(m)) for n, m in shares.items()}
    new, masks = {}, {}
    for name, w in weights.items():
        fraction = targets.get(name, 0.0)
        forced = np.zeros(np.shape(w), bool) if keep is None or name not in keep else ~keep[name]
        lh = hessians.get(name)
        if lh is None:
            score = np.where(forced, -1.0, np.abs(np.asarray(w, np.float64)))
            masks[name] = _prune_one(score, max(fraction, float(np.mean(forced))))
            new[name] = np.where(masks[name], w, 0).astype(np.asarray(w).dtype)
            continue
        view, fview = matrix_view(np.asarray(w, np.float64), lh), matrix_view(forced, lh)
        out, kept = np.empty(view.shape), np.empty(view.shape, bool)
        start = 0
        for b in lh.blocks:
            cols = slice(start, start + b.shape[-1])
            for g in range(lh.groups):
                u = inverse_cholesky(b[g], damp)
                out[g][:, cols], kept[g][:, cols] = _obs_columns(
                    view[g][:, cols], u, fraction, fview[g][:, cols]
                )
            start += b.shape[-1]
        masks[name] = from_view(kept, np.shape(w), lh)
        new[name] = from_view(out, np.shape(w), lh).astype(np.asarray(w).dtype)
    return new, masks


def apply_masks(
    weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Copies of ``weights`` with masked-out entries exactly zero (unmasked names copied as is)."""
    return {
        n: np.where(masks[n], w, 0).astype(w.dtype) if n in masks else np.array(w, copy=True)
        for n, w in weights.items()
    }


def sparsity_of(masks: Mapping[str, np.ndarray]) -> float:
    """Fraction of pruned entries over all masks together."""
    total = sum(m.size for m in masks.values())
    return (
        0.0
        if total == 0
        else float(sum(m.size - np.count_nonzero(m) for m in masks.values()) / total)
    )


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """Sparsities of ``steps`` pruning steps ending at ``target``: the cubic ramp of Zhu & Gupta.

    ``s_t = target * (1 - (1 - t / steps) ** 3)`` prunes most in the first steps, while the network
    still has redundant weights, and little near the end.
    """
    if steps < 1:
        raise OptionError(f"steps={steps} must be an integer >= 1", "steps")
    return [target * (1.0 - (1.0 - t / steps) ** 3) for t in range(1, steps + 1)]


def prune_model(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    data: Dataset,
    *,
    sparsity: float | Mapping[str, float],
    criterion: str = "magnitude",
    scope: str | None = None,
    steps: int = 4,
    retrain_epochs: float = 1.0,
    lr: Rate = 3e-4,
    batch_size: int = 64,
    hessian_samples: int = 1000,
    output: str | None = None,
    seed: int = 0,
    augment: Augment | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Prune ``model``'s quantizable weights to ``sparsity`` in ``steps`` steps, retraining each.

    Parameters
    ----------
    model : a classifier (path, bytes or ModelProto); its Conv/ConvTranspose/Gemm/MatMul weights are
        pruned, every float parameter (biases included) is retrained.
    data : training inputs with labels (labels may be absent when ``retrain_epochs`` is 0).
    sparsity, criterion, scope : as in `prune_masks`; ``saliency`` re-estimates the diagonal
        Fisher (``hessian_samples`` samples) before every step, ``obs`` the layer Hessians of the
        current model (`obs_prune`; no labels needed without retraining).
    steps : pruning steps on `sparsity_schedule`; 1 is one-shot pruning.
    retrain_epochs : epochs of masked Adam retraining after each step (0: no retraining).
    lr : a number is the peak of a cosine decay (to 1% of it) within each step; a function gets
        the fraction of all retraining done (0..1) and returns the rate.
    augment : optional ``(feed, rng) -> feed`` applied to each training batch.
    progress : called with (stage, done, total); stages ``hessian`` and ``retrain``.

    Returns
    -------
    (model, masks) : a pruned copy of the model (pruned weights exactly zero) and name -> bool
        keep-mask for each pruned weight.
    """
    check_prune_options(sparsity=sparsity, criterion=criterion, scope=scope, steps=steps,
                        retrain_epochs=retrain_epochs, lr=lr, batch_size=batch_size,
                        hessian_samples=hessian_samples, seed=seed)  # fmt: skip
    if retrain_epochs > 0 and data.labels is None:
        raise DataError(
            "retraining after pruning needs labels: add an integer 'labels' array to the data"
        )
    proto = load_model(model)
    names = [w.name for w in quantizable_weights(proto)]
    if not names:
        raise ConfigError(
            "the model has no prunable weights (float initializers of Conv, ConvTranspose, Gemm, "
            "MatMul)"
        )
    weights = read_initializers(proto, names)
    _check_targets(weights, sparsity, scope)  # fail before building the engine
    engine = GradientEngine(proto, output=output)
    if data.labels is not None:  # out-of-range labels crash onnxruntime's loss
        check_label_range(data, engine.logits(data.head(1).inputs).shape[-1])
    schedule = sparsity_schedule(1.0, steps)
    masks: dict[str, np.ndarray] = {}
    for step, fraction in enumerate(schedule):
        target = _scaled(sparsity, fraction)
        current = {n: engine.values[n] for n in names}
        importances = None
        if criterion == "saliency":
            report = (
                None if progress is None else (lambda done, total: progress("hessian", done, total))
            )
            importances = fisher(
                engine, data, samples=hessian_samples, seed=seed + step, progress=report
            )
        if criterion == "obs":
            report = None if progress is None else (lambda d, t: progress("layer inputs", d, t))
            hessians = layer_hessians(replace_initializers(proto, current), data.inputs, names,
                                      samples=hessian_samples, seed=seed + step,
                                      progress=report)  # fmt: skip
            updated, masks = obs_prune(
                current, hessians, sparsity=target, scope=scope, keep=masks or None
            )
            engine.with_values(updated)
        else:
            masks = prune_masks(
                current, sparsity=target, criterion=criterion, importances=importances, scope=scope
            )
            engine.with_values(apply_masks(current, masks))
        log.info("prune step %d/%d: sparsity %.4f", step + 1, steps, sparsity_of(masks))
        if retrain_epochs > 0:
            _retrain(
                engine,
                data,
                masks,
                step,
                steps,
                retrain_epochs=retrain_epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                augment=augment,
                progress=progress,
            )
    return replace_initializers(proto, engine.values), masks


def _retrain(
    engine: GradientEngine,
    data: Dataset,
    masks: dict[str, np.ndarray],
    step: int,
    steps: int,
    *,
    retrain_epochs: float,
    lr: Rate,
    batch_size: int,
    seed: int,
    augment: Augment | None,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    """Masked Adam retraining after pruning step ``step`` of ``steps``; sets the engine's values."""
    if callable(lr):
        schedule = lr
        rate: Callable[[float], float] = lambda f: schedule((step + f) / steps)  # noqa: E731
    else:
        rate = cosine_lr(lr)  # a fresh cosine within each step
    losses: list[float] = []

    def track(done: int, n: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress("retrain", step * n + done, steps * n)

    assert data.labels is not None  # prune_model checks before any work
    train(
        engine,
        data.inputs,
        data.labels,
        epochs=retrain_epochs,
        batch_size=batch_size,
        lr=rate,
        seed=seed * 1000 + step,
        masks=masks,
        augment=augment,
        progress=track,
    )
    tail = losses[-max(1, len(losses) // 10) :]
    log.info(
        "retrained %d batches; mean loss of the last tenth %.4f", len(losses), float(np.mean(tail))
    )


def _scaled(sparsity: float | Mapping[str, float], fraction: float) -> float | dict[str, float]:
    if isinstance(sparsity, Mapping):
        return {n: s * fraction for n, s in sparsity.items()}
    return sparsity * fraction


def _check_targets(
    weights: Mapping[str, np.ndarray], sparsity, scope: str | None
) -> tuple[str, dict[str, float]]:
    scope = check_sparsity(sparsity, scope)
    targets = dict(sparsity) if isinstance(sparsity, Mapping) else {n: sparsity for n in weights}
    unknown = [n for n in targets if n not in weights]
    if unknown:
        raise OptionError(
            f"sparsity given for {unknown[0]!r}, which is not among the weights to prune "
            f"({', '.join(list(weights)[:4])}{', ...' if len(weights) > 4 else ''})",
            "sparsity",
        )
    return scope, {n: float(s) for n, s in targets.items()}


def _scores(
    weights: Mapping[str, np.ndarray], criterion: str, importances
) -> dict[str, np.ndarray]:
    check_choice("criterion", criterion, CRITERIA)
    if criterion == "magnitude":
        return {n: np.abs(np.asarray(w, np.float64)) for n, w in weights.items()}
    if criterion == "obs":
        raise ConfigError(
            "criterion 'obs' also updates the surviving weights: use obs_prune (or prune_model), "
            "not prune_masks"
        )
    if importances is None:
        raise ConfigError(
            "the saliency criterion needs importances (the Hessian diagonal of every weight)"
        )
    scores = {}
    for name, w in weights.items():
        if name not in importances:
            raise DataError(f"no importance given for weight {name!r}")
        h = np.asarray(importances[name], np.float64)
        if h.shape != np.shape(w):
            raise DataError(
                f"the importance of {name!r} has shape {h.shape}, the weight {np.shape(w)}"
            )
        if not np.all(np.isfinite(h)) or np.any(h < 0):
            raise DataError(
                f"the importance of {name!r} must be finite and nonnegative "
                f"(min {np.nanmin(h):.3g})"
            )
        scores[name] = h * np.square(np.asarray(w, np.float64))
    return scores


def _prune_one(score: np.ndarray, sparsity: float) -> np.ndarray:
    count = round(sparsity * score.size)
    keep = np.ones(score.size, bool)
    keep[np.argsort(score, axis=None, kind="stable")[:count]] = False
    return keep.reshape(score.shape)


def _prune_global(
    scores: Mapping[str, np.ndarray], targets: Mapping[str, float]
) -> dict[str, np.ndarray]:
    # one target for all weights: every entry of ``targets`` holds the same number
    sparsity = next(iter(targets.values()), 0.0)
    flat = np.concatenate([s.reshape(-1) for s in scores.values()]) if scores else np.zeros(0)
    keep = _prune_one(flat, sparsity)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.size].reshape(s.shape)
        start += s.size
    return masks
