"""One network codebook fitted from a bounded sample, then applied tensor by tensor.

`quantize_weights` at network scope sorts every weight of the model at once. For a model of
billions of weights `fit_shared` fits the same codebook from a deterministic sample instead: of
each tensor ``round(SAMPLE_MAX * n_t / N)`` values drawn with a generator seeded by the seed and
the tensor's name (in proportion to its size, so the sample's rate is the model's), plus the
tensor's smallest and largest value (so no weight lies outside the grid the sample spans). A
model of at most `SAMPLE_MAX` weights is sampled whole, in `quantize_weights`' order: its
codebook and indices are then exactly those of `quantize_weights`. `assign` then maps one tensor
to its indices with the codebook's thresholds (a table lookup and a search, no sort).

Interval methods only (``uniform``, ``kmeans``, ``hkmeans``): their clusters are intervals of
the weights, given by thresholds. ECSQ labels weights one by one; it keeps the in-memory path.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ._fits import Task, fit
from ._quantize import _exponent, check_arrays
from ._sorted import CHUNK, labels_f32, sort_weights
from .scope import _floored

#: Most weights the network codebook is fitted from; a model of at most this many is used whole.
SAMPLE_MAX = 1 << 23
#: Methods whose clusters are intervals (what `assign` applies).
INTERVAL_METHODS = ("uniform", "kmeans", "hkmeans")


@dataclass(frozen=True)
class SharedCodebook:
    """A network codebook and how to map weights to its indices.

    Attributes
    ----------
    codebook : (k,) float32 ndarray, ascending; the 0.0 of pruned weights included.
    thresholds : (c - 1,) ndarray in the weights' dtype: weight ``x`` is in fitted cluster
        ``searchsorted(thresholds, x, side="right")``.
    labels : (c,) int32 ndarray, the codebook index of each fitted cluster.
    pruned : int, the codebook index of pruned weights (-1 when the sample had none).
    capped : bool, whether the rate asked for more codewords than distinct weights.
    exact : bool, whether the whole model was the sample.
    """

    codebook: np.ndarray
    thresholds: np.ndarray
    labels: np.ndarray
    pruned: int
    capped: bool
    exact: bool


@dataclass
class Sample:
    """The part of one tensor the network codebook is fitted from (see `take_sample`)."""

    w: np.ndarray
    h: np.ndarray | None
    p: np.ndarray


def sample_sizes(sizes: dict[str, int], bound: int = SAMPLE_MAX) -> dict[str, int] | None:
    """Values drawn per tensor, in proportion to its size; None when the whole model fits."""
    total = sum(sizes.values())
    if total <= bound:
        return None
    return {n: max(1, round(bound * s / total)) for n, s in sizes.items()}


def take_sample(
    name: str, w: np.ndarray, h: np.ndarray | None, count: int | None, seed: int
) -> Sample:
    """``count`` values of tensor ``w`` (all of them when None), its extremes included; the
    importances floored per tensor as `quantize_weights` does, zeros taken as pruned."""
    w, h, p = check_arrays(w.ravel(), None if h is None else h.ravel(), w.ravel() == 0, name=name)
    h = _floored(h, p)
    if count is not None and count < w.size:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        pick = np.concatenate(
            [np.sort(rng.integers(0, w.size, count)), [np.argmin(w), np.argmax(w)]]
        )
        w, h, p = w[pick], None if h is None else h[pick], None if p is None else p[pick]
    return Sample(w, h, np.zeros(w.size, bool) if p is None else p)


def fit_shared(
    samples: Sequence[Sample], task: Task, *, exact: bool
) -> tuple[SharedCodebook, bool]:
    """The network codebook of the ``samples`` (in `quantize_weights`' tensor order); returns it
    and whether its importances were all zero (then it is fitted without them, as there)."""
    if task.method not in INTERVAL_METHODS:
        raise ConfigError(f"method {task.method!r} has no thresholds; use quantize_weights")
    w = np.concatenate([s.w for s in samples])
    h = None
    if any(s.h is not None for s in samples):
        h = np.concatenate([s.h if s.h is not None else np.ones(s.w.size) for s in samples])
    p = np.concatenate([s.p for s in samples])
    n_pruned = int(np.count_nonzero(p))
    unit = False
    if h is not None and task.method != "kmeans":  # as `scope._one`
        live = h[~p] if n_pruned else h
        unit = bool(live.size) and not np.any(live > 0)
        h = None if unit else h
    a, b = _exponent(w), _exponent(h)  # as `solve`: safe magnitudes, scaled back exactly
    ws = np.ldexp(w, -a) if a else w
    hs = np.ldexp(h, -b) if b and h is not None else h
    wu = ws[~p] if n_pruned else ws
    hu = None if hs is None or task.method == "kmeans" else (hs[~p] if n_pruned else hs)
    if wu.size == 0:
        return SharedCodebook(
            np.zeros(1, np.float32), np.zeros(0, w.dtype), np.zeros(0, np.int32), 0, False, exact
        ), unit
    sw = sort_weights(wu, hu)
    result, capped = fit(sw, wu, hu, n_pruned, task, cap=True)
    assert result.thresholds is not None  # interval methods
    thresholds = np.ldexp(result.thresholds, a) if a else result.thresholds
    book = np.ldexp(np.asarray(result.centers, np.float64), a)
    clusters = book.size
    if n_pruned:
        book = np.append(book, 0.0)
    inverse = np.arange(book.size)
    if book.size > 1 and not np.all(np.diff(book) > 0):
        book, inverse = np.unique(book, return_inverse=True)
    book = (book + 0.0).astype(np.float32)
    labels = inverse[:clusters].astype(np.int32)
    pruned = int(inverse[clusters]) if n_pruned else -1
    return SharedCodebook(book, thresholds.astype(w.dtype), labels, pruned, capped, exact), unit


def assign(w: np.ndarray, shared: SharedCodebook, *, name: str = "w") -> np.ndarray:
    """int32 indices of tensor ``w`` (its shape) into ``shared.codebook``; zeros take the pruned
    weights' codeword where the codebook has one."""
    flat = check_arrays(w.ravel(), None, None, name=name)[0]
    t = shared.thresholds
    if flat.dtype == np.float32 and t.dtype == np.float32:
        cluster = labels_f32(flat, t)
    else:
        cluster = np.empty(flat.size, np.int32)
        for s in range(0, flat.size, CHUNK):
            cluster[s : s + CHUNK] = np.searchsorted(t, flat[s : s + CHUNK], side="right")
    out = shared.labels[cluster] if shared.labels.size else np.zeros(flat.size, np.int32)
    if shared.pruned >= 0:
        out[flat == 0] = shared.pruned
    return out.reshape(w.shape)


def subsample_weights(
    names: Sequence[str],
    sizes: dict[str, int],
    read: Callable[[str], tuple[np.ndarray, np.ndarray | None]],
    *,
    seed: int,
    bound: int = SAMPLE_MAX,
) -> tuple[list[Sample], bool]:
    """The `Sample` of every tensor in ``names`` order (``read(name)`` gives its weights and
    importances, one tensor at a time) and whether the whole model was taken."""
    counts = sample_sizes(sizes, bound)
    samples = []
    for name in names:
        w, h = read(name)
        samples.append(take_sample(name, w, h, None if counts is None else counts[name], seed))
        del w, h
    return samples, counts is None
