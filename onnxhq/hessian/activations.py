"""The forward-only Hessian: input second moments per weight, calibrated per layer.

No gradient graph: any model onnxruntime runs, any opset. For a weight ``W`` that multiplies an
input ``x`` (``y = x W``), the layer-wise reconstruction error ``||x dW||^2`` has the Hessian
``2 X X^T`` that OBQ and GPTQ use; its diagonal, per input feature ``k``, is the second moment
``E[x_k^2]``, broadcast over the outputs the feature feeds. It is gathered in ONE pass over the
data, with the inputs of the weight-reading nodes exposed as extra graph outputs:

=============  ===================================================================================
MatMul         weight second (K, N): E over all leading positions of x[..., k]^2, per row k;
               weight first (M, K): E over positions and columns of x[..., k, n]^2, per column k
Gemm           as MatMul on the transposed operands (transA, transB), times alpha^2
Conv           per input channel and kernel offset, E over samples and output positions of the
               zero-padded input at that offset (the im2col view: strides, dilations, pads,
               auto_pad), each group's channels for that group's output channels
ConvTranspose  per input channel, E of x^2 over samples and positions (exact up to the borders)
Gather         the table's rows: the share of lookups reading each row (the second moment of a
               one-hot input), broadcast over the row
=============  ===================================================================================

A weight read by several nodes gets the sum. These diagonals are comparable within a layer but
not across layers: one layer's error may matter a hundred times more to the output than
another's. So each layer ``l`` is scaled by ``c_l``, measured: its weights get a small random
perturbation ``d`` (``rel_noise`` times their rms, Gaussian), and ``c_l`` is the mean squared
change of the model's outputs per sample divided by the predicted layer error ``sum(h d^2)``.
Then ``sum(c h d^2)`` is, for every layer, the output error such a perturbation causes: one
diagonal model of the output error across the network, which is what a shared codebook needs.
It costs one forward pass per layer per calibration batch (``calibration_samples`` samples).

The result is floored like every estimator's (`onnxhq.hessian.common.finalize`): float32,
shaped like the weights, finite and positive.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import DataError, ModelError
from ..normalize import materialize_constants
from ..runtime import make_session
from .common import Diag, check_sizes, finalize

log = logging.getLogger(__name__)

#: op type -> the input slots a weight may sit in.
SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}


@dataclass(frozen=True, eq=False)
class _Use:
    """One node reading weight ``param`` at input ``slot``; ``x`` is what it multiplies."""

    param: str
    node: onnx.NodeProto
    slot: int
    x: str
    shape: tuple[int, ...]

    def attr(self, name: str, default):
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def activation_hessian(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    params: Sequence[str],
    *,
    samples: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    scaled: bool = True,
    outputs: Sequence[str] | None = None,
    calibration_samples: int = 32,
    rel_noise: float = 0.02,
) -> Diag:
    """Diagonal Hessian of each weight in ``params`` from input second moments, scaled per layer.

    Parameters
    ----------
    model : any model onnxruntime runs; weights as initializers or Constant nodes. Not changed.
    inputs : every runtime input, samples on axis 0 (equal counts).
    params : weights read by MatMul, Gemm, Conv, ConvTranspose or Gather (see the module doc).
    samples : at most this many samples, drawn at random (``seed``), feed the statistics.
    batch_size : samples per onnxruntime run.
    progress : called with (runs done, runs in all).
    scaled : False returns the raw second moments (no calibration runs).
    outputs : the outputs whose change calibrates the layers; default every float output.
    calibration_samples, rel_noise : the calibration's sample count and perturbation size.

    Returns
    -------
    name -> float32 array shaped like the weight, finite and positive.
    """
    check_sizes(samples=samples, batch_size=batch_size)
    check_sizes(samples=calibration_samples, batch_size=batch_size)
    graph_model, values = _weights_as_inputs(model, params)
    uses = _uses(graph_model, params, values)
    feeds = _check_inputs(graph_model, inputs, params)
    n = len(next(iter(feeds.values())))
    order = np.random.default_rng(seed).permutation(n)[: min(samples, n)]
    watched = list(outputs) if outputs is not None else _float_outputs(graph_model)
    exposed = sorted({u.x for u in uses} - set(feeds) - set(values))
    for name in [*exposed, *watched]:
        if name not in {o.name for o in graph_model.graph.output}:
            graph_model.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = make_session(graph_model)
    calib = order[: min(calibration_samples, len(order))] if scaled else order[:0]
    stat_runs = -(-len(order) // batch_size)
    total_runs = stat_runs + -(-len(calib) // batch_size) * (len(params) + 1)
    counter = _Counter(progress, total_runs)

    sums: dict[int, tuple[np.ndarray, float]] = {}
    for start in range(0, len(order), batch_size):
        batch = {k: v[order[start : start + batch_size]] for k, v in feeds.items()}
        got = dict(zip(exposed, session.run(exposed, {**batch, **values}) if exposed else []))
        known = {**batch, **values, **got}
        for i, use in enumerate(uses):
            s, c = _moment_sums(use, np.asarray(known[use.x]))
            prev = sums.get(i)
            sums[i] = (s, c) if prev is None else (prev[0] + s, prev[1] + c)
        counter.step()
    diag: Diag = {p: np.zeros(values[p].shape) for p in params}
    for i, use in enumerate(uses):
        s, c = sums[i]
        diag[use.param] = diag[use.param] + _broadcast(use, s / max(c, 1.0))
    if scaled:
        diag = _calibrate(
            session,
            diag,
            values,
            feeds,
            calib,
            watched,
            batch_size=batch_size,
            rel_noise=rel_noise,
            seed=seed,
            counter=counter,
        )
    return finalize(diag)


def _weights_as_inputs(
    model: onnx.ModelProto, params: Sequence[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy with Constant weights materialized and ``params`` moved to graph inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    materialize_constants(m)
    inits = {t.name: t for t in m.graph.initializer}
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(
            f"weight {missing[0]!r} is not a constant of the model; the activation "
            "Hessian needs the names of initializers or Constant node outputs"
        )
    values = {p: numpy_helper.to_array(inits[p]) for p in params}
    not_float = [p for p in params if values[p].dtype.kind != "f"]
    if not_float:
        raise ModelError(
            f"weight {not_float[0]!r} is {values[not_float[0]].dtype}, not a float "
            "tensor; leave it out of the weights to compress"
        )
    keep = [t for t in m.graph.initializer if t.name not in values]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.input.extend(
        helper.make_tensor_value_info(p, inits[p].data_type, list(inits[p].dims)) for p in params
    )
    return m, values


def _uses(
    model: onnx.ModelProto, params: Sequence[str], values: Mapping[str, np.ndarray]
) -> list[_Use]:
    wanted, uses = set(params), []
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in wanted:
                continue
            known = node.domain in ("", "ai.onnx") and slot in SLOTS.get(node.op_type, ())
            if not known:
                raise ModelError(
                    f"weight {name!r} is read by {node.op_type} node {node.name!r} (input "
                    f"{slot}); the activation Hessian handles weights of MatMul, Gemm, Conv, "
                    "ConvTranspose and Gather: leave it out, or choose another --hessian"
                )
            if node.op_type in ("MatMul", "Gemm"):
                other = node.input[1 - slot]  # the operand the weight multiplies
            else:
                other = node.input[1 if node.op_type == "Gather" else 0]  # indices, or x
            uses.append(_Use(name, node, slot, other, tuple(values[name].shape)))
    unread = wanted - {u.param for u in uses}
    if unread:
        raise ModelError(f"weight {sorted(unread)[0]!r} is read by no node of the main graph")
    return uses


def _check_inputs(
    model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], params: Sequence[str]
) -> dict[str, np.ndarray]:
    """The runtime inputs, checked: every one given, equal sample counts on axis 0."""
    consts = {t.name for t in model.graph.initializer} | set(params)
    needed = [i.name for i in model.graph.input if i.name not in consts]
    missing = [name for name in needed if name not in inputs]
    if missing:
        raise DataError(
            f"the data has no input {missing[0]!r}; the model needs {', '.join(needed)}"
        )
    feeds = {name: np.asarray(inputs[name]) for name in needed}
    counts = {k: (len(v) if v.ndim else 0) for k, v in feeds.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"the inputs must hold equal, nonzero sample counts on axis 0; got {counts}"
        )
    return feeds


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    names = [
        o.name
        for o in model.graph.output
        if not o.type.HasField("tensor_type") or o.type.tensor_type.elem_type in floats
    ]
    if not names:
        raise ModelError("the model has no float output to calibrate the layers against")
    return names


def _moment_sums(use: _Use, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Sum of x^2 per input feature over this batch's positions, and the number of positions."""
    op = use.node.op_type
    if op == "Gather":
        rows = use.shape[use.attr("axis", 0)]
        idx = np.asarray(x, np.int64).ravel() % rows
        return np.bincount(idx, minlength=rows).astype(np.float64), float(idx.size)
    sq = np.square(x, dtype=np.float64)
    if op in ("MatMul", "Gemm"):
        # Orient the activation as (positions..., K) against the weight's K axis.
        if op == "Gemm":
            trans = use.attr("transA" if use.slot == 1 else "transB", 0)
            sq = sq.T if trans else sq
            if use.slot == 0:  # weight A (M, K) times activation B (K, N)
                return sq.sum(axis=1), float(sq.shape[1])
            return sq.sum(axis=0), float(sq.shape[0])
        if use.slot == 0:  # weight (M, K) @ activation (..., K, N): K moved last
            sq = sq[None, :] if sq.ndim == 1 else np.moveaxis(sq, -2, -1)
        k = sq.shape[-1]
        flat = sq.reshape(-1, k)
        return flat.sum(axis=0), float(flat.shape[0])
    if op == "ConvTranspose":
        axes = (0, *range(2, sq.ndim))
        return sq.sum(axis=axes), float(sq.size / sq.shape[1])
    return _conv_sums(use, sq)


def _conv_sums(use: _Use, sq: np.ndarray) -> tuple[np.ndarray, float]:
    """Per (input channel, kernel offset): the sum of the padded x^2 the offset reads."""
    kernel = use.shape[2:]
    sp = len(kernel)
    strides = list(use.attr("strides", [1] * sp))
    dil = list(use.attr("dilations", [1] * sp))
    begin, end = _conv_pads(use, sq.shape[2:], kernel, strides, dil)
    padded = np.pad(sq, [(0, 0), (0, 0), *zip(begin, end)])
    out = [
        (padded.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(sp)
    ]
    sums = np.zeros((sq.shape[1], *kernel))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dil, out, strides)
        )
        where: tuple[slice, ...] = (slice(None), slice(None), *window)
        reads = padded[where]
        target: tuple[slice | int, ...] = (slice(None), *offset)
        sums[target] = reads.sum(axis=(0, *range(2, 2 + sp)))
    return sums, float(sq.shape[0] * np.prod(out))


def _conv_pads(
    use: _Use,
    size: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dil: Sequence[int],
) -> tuple[list[int], list[int]]:
    sp = len(kernel)
    auto = use.attr("auto_pad", b"NOTSET")
    if auto in (b"SAME_UPPER", b"SAME_LOWER"):
        total = [
            max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            for n, s, d, k in zip(size, strides, dil, kernel)
        ]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        return (small, big) if auto == b"SAME_UPPER" else (big, small)
    if auto == b"VALID":
        return [0] * sp, [0] * sp
    pads = list(use.attr("pads", [0] * 2 * sp))
    return pads[:sp], pads[sp:]


def _broadcast(use: _Use, mean: np.ndarray) -> np.ndarray:
    """The per-feature second moments spread over the weight's shape."""
    op, shape = use.node.op_type, use.shape
    if op == "Gather":
        axis = use.attr("axis", 0) % len(shape)
        view = mean.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    elif op == "MatMul":
        view = mean[:, None] if use.slot == 1 and len(shape) > 1 else mean
    elif op == "Gemm":
        trans = use.attr("transB" if use.slot == 1 else "transA", 0)
        rows_are_k = (use.slot == 1) != bool(trans)  # B (K, N), or A^T stored as (K, M)
        view = (mean[:, None] if rows_are_k else mean[None, :]) * use.attr("alpha", 1.0) ** 2
    elif op == "ConvTranspose":
        view = mean.reshape(-1, *[1] * (len(shape) - 1))
    else:  # Conv: (Cin, k...) -> each group's channels, repeated for its output channels
        groups = use.attr("group", 1)
        per_group = mean.reshape(groups, mean.shape[0] // groups, *mean.shape[1:])
        view = np.repeat(per_group, shape[0] // groups, axis=0)
    return np.broadcast_to(view, shape).astype(np.float64)


def _calibrate(
    session,
    diag: Diag,
    values: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    calib: np.ndarray,
    watched: list[str],
    *,
    batch_size: int,
    rel_noise: float,
    seed: int,
    counter: _Counter,
) -> Diag:
    """Scale each layer's diagonal so that sum(h d^2) predicts the output change d causes."""
    rng = np.random.default_rng([seed, 1])
    noise = {}
    for p, w in values.items():
        rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) or 1.0
        noise[p] = (rel_noise * rms * rng.standard_normal(w.shape)).astype(w.dtype)
    change = dict.fromkeys(values, 0.0)
    for start in range(0, len(calib), batch_size):
        batch = {k: v[calib[start : start + batch_size]] for k, v in feeds.items()}
        base = session.run(watched, {**batch, **values})
        counter.step()
        for p in values:
            moved = session.run(watched, {**batch, **values, p: values[p] + noise[p]})
            change[p] += sum(
                float(np.sum(np.square(a - b, dtype=np.float64))) for a, b in zip(moved, base)
            )
            counter.step()
    scaled = {}
    for p, h in diag.items():
        predicted = float(np.sum(h * np.square(noise[p], dtype=np.float64)))
        scale = change[p] / len(calib) / predicted if predicted > 0 else 0.0
        log.debug("activation Hessian: %s scaled by %.4g", p, scale)
        scaled[p] = h * scale
    return scaled


class _Counter:
    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
