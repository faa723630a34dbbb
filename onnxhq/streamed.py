"""Compress tensor by tensor: memory bounded by the largest tensor, not by the model.

Where the options allow it (`streamable`: no fine-tuning, no compensation, no target search, and
at network scope an interval method), `compress` takes this path: fit the codebook(s) (network
scope: from a bounded sample, `onnxhq.quantize.shared`; layer and channel-group scopes: per
tensor), then for each tensor, in sidecar order: read it (from its external data file for a
model loaded with ``lazy``), assign its indices, measure its error (and let the guard give it a
codebook of its own), code its index stream, drop it. The graph is then rewritten with the
index tensors declared but empty (they live in the sidecar), so no copy of the weights is made.

On a model of at most `KEEP_MAX` weights the result is the in-memory path's, byte for byte, and
keeps the indices (`Result.quantized`); past it, the sidecar's streams wait in a temporary file,
the network codebook comes from a sample (so it may differ slightly from a fit of every weight),
and ``quantized.tensors`` is empty (read the indices back with `onnxhq.load`).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import naming
from .compact import compact_graph, name_plan, stream_name
from .encode import Artifacts, SidecarWriter, graph_artifact
from .model import drop_weight, load_external, read_weight
from .numeric import entropy_bits
from .quantize import QuantizedWeights, TensorCodes, quantize_weights, tensor_error
from .quantize._quantize import check_task
from .quantize.codes import SHARED
from .quantize.guard import find_flagged
from .quantize.scope import _floored, _notes, _one, _sub_seed
from .quantize.shared import (
    INTERVAL_METHODS,
    SAMPLE_MAX,
    assign,
    fit_shared,
    subsample_weights,
)
from .report import LayerRow, layer_row
from .rewrite import rewrite
from .sidecar import IndexStream

if TYPE_CHECKING:
    import onnx

    from .options import CompressOptions

log = logging.getLogger(__name__)

#: Most weights for which the result keeps every index array and the sidecar's bytes in memory.
KEEP_MAX = SAMPLE_MAX


def streamable(options: CompressOptions) -> bool:
    """Whether `compress` with ``options`` can go tensor by tensor (see the module doc)."""
    return (
        options.finetune is None
        and not options.compensate
        and options.target is None
        and options.scope.kind != "allocated"  # its grid steps depend on every tensor
        and (options.scope.kind != "network" or options.method in INTERVAL_METHODS)
    )


@dataclass(frozen=True)
class Streamed:
    """What `compress_streamed` made: the artifacts, the codes, the report's rows."""

    artifacts: Artifacts
    quantized: QuantizedWeights
    rewritten: onnx.ModelProto
    rows: tuple[LayerRow, ...]
    names: tuple[str, ...]


def compress_streamed(
    proto: onnx.ModelProto,
    names: list[str],
    options: CompressOptions,
    importances: Mapping[str, np.ndarray] | None,
    stem: str,
    *,
    path: str | os.PathLike | None = None,
    release: bool = False,
    original_bytes: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    sample_max: int = SAMPLE_MAX,
    keep_max: int = KEEP_MAX,
) -> Streamed:
    """Quantize and code the weights ``names`` of ``proto`` one tensor at a time.

    ``path`` is the model file ``proto`` was loaded from (its external data is read from there);
    with ``release`` each weight's bytes are freed from ``proto`` once read (``proto`` must be
    the caller's own). ``sample_max`` and ``keep_max`` are `SAMPLE_MAX` and `KEEP_MAX` (tests
    lower them).
    """
    rate = options.rate
    assert rate is not None and streamable(options)
    task = check_task(method=options.method, k=rate.k, bits=rate.bits, lam=rate.lam,
                      target_bits=rate.target_bits, seed=options.seed,
                      cell_value=options.cell_value)  # fmt: skip
    order = sorted(names)  # `quantize_weights`' order: codebooks, errors, rewrite, report
    shapes = {n: _dims(proto, n) for n in order}
    sizes = {n: int(np.prod(s, dtype=np.int64)) for n, s in shapes.items()}

    def read(name: str, last: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        w = read_weight(proto, name, path).astype(np.float32, copy=False)
        if release and last:
            drop_weight(proto, name)
        return w, None if importances is None else np.asarray(importances[name])

    network = options.scope.kind == "network"
    shared = None
    if network:
        samples, exact = subsample_weights(order, sizes, read, seed=task.seed, bound=sample_max)
        shared, unit = fit_shared(samples, task, exact=exact)
        del samples
        _warn_shared(shared.capped, unit)
    # A model given in memory holds its weights already: its indices (a quarter of that at most
    # for uint8) are kept, so `Result.quantized` is whole; a large model read from its file
    # keeps none (read them back with `onnxhq.load`).
    keep = path is None or sum(sizes.values()) <= keep_max
    writer = SidecarWriter(spool=not keep)
    books: dict[str, np.ndarray] = {} if shared is None else {SHARED: shared.codebook}
    codes: dict[str, TensorCodes] = {}
    errors, rows, flagged, guarded = {}, {}, [], []
    done = 0
    plan = name_plan(proto) if options.compact_names else None  # the names the graph gets
    for name in sorted(order, key=lambda n: stream_name(plan, n)):  # the sidecar's order
        _tell(progress, done, len(order))
        w, h = read(name, last=True)
        if shared is not None:
            idx = assign(w, shared, name=repr(name))
            key, group, error = SHARED, None, tensor_error(w, shared.codebook[idx])
            if options.guard != "off":
                own = _guard(name, w, h, task, error)
                if own is not None and options.guard == "requantize" and name != SHARED:
                    books[name], idx, error = own
                    key = name
                    guarded.append(name)
                elif own is not None:
                    flagged.append(name)
        else:
            qw = quantize_weights({name: w}, None if h is None else {name: h},
                                  scope=options.scope.kind, group_size=options.scope.group_size,
                                  method=options.method, k=rate.k, bits=rate.bits, lam=rate.lam,
                                  target_bits=rate.target_bits,
                                  pruned={name: w == 0} if np.any(w == 0) else None,
                                  seed=options.seed, guard=options.guard,
                                  cell_value=options.cell_value)  # fmt: skip
            (key, c), *_ = ((c.codebook, c) for c in qw.tensors.values())
            books.update(qw.codebooks)
            idx, group, error = c.indices, c.group_size, qw.errors[name]
            flagged += qw.flagged
            guarded += qw.guarded
        k = int(np.shape(books[key])[-1])
        lay = writer.add(IndexStream(stream_name(plan, name), tuple(idx.shape), k, idx))
        rows[name], errors[name] = layer_row(name, idx, lay), error
        codes[name] = TensorCodes(key, idx if keep else _placeholder(idx.shape), group)
        del w, h, idx
        done += 1
    _tell(progress, done, len(order))
    _warn_guard(flagged, guarded, errors)
    codes = {n: codes[n] for n in order}
    books = _ordered(books, codes)
    rewritten = rewrite(proto, books, codes, indices=False)
    load_external(rewritten, path)  # the tensors kept as they were go into the artifacts
    graph_name, sidecar_name = naming.artifact_names(stem)
    sidecar, layouts = writer.finish({"graph": graph_name})
    crc = zlib.crc32(sidecar) if isinstance(sidecar, bytes) else sidecar.crc32
    moved = {stream_name(plan, n) for n in order}
    written = rewritten if plan is None else compact_graph(rewritten, plan)
    graph_bytes, data = graph_artifact(written, stem, moved, crc, original_bytes=original_bytes)
    artifacts = Artifacts(
        graph_name,
        graph_bytes,
        sidecar_name,
        sidecar if isinstance(sidecar, bytes) else b"",
        layouts,
        data,
        None if isinstance(sidecar, bytes) else sidecar,
    )
    errors = {n: errors[n] for n in order}
    quantized = QuantizedWeights(books, codes if keep else {}, errors,
                                 tuple(sorted(flagged)), tuple(sorted(guarded)))  # fmt: skip
    return Streamed(artifacts, quantized, rewritten, tuple(rows[n] for n in order), tuple(order))


def _guard(name, w, h, task, error):
    """``(codebook, indices, error)`` of ``name`` alone when the shared codebook wrecks it (the
    test of `onnxhq.quantize.guard`), else None."""
    budget = np.log2(task.k) if task.k is not None else task.target_bits
    own = {}

    def alone(_: str):
        p = w.ravel() == 0
        same = task
        if task.target_bits is not None and p.any():  # alone, its own pruned share counts
            split = entropy_bits([p.size - int(p.sum()), int(p.sum())])
            same = replace(task, target_bits=max(task.target_bits, split))
        hf = None if h is None else _floor(h.ravel(), p)
        book, idx = _one(w.ravel(), hf, p if p.any() else None, same,
                         _sub_seed(task.seed, name, 0), _notes())  # fmt: skip
        idx = idx.reshape(w.shape)
        own["codes"] = (book, idx)
        return tensor_error(w, book[idx])

    found = find_flagged({name: error}, {name: float(budget)}, alone)
    if name not in found:
        return None
    book, idx = own["codes"]
    return book, idx, found[name]


def _floor(h: np.ndarray, p: np.ndarray) -> np.ndarray | None:
    return _floored(h, p if p.any() else None)


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
    """Indices of ``shape`` that hold no memory: what `rewrite` reads of them without
    ``indices`` (shape and size)."""
    return np.broadcast_to(np.zeros((), np.int32), shape)


def _ordered(books: dict[str, np.ndarray], codes: dict[str, TensorCodes]) -> dict:
    """The codebooks in the order the in-memory path lists them: the shared one, then by
    tensor."""
    first = [SHARED] if SHARED in books else []
    rest = [c.codebook for c in codes.values() if c.codebook not in first]
    return {key: books[key] for key in dict.fromkeys(first + rest)}


def _dims(proto: onnx.ModelProto, name: str) -> tuple[int, ...]:
    for t in proto.graph.initializer:
        if t.name == name:
            return tuple(int(d) for d in t.dims)
    raise KeyError(name)


def _tell(progress, done: int, total: int) -> None:
    if progress is not None:
        progress("quantize", done, total)


def _warn_shared(capped: bool, unit: bool) -> None:
    if capped:
        log.warning("1 of 1 codebooks have no more distinct weights than the rate allows and "
                    "keep them all")  # fmt: skip
    if unit:
        log.warning("1 of 1 codebooks have all-zero importances and were quantized with unit "
                    "importances")  # fmt: skip


def _warn_guard(flagged: list[str], guarded: list[str], errors: Mapping) -> None:
    for names, what in ((guarded, "now have one"), (flagged, "left as they are")):
        if names:
            log.warning(
                "%d tensors were far worse off than in a codebook of their own (%s): %s",
                len(names),
                what,
                ", ".join(f"{n} ({errors[n].sqnr_db:.1f} dB)" for n in sorted(names)),
            )
