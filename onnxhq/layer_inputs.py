"""Each weight's input second-moment matrix ``H = X X^T / n``, gathered by running the model.

The layer-wise Hessian of GPTQ / OBQ / SparseGPT (their ``2 X X^T``, up to the constant), for
`onnxhq.compensate` and `onnxhq.prune`: the inputs of the weight-reading nodes are exposed as
graph outputs (as `onnxhq.hessian.activations` does for the diagonal) and their products summed
batch by batch, so memory holds one batch and the ``H`` sums, never the whole data:

=============  ===================================================================================
MatMul         ``x @ W`` (W ``(K, N)``): rows of x over all leading positions, ``H`` is ``(K, K)``;
               ``W @ x`` (W ``(M, K)``): the columns of x, per position
Gemm           either operand, with transA / transB (the weight may be stored ``(N, K)``), times
               alpha^2
Conv           the im2col view: one row per sample and output position, the zero-padded input
               patch it reads (strides, dilations, pads, auto_pad), ``(C/G * prod(kernel))``
               columns ordered like the weight's ``(C/G, kernel...)``; one ``H`` per group
               (depthwise: ``G = C``, ``H`` is ``prod(kernel)`` square)
=============  ===================================================================================

Weights read by other ops (ConvTranspose, Gather, batched MatMul weights of rank > 2), or by two
nodes that see them differently, are left out (the caller rounds them with the diagonal model).
A weight with more than ``cap`` inputs per group keeps only the diagonal blocks of ``cap`` inputs
(``H`` block-diagonal: correlations across blocks are dropped, each block compensated alone), so
memory is at most ``d * cap`` float64 per weight (``cap=4096``: 128 MB for ``d = 4096``). Each
batch contributes at most ``max_rows`` rows per weight (a seeded random subset of a conv's
sample-and-position rows, drawn before its patches are gathered); products are formed in float32,
all groups in one batched product, and summed in float64. `compensation_cost` estimates what
gathering these and one compensated compression cost, from the shapes alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .data import Dataset, load_data
from .errors import ConfigError
from .hessian.cost import weight_matrix
from .hessian.uses import Use, conv_windows, expose, find_uses, runtime_feeds, weights_as_inputs
from .layerwise import LayerHessian
from .runtime import make_session

if TYPE_CHECKING:
    import os

    from .options import CompressOptions

log = logging.getLogger(__name__)

#: Samples `gather_layer_hessians` draws. A fully connected layer gets one row of ``X`` per
#: sample and needs many more rows than inputs: with fewer (256 samples for LeNet-5's 800 inputs)
#: the compensation fits the calibration data and raised the error on held-out data.
SAMPLES = 1024
#: Most rows of ``X`` per batch and weight, drawn at random (a convolution gives one per sample
#: and output position, far more than its ``H`` needs), which bounds the time per batch.
MAX_ROWS = 8192
#: Most inputs per ``H`` block (see the module doc).
CAP = 4096
_SUPPORTED = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,)}
#: Passes over a layer's ``outputs x inputs^2`` products one compensated compression makes (the
#: assignments matching the coded size, the codebook refit), for `compensation_cost`.
ROUNDS = 30
#: Multiply-adds a column of the column walk costs beyond its arithmetic (its numpy calls, about
#: 0.1 ms on a small CPU), for `compensation_cost`.
COLUMN_COST = 10**5


def compensation_cost(
    model: onnx.ModelProto,
    params: Sequence[str],
    *,
    samples: int = SAMPLES,
    batch_size: int = 16,
    cap: int = CAP,
    max_rows: int = MAX_ROWS,
) -> float:
    """Multiply-adds of gathering the statistics of ``params`` and compressing once with error
    compensation, estimated from the shapes alone (to decide whether compensation is affordable).

    Per weight a MatMul, Gemm or Conv reads, per group and ``H`` block of ``b`` inputs: its
    factorisation ``b**3``, ``ROUNDS * outputs * b**2`` for the column walks and the refit,
    `COLUMN_COST` per column and walk, and the statistics ``runs * rows * b**2`` for the runs of
    ``batch_size`` of ``samples``, ``rows`` per run being ``max_rows`` for a Conv (a row per
    output position, more than that) and ``batch_size`` for a MatMul or Gemm (a row per sample;
    sequence positions are not counted). Other weights cost nothing here (the diagonal model).
    """
    from .model import initializer_map

    inits, wanted, seen = initializer_map(model), set(params), set()
    runs = -(-samples // batch_size)
    total = 0.0
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in wanted or name in seen or name not in inits:
                continue
            if node.domain not in ("", "ai.onnx") or slot not in _SUPPORTED.get(node.op_type, ()):
                continue
            shape = tuple(int(d) for d in inits[name].dims)
            if node.op_type != "Conv" and len(shape) != 2:
                continue  # no layer Hessian (`_view`)
            seen.add(name)
            rows, width, groups = weight_matrix(Use(name, node, slot, "", shape))
            batch_rows = max_rows if node.op_type == "Conv" else min(batch_size, max_rows)
            for start in range(0, width, cap):
                b = min(cap, width - start)
                per_group = b**3 + ROUNDS * (rows // groups) * b**2 + runs * batch_rows * b**2
                total += groups * per_group + ROUNDS * COLUMN_COST * b
    return total


def gather_layer_hessians(
    proto: onnx.ModelProto,
    data: str | os.PathLike | Dataset,
    options: CompressOptions,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, LayerHessian]:
    """`layer_hessians` of the weights `compress` quantizes with ``options`` (stage
    ``layer inputs``), from ``SAMPLES`` samples of ``data`` drawn with ``options.seed``."""
    from .importances import weight_names

    dataset = data if isinstance(data, Dataset) else load_data(data, proto)
    report = None if progress is None else (lambda d, t: progress("layer inputs", d, t))
    return layer_hessians(proto, dataset.inputs, weight_names(proto, options), samples=SAMPLES,
                          seed=options.seed, progress=report)  # fmt: skip


def layer_hessians(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    params: Sequence[str],
    *,
    samples: int = SAMPLES,
    batch_size: int = 16,
    seed: int = 0,
    cap: int = CAP,
    max_rows: int = MAX_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LayerHessian]:
    """``H`` of every weight in ``params`` that a MatMul, Gemm or Conv reads (see the module doc).

    Parameters
    ----------
    model : any model onnxruntime runs; not changed.
    inputs : every runtime input, samples on axis 0.
    params : weight names (initializers or Constant outputs); others are skipped with a log line.
    samples : at most this many samples, drawn at random (``seed``), in ``batch_size`` runs.
    cap : most inputs per ``H`` block.
    max_rows : most rows of ``X`` per batch and weight (a random subset beyond; `MAX_ROWS`).
    progress : called with (runs done, runs in all).

    Returns
    -------
    name -> `LayerHessian`, float64 blocks, means over all positions and samples.
    """
    checked = (("samples", samples), ("batch_size", batch_size), ("cap", cap),
               ("max_rows", max_rows))  # fmt: skip
    for label, v in checked:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{label}={v!r} must be an integer >= 1")
    graph_model, _ = weights_as_inputs(model, params)
    wanted = _readable(graph_model, params)
    graph_model, values = weights_as_inputs(model, wanted)
    uses = find_uses(graph_model, wanted, values)
    views: dict[str, tuple[bool, int] | None] = {}
    for use in uses:
        view = _view(use)
        if view is None or views.get(use.param, view) != view:
            log.info("no layer Hessian for %s (read as %s): diagonal model", use.param,
                     use.node.op_type)  # fmt: skip
            views[use.param] = None
        else:
            views.setdefault(use.param, view)
    uses = [u for u in uses if views.get(u.param) is not None]
    feeds = runtime_feeds(graph_model, inputs, wanted)
    n = len(next(iter(feeds.values())))
    order = np.random.default_rng(seed).permutation(n)[: min(samples, n)]
    exposed = sorted({u.x for u in uses} - set(feeds) - set(values))
    expose(graph_model, exposed)
    session = make_session(graph_model) if exposed else None
    sums: dict[int, list[np.ndarray]] = {}
    counts = dict.fromkeys(range(len(uses)), 0)
    firsts: dict[int, np.ndarray] = {}  # sums of the rows, for the mean input
    runs = -(-len(order) // batch_size)
    for step, start in enumerate(range(0, len(order), batch_size)):
        batch = {k: v[order[start : start + batch_size]] for k, v in feeds.items()}
        got = session.run(exposed, {**batch, **values}) if session is not None else []
        known = {**batch, **values, **dict(zip(exposed, got))}
        for i, use in enumerate(uses):

            def pick(total: int, i: int = i, step: int = step) -> np.ndarray | None:
                if total <= max_rows:
                    return None
                return np.random.default_rng([seed, step, i]).choice(total, max_rows, replace=False)

            rows = _rows(use, np.asarray(known[use.x], np.float32), pick)  # (G, positions, d)
            blocks = _products(rows, cap)
            if i not in sums:  # (setdefault would allocate the zeros on every batch)
                sums[i] = [np.zeros(b.shape) for b in blocks]
                firsts[i] = np.zeros((rows.shape[0], rows.shape[2]))
            for a, b in zip(sums[i], blocks):
                a += b
            firsts[i] += rows.sum(axis=1, dtype=np.float64)
            counts[i] += rows.shape[1]
        if progress is not None:
            progress(step + 1, runs)
    out: dict[str, LayerHessian] = {}
    for i, use in enumerate(uses):
        view = views[use.param]
        assert view is not None
        transpose, groups = view
        scale = _alpha(use) ** 2 / max(counts[i], 1)
        prev = out.get(use.param)
        mine = [a * scale for a in sums[i]]
        merged = tuple(mine if prev is None else [a + b for a, b in zip(prev.blocks, mine)])
        total = counts[i] + (prev.samples if prev is not None else 0)
        mean = firsts[i] * (_alpha(use) / max(counts[i], 1))
        if prev is not None and prev.mean is not None:
            mean = mean + prev.mean
        out[use.param] = LayerHessian(transpose, groups, merged, total, mean)
    return out


def _readable(model: onnx.ModelProto, params: Sequence[str]) -> list[str]:
    """The params whose every reader is a MatMul / Gemm / Conv at a weight slot."""
    read, bad = set(), set()
    wanted = set(params)
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in wanted:
                read.add(name)
                if not (node.domain in ("", "ai.onnx")
                        and slot in _SUPPORTED.get(node.op_type, ())):  # fmt: skip
                    bad.add(name)
    ok = {p: p in read and p not in bad for p in params}
    skipped = [p for p, v in ok.items() if not v]
    if skipped:
        log.info("no layer Hessian for %d weights read by other ops (%s...)", len(skipped),
                 skipped[0])  # fmt: skip
    return [p for p, v in ok.items() if v]


def _view(use: Use) -> tuple[bool, int] | None:
    """(transpose, groups) of the weight's matrix view, or None if unsupported."""
    op = use.node.op_type
    if op == "Conv":
        return False, _groups(use)
    if len(use.shape) != 2:
        return None
    if op == "MatMul":
        return use.slot == 1, 1
    trans = use.attr("transB" if use.slot == 1 else "transA", 0)
    rows_are_k = (use.slot == 1) != bool(trans)  # B (K, N), or A^T stored as (K, M)
    return rows_are_k, 1


def _groups(use: Use) -> int:
    return int(use.attr("group", 1)) if use.node.op_type == "Conv" else 1


def _alpha(use: Use) -> float:
    return float(use.attr("alpha", 1.0)) if use.node.op_type == "Gemm" else 1.0


def _rows(use: Use, x: np.ndarray, pick: Callable[[int], np.ndarray | None]) -> np.ndarray:
    """(G, positions, d): per group, the rows the weight's view multiplies; ``pick(positions)``
    gives the subset of rows to keep (None: all), chosen before a Conv's patches are built."""
    op = use.node.op_type
    if op == "Conv":
        return _im2col(use, x, pick)
    if op == "Gemm":
        trans = use.attr("transA" if use.slot == 1 else "transB", 0)
        x = x.T if trans else x
        rows = x if use.slot == 1 else x.T  # activation A (M, K), or B (K, N) by columns
    elif use.slot == 1:
        rows = x.reshape(-1, x.shape[-1])
    else:
        x = x[:, None] if x.ndim == 1 else np.moveaxis(x, -2, -1)  # W (M, K) @ x (..., K, N)
        rows = x.reshape(-1, x.shape[-1])
    chosen = pick(len(rows))
    return (rows if chosen is None else rows[chosen])[None]


def _im2col(use: Use, x: np.ndarray, pick: Callable[[int], np.ndarray | None]) -> np.ndarray:
    """(G, samples * output positions, C/G * prod(kernel)) patches in the weight's column
    order, only the rows ``pick`` keeps gathered, each kernel offset copied once into place."""
    reads = [r for _, r in conv_windows(use, x)]  # (N, C, *out) views, one per kernel offset
    n, c, out = x.shape[0], x.shape[1], reads[0].shape[2:]
    groups = _groups(use)
    chosen = pick(n * math.prod(out))
    per = c // groups
    if chosen is None:  # every position: (N, C, *out) -> (G, N, *out, C/G), views until the copy
        cols = np.empty((groups, n, *out, per, len(reads)), x.dtype)
        for k, r in enumerate(reads):
            cols[..., k] = np.moveaxis(r.reshape(n, groups, per, *out), (1, 2), (0, -1))
        return cols.reshape(groups, n * math.prod(out), -1)
    at = np.unravel_index(chosen, (n, *out))
    cols = np.empty((groups, len(chosen), per, len(reads)), x.dtype)
    index: tuple = (at[0], slice(None), *at[1:])  # each drawn row's (sample, *position)
    for k, r in enumerate(reads):  # (m, C) -> (G, m, C/G)
        cols[..., k] = r[index].reshape(-1, groups, per).transpose(1, 0, 2)
    return cols.reshape(groups, len(chosen), -1)


def _products(rows: np.ndarray, cap: int) -> list[np.ndarray]:
    """``rows^T rows`` per group (``rows`` (G, n, d)) as diagonal blocks of at most ``cap``
    columns, (G, b, b) float64 each."""
    d = rows.shape[2]
    out = []
    for s in range(0, d, cap):
        part = rows[:, :, s : s + cap]
        out.append(np.matmul(part.transpose(0, 2, 1), part).astype(np.float64))
    return out
