"""Label-free fidelity: how closely a compressed model's outputs follow the original's.

Each output is compared by its kind, with stable metric names (the JSON keys of reports):

``classes``   class probabilities or logits; the class axis is ``axis`` (default last), every
              other axis a sample (N, C), a sequence position (N, T, C) or a pixel (N, C, H, W).
              ``agreement``: share of positions where the top-1 class is the same;
              ``kl``: mean KL(p_original || p_compressed) in nats per position;
              ``sequence``: share of identical greedy-decoded CTC sequences, (N, T, C) only;
              ``accuracy``: share of positions where the compressed top-1 equals ``labels``.
``bernoulli`` independent probabilities or logits (sigmoid maps, multi-label scores).
              ``iou``: IoU of the maps thresholded at 0.5 (p > 0.5), mean over samples (axis 0),
              two empty maps count as 1; ``max_abs_error``: largest absolute probability change.
``real``      embeddings, regressions, boxes. ``cosine``/``cosine_min``: mean and minimum over
              samples of the cosine between the flattened outputs; ``sqnr_db``: 10 log10 of the
              original's power over the error power, over all values (inf when identical).

`meets` decides a ``--min-fidelity METRIC=VALUE`` target: ``kl`` and ``max_abs_error`` must not
exceed the value, every other metric must reach it. Pure numpy; computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import ConfigError, DataError
from .options.target import LOWER_IS_BETTER, METRIC_ALIASES, Target  # noqa: F401 (re-exported)

#: output kind -> the metrics `measure` may return for it (``sequence`` only for rank 3,
#: ``accuracy`` only with labels).
METRICS: dict[str, tuple[str, ...]] = {
    "classes": ("agreement", "kl", "sequence", "accuracy"),
    "bernoulli": ("iou", "max_abs_error"),
    "real": ("cosine", "cosine_min", "sqnr_db"),
}
#: Metrics where smaller is better (`LOWER_IS_BETTER`, from the options): a target on them is an
#: upper bound. Other spellings accepted in targets:
ALIASES = METRIC_ALIASES
#: Probabilities are clipped below at this before taking logs (a zero costs at most ~27.6 nats).
PROB_FLOOR = 1e-12


def measure(
    kind: str,
    original: np.ndarray,
    compressed: np.ndarray,
    *,
    axis: int = -1,
    blank: int = 0,
    logits: bool | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Fidelity metrics of ``compressed`` against ``original`` (same shape, samples on axis 0).

    Parameters
    ----------
    kind : "classes", "bernoulli" or "real".
    original, compressed : the two models' outputs for the same inputs, equal shapes.
    axis : the class axis of a ``classes`` output (1 for (N, C, H, W) segmentation).
    blank : the CTC blank class of ``sequence`` decoding.
    logits : whether the outputs are logits (True) or probabilities (False); None detects
        probabilities from ``original`` (values in [0, 1], and for classes summing to 1).
    labels : integer class per position, the output's shape without the class axis (classes).

    Returns
    -------
    dict mapping metric names of ``METRICS[kind]`` to floats.
    """
    if kind not in METRICS:
        raise ConfigError(f"unknown output kind {kind!r}; use one of {', '.join(METRICS)}")
    a, b = np.asarray(original, np.float64), np.asarray(compressed, np.float64)
    if a.shape != b.shape:
        raise DataError(
            f"the compressed output has shape {b.shape}, the original {a.shape}; "
            "compare outputs of the same inputs"
        )
    if a.ndim == 0 or a.shape[0] == 0:
        raise DataError(f"an output of shape {a.shape} has no samples on axis 0")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError(f"a {kind} output holds non-finite values; fidelity needs finite outputs")
    if kind == "classes":
        return _classes(a, b, axis=axis, blank=blank, logits=logits, labels=labels)
    if kind == "bernoulli":
        return _bernoulli(a, b, logits=logits)
    return _real(a, b)


def parse_target(target: str) -> tuple[str, float]:
    """``"METRIC=VALUE"`` -> (metric name, value); aliases (``sqnr``) resolved
    (`onnxhq.options.Target.parse`, whose `OptionError` is a `ConfigError`)."""
    parsed = Target.parse(target)
    return parsed.metric, parsed.value


def meets(metrics: Mapping[str, float], target: str) -> bool:
    """Whether ``metrics`` (from `measure`) reach ``target`` ("METRIC=VALUE").

    ``kl`` and ``max_abs_error`` pass at or below the value, the others at or above it.
    """
    parsed = Target.parse(target)
    if parsed.metric not in metrics:
        have = ", ".join(sorted(metrics)) or "none"
        raise ConfigError(
            f"fidelity target {target!r} names {parsed.metric!r}, which this output kind does "
            f"not measure (measured: {have}); choose one of those"
        )
    return parsed.reached(float(metrics[parsed.metric]))


def ctc_greedy(scores: np.ndarray, *, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of (N, T, C) scores: argmax per position, merge repeats, drop blanks."""
    best = np.asarray(scores).argmax(axis=-1)
    decoded = []
    for row in best:
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(c) for c in row[keep] if c != blank))
    return decoded


def _classes(
    a: np.ndarray,
    b: np.ndarray,
    *,
    axis: int,
    blank: int,
    logits: bool | None,
    labels: np.ndarray | None,
) -> dict[str, float]:
    if a.ndim < 2:
        raise DataError(f"a classes output needs a sample and a class axis; its shape is {a.shape}")
    if not -a.ndim <= axis < a.ndim or axis % a.ndim == 0:
        raise ConfigError(
            f"class axis {axis} is out of range for an output of shape {a.shape}; "
            "axis 0 holds the samples"
        )
    axis %= a.ndim
    if logits is None:
        logits = not _looks_like_probabilities(a, axis)
    log_p, log_q = (
        _log_softmax(x, axis) if logits else np.log(np.maximum(x, PROB_FLOOR)) for x in (a, b)
    )
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=axis)
    top_a, top_b = a.argmax(axis=axis), b.argmax(axis=axis)
    out = {"agreement": float(np.mean(top_a == top_b)), "kl": float(max(kl.mean(), 0.0))}
    if a.ndim == 3 and axis == 2:
        if not 0 <= blank < a.shape[2]:
            raise ConfigError(f"CTC blank class {blank} is out of range for {a.shape[2]} classes")
        same = [x == y for x, y in zip(ctc_greedy(a, blank=blank), ctc_greedy(b, blank=blank))]
        out["sequence"] = float(np.mean(same))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != top_b.shape:
            raise DataError(
                f"labels have shape {labels.shape}; this output needs {top_b.shape} "
                "(its shape without the class axis)"
            )
        out["accuracy"] = float(np.mean(top_b == labels))
    return out


def _bernoulli(a: np.ndarray, b: np.ndarray, *, logits: bool | None) -> dict[str, float]:
    if logits is None:
        logits = not (a.min() >= 0.0 and a.max() <= 1.0)
    if logits:
        a, b = _sigmoid(a), _sigmoid(b)
    on_a = (a > 0.5).reshape(len(a), -1)
    on_b = (b > 0.5).reshape(len(b), -1)
    inter = (on_a & on_b).sum(axis=1)
    union = (on_a | on_b).sum(axis=1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"iou": float(iou.mean()), "max_abs_error": float(np.abs(a - b).max())}


def _real(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    dot = (fa * fb).sum(axis=1)
    # Two zero vectors agree perfectly; one zero vector against a nonzero one shares no direction.
    cos = np.where(
        (na > 0) & (nb > 0),
        dot / np.maximum(na * nb, np.finfo(float).tiny),
        np.where((na == 0) & (nb == 0), 1.0, 0.0),
    )
    cos = np.clip(cos, -1.0, 1.0)
    signal, noise = float((a * a).sum()), float(((a - b) ** 2).sum())
    if noise == 0.0:
        sqnr = float("inf")
    elif signal == 0.0:
        sqnr = float("-inf")
    else:
        sqnr = 10.0 * float(np.log10(signal / noise))
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr_db": sqnr}


def _looks_like_probabilities(x: np.ndarray, axis: int) -> bool:
    """Values in [0, 1] that sum to 1 (within 1e-3) along ``axis``."""
    if x.min() < 0.0 or x.max() > 1.0:
        return False
    return bool(np.allclose(x.sum(axis=axis), 1.0, rtol=0.0, atol=1e-3))


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
