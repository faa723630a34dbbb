"""``quantize_weights``: named tensors to codebooks at network, layer or channel-group scope.

- ``network``: one codebook (key ``"shared"``) for all tensors, the paper's point: the importances
  already say how much each layer's errors matter, so no per-layer bit allocation is needed.
- ``layer``: one codebook per tensor (key = tensor name).
- ``allocated``: one codebook per tensor, uniform at ``target_bits`` over all the weights, each
  tensor's grid step ``c / sqrt(mean importance)`` (`onnxhq.quantize.allocate`).
- ``channel-group``: per tensor, one codebook row per ``group_size`` output channels (axis 0);
  the tensor's codebook (key = tensor name) is ``(G, k)`` with ``G = ceil(channels / group_size)``.
  Rows of groups that need fewer codewords repeat their last value up to the widest row.

Rates apply per codebook: ``k``/``bits`` cap each codebook, and ``lam`` or ``target_bits`` is the
same for every codebook (so at layer and channel-group scope the target is met per codebook, and
therefore on average). Unlike `quantize`, a codebook whose tensor has no more distinct weights than
``k`` allows (or whose lossless entropy is within ``target_bits``) keeps them all, with one
warning per call; a codebook whose unpruned importances are all zero is quantized with unit
importances (plain k-means), also with a warning. Results do not depend on the mappings' order.

Importances are floored per tensor at ``IMPORTANCE_FLOOR`` times that tensor's mean importance
(over its unpruned weights), never at a fraction of the whole network's: a tensor whose Hessian
estimate is tiny next to the others keeps its own relative weighting, and no weight of it is
free to go anywhere. Whether such a tensor is then wrecked by a shared codebook is the guard's
business (see `onnxhq.quantize.guard`): every result carries each tensor's error, and at network
and channel-group scope, by default, a tensor far worse off than in a codebook of its own gets one.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from ..errors import ConfigError, DataError
from ..numeric import entropy_bits
from ._fits import Task
from ._quantize import check_arrays, check_task, solve
from .allocate import allocate_layers
from .codes import SHARED, QuantizedWeights, TensorCodes
from .guard import GUARDS, apply_guard, measure_errors

log = logging.getLogger(__name__)

SCOPES = ("network", "layer", "allocated", "channel-group")
#: Each tensor's importances are at least this times its mean importance (see the module doc).
IMPORTANCE_FLOOR = 1e-6


def quantize_weights(
    weights: Mapping[str, np.ndarray],
    importances: Mapping[str, np.ndarray] | None = None,
    *,
    scope: str = "network",
    group_size: int | None = None,
    method: str = "uniform",
    k: int | None = None,
    bits: int | None = None,
    lam: float | None = None,
    target_bits: float | None = None,
    pruned: Mapping[str, np.ndarray] | None = None,
    exact: bool = False,
    seed: int = 0,
    guard: str = "requantize",
    cell_value: str = "mean",
) -> QuantizedWeights:
    """Quantize named tensors with shared, per-tensor or per-channel-group codebooks.

    Parameters
    ----------
    weights : name -> float ndarray of any shape.
    importances : name -> nonnegative ndarray of the same shape, covering every weight; or None.
        Floored per tensor (see the module doc).
    scope : ``"network"``, ``"layer"`` or ``"channel-group"`` (needs ``group_size``).
    group_size : output channels (axis 0) per codebook row; channel-group scope only.
    method, k, bits, lam, target_bits, exact, seed : as `quantize` (rates per codebook).
    pruned : name -> bool ndarray of the weight's shape, for the tensors that have pruned weights.
    guard : ``"requantize"``, ``"warn"`` or ``"off"``: what to do with a tensor that a network or
        channel-group codebook leaves far worse off than one of its own would (see
        `onnxhq.quantize.guard`).
    cell_value : uniform only, as `quantize`: ``"mean"`` or ``"grid"`` (grid points as codebook
        values, for ``decode --target int8|int4``).

    Returns
    -------
    QuantizedWeights
    """
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    rows = 0  # codebook rows per channel group
    if scope == "channel-group":
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, (int, np.integer))
            or group_size < 1
        ):
            raise ConfigError(
                f"scope 'channel-group' needs group_size >= 1 (output channels per "
                f"codebook row), got {group_size!r}"
            )
        rows = int(group_size)
    elif group_size is not None:
        raise ConfigError(
            f"group_size={group_size} applies to scope 'channel-group' only, not {scope!r}"
        )
    if guard not in GUARDS:
        raise ConfigError(f"unknown guard {guard!r}; choose one of {', '.join(GUARDS)}")
    task = check_task(
        method=method, k=k, bits=bits, lam=lam, target_bits=target_bits, exact=exact, seed=seed,
        cell_value=cell_value,
    )  # fmt: skip
    tensors = _check_mappings(weights, importances, pruned)
    notes = _notes()
    if not tensors:
        return QuantizedWeights({}, {})
    if scope == "network":
        books, codes = _network(tensors, task, notes)
    elif scope == "allocated":
        books, indices = allocate_layers(tensors, task)
        codes = {n: TensorCodes(n, idx, None) for n, idx in indices.items()}
    else:
        books, codes = {}, {}
        for name in sorted(tensors):
            w, h, p = tensors[name]
            if scope == "layer":
                books[name], idx = _one(w.ravel(), h, p, task, _sub_seed(seed, name, 0), notes)
                codes[name] = TensorCodes(name, idx.reshape(w.shape), None)
            else:
                books[name], idx = _groups(name, w, h, p, rows, task, notes)
                codes[name] = TensorCodes(name, idx, rows)
    _warn(notes)
    qw = QuantizedWeights(books, codes)
    originals = {name: t[0] for name, t in tensors.items()}
    qw = replace(qw, errors=measure_errors(originals, qw))
    if scope in ("layer", "allocated") or guard == "off":
        return qw

    def solo(name: str, same: Task) -> tuple[np.ndarray, np.ndarray]:
        w, h, p = tensors[name]
        if same.target_bits is not None and p is not None:  # alone, its own pruned share counts
            split = entropy_bits([p.size - int(p.sum()), int(p.sum())])
            same = replace(same, target_bits=max(same.target_bits, split))
        book, idx = _one(w.ravel(), h, p, same, _sub_seed(seed, name, 0), _notes())
        return book, idx.reshape(w.shape)

    return apply_guard(qw, originals, task, guard, solo)


def _check_mappings(weights, importances, pruned) -> dict[str, tuple]:
    """name -> (w, h flat or None, pruned flat or None), validated; h floored per tensor."""
    unknown = sorted(set(pruned or {}) - set(weights))
    if unknown:
        raise DataError(f"pruned mask given for {unknown[0]!r}, which is not among the weights")
    out = {}
    for name, w in weights.items():
        w = np.asarray(w)
        if importances is not None and name not in importances:
            raise DataError(f"importances have no entry for weight {name!r}")
        h = None if importances is None else np.asarray(importances[name])
        p = None if pruned is None or name not in pruned else np.asarray(pruned[name])
        for label, a in (("importances", h), ("pruned mask", p)):
            if a is not None and a.shape != w.shape:
                raise DataError(f"{label} of {name!r} have shape {a.shape}, the weight {w.shape}")
        if w.size == 0:
            raise DataError(f"weight {name!r} is empty (shape {w.shape}); leave it out")
        flat = check_arrays(
            w.ravel(),
            None if h is None else h.ravel(),
            None if p is None else p.ravel(),
            name=repr(name),
        )
        out[name] = (flat[0].reshape(w.shape), _floored(flat[1], flat[2]), flat[2])
    return out


def _floored(h: np.ndarray | None, p: np.ndarray | None) -> np.ndarray | None:
    """``max(h, IMPORTANCE_FLOOR * mean h)``, mean over the unpruned weights; ``h`` if none is
    below.
    """
    if h is None:
        return None
    live = h if p is None else h[~p]
    if not live.size:
        return h
    floor = h.dtype.type(IMPORTANCE_FLOOR * float(np.mean(live, dtype=np.float64)))
    return np.maximum(h, floor) if np.any(live < floor) else h


def _network(tensors, task, notes) -> tuple[dict, dict]:
    names = sorted(tensors)
    w = np.concatenate([tensors[n][0].ravel() for n in names])
    h = None
    if any(tensors[n][1] is not None for n in names):
        h = np.concatenate([tensors[n][1] for n in names])
    p = None
    if any(tensors[n][2] is not None for n in names):
        p = np.concatenate(
            [
                tensors[n][2] if tensors[n][2] is not None else np.zeros(tensors[n][0].size, bool)
                for n in names
            ]
        )
    book, idx = _one(w, h, p, task, task.seed, notes)
    codes, start = {}, 0
    for n in names:
        shape = tensors[n][0].shape
        size = int(np.prod(shape))
        codes[n] = TensorCodes(SHARED, idx[start : start + size].reshape(shape), None)
        start += size
    return {SHARED: book}, codes


def _groups(name, w, h, p, group_size, task, notes) -> tuple[np.ndarray, np.ndarray]:
    rows = w.shape[0] if w.ndim else 1
    per_row = w.size // rows
    flat = w.reshape(rows, per_row)
    books, idx = [], np.empty((rows, per_row), dtype=np.int32)
    for g, start in enumerate(range(0, rows, group_size)):
        sl = slice(start * per_row, min(start + group_size, rows) * per_row)
        book, gi = _one(
            flat[start : start + group_size].ravel(),
            None if h is None else h[sl],
            None if p is None else p[sl],
            task,
            _sub_seed(task.seed, name, g),
            notes,
        )
        books.append(book)
        idx[start : start + group_size] = gi.reshape(-1, per_row)
    width = max(b.size for b in books)
    table = np.stack(
        [np.concatenate([b, np.full(width - b.size, b[-1], np.float32)]) for b in books]
    )
    return table, idx.reshape(w.shape)


def _notes() -> dict[str, int]:
    """Counts for the warnings of one call: capped codebooks, unit importances, codebooks."""
    return {"capped": 0, "unit": 0, "codebooks": 0}


def _one(w, h, p, task, seed, notes) -> tuple[np.ndarray, np.ndarray]:
    """One codebook: (float32 codebook, int32 indices), with the lenient rules of this module."""
    notes["codebooks"] += 1
    if h is not None and task.method != "kmeans":
        live = h if p is None else h[~p]
        if live.size and not np.any(live > 0):
            notes["unit"] += 1
            h = None
    q, capped = solve(w, h, p, _with_seed(task, seed), cap=True)
    notes["capped"] += capped
    return q.codebook.astype(np.float32), q.indices


def _with_seed(task, seed: int):
    return replace(task, seed=int(seed))


def _sub_seed(seed: int, name: str, group: int) -> int:
    """A seed per codebook that depends on the tensor's name, not on its position in the mapping."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(name.encode()), group]).generate_state(1)[0]
    )


def _warn(notes) -> None:
    if notes["capped"]:
        log.warning(
            "%d of %d codebooks have no more distinct weights than the rate allows and "
            "keep them all",
            notes["capped"],
            notes["codebooks"],
        )
    if notes["unit"]:
        log.warning(
            "%d of %d codebooks have all-zero importances and were quantized with unit importances",
            notes["unit"],
            notes["codebooks"],
        )
