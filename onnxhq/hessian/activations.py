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

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..data import Dataset
from ..errors import ModelError
from ..runtime import make_session
from .common import Diag, Draws, check_sizes, finalize
from .uses import Use, conv_windows, expose, find_uses, runtime_feeds, weights_as_inputs

log = logging.getLogger(__name__)


def activation_hessian(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray] | Dataset,
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
    inputs : every runtime input, samples on axis 0 (equal counts); or a `Dataset`, which may
        hold only the samples drawn (`onnxhq.hessian.common.Draws.rows`).
    params : weights read by MatMul, Gemm, Conv, ConvTranspose or Gather (see the module doc).
    samples : at most this many samples, drawn as `Draws` draws them (``seed``; no repeats),
        feed the statistics; the calibration uses the first ``calibration_samples`` of them.
    batch_size : samples per onnxruntime run.
    progress : called with (runs done, runs in all).
    scaled : False returns the raw second moments (no calibration runs).
    outputs : the outputs whose change calibrates the layers; default every float output.
    calibration_samples, rel_noise : the calibration's sample count and perturbation size.

    Returns
    -------
    name -> float32 array shaped like the weight, finite and positive.

    Memory: one batch of activations, the per-feature sums, the weights (one copy), the
    calibration batches' outputs, and the result; one weight-sized float64 temporary at a time.
    """
    check_sizes(samples=samples, batch_size=batch_size)
    check_sizes(samples=calibration_samples, batch_size=batch_size)
    graph_model, values = weights_as_inputs(model, params)
    uses = find_uses(graph_model, params, values)
    given = inputs.inputs if isinstance(inputs, Dataset) else inputs
    feeds = runtime_feeds(graph_model, given, params)
    data = Dataset(feeds)
    if isinstance(inputs, Dataset):
        data = Dataset(feeds, source=inputs.source, rows=inputs.rows, total=inputs.total)
    n = data.source_size
    at = data.positions(Draws(min(samples, n), batch_size, seed).order(n))
    watched = list(outputs) if outputs is not None else _float_outputs(graph_model)
    exposed = sorted({u.x for u in uses} - set(feeds) - set(values))
    expose(graph_model, [*exposed, *watched])
    calib = at[: min(calibration_samples, len(at))] if scaled else at[:0]
    stat_runs = -(-len(at) // batch_size)
    total_runs = stat_runs + -(-len(calib) // batch_size) * (len(params) + 1)
    runs = _Runs(make_session(graph_model), feeds, values, batch_size, progress, total_runs)

    means = _mean_moments(runs, uses, at, exposed)
    shapes = {p: v.shape for p, v in values.items()}

    def diagonal(p: str) -> np.ndarray:
        """The second moments of weight ``p`` (float64, shaped like it): its uses summed."""
        out = np.zeros(shapes[p])
        for use, mean in zip(uses, means):
            if use.param == p:
                out += _broadcast(use, mean)
        return out

    if not scaled:
        return finalize({p: diagonal(p).astype(np.float32) for p in params})
    scales = _calibrate(runs, diagonal, calib, watched, rel_noise=rel_noise, seed=seed)
    values.clear()  # our copy of the weights: gone before the result takes its place
    return finalize({p: (diagonal(p) * scales[p]).astype(np.float32) for p in params})


def _mean_moments(
    runs: _Runs, uses: list[Use], at: np.ndarray, exposed: list[str]
) -> list[np.ndarray]:
    """Per use, the mean of x^2 per input feature over the positions of the samples at ``at``
    (`_moment_sums`), one batch of activations at a time."""
    sums: list[tuple[np.ndarray, float]] = []
    for batch in runs.batches(at):
        known = {**batch, **runs.values, **dict(zip(exposed, runs.run(exposed, batch)))}
        step = [_moment_sums(use, np.asarray(known[use.x])) for use in uses]
        sums = step if not sums else [(s + t, c + d) for (s, c), (t, d) in zip(sums, step)]
    return [s / max(c, 1.0) for s, c in sums]


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


def _moment_sums(use: Use, x: np.ndarray) -> tuple[np.ndarray, float]:
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


def _conv_sums(use: Use, sq: np.ndarray) -> tuple[np.ndarray, float]:
    """Per (input channel, kernel offset): the sum of the padded x^2 the offset reads."""
    kernel = use.shape[2:]
    sums = np.zeros((sq.shape[1], *kernel))
    positions = 0.0
    for offset, reads in conv_windows(use, sq):
        target: tuple[slice | int, ...] = (slice(None), *offset)
        sums[target] = reads.sum(axis=(0, *range(2, reads.ndim)))
        positions = float(reads.shape[0] * np.prod(reads.shape[2:]))
    return sums, positions


def _broadcast(use: Use, mean: np.ndarray) -> np.ndarray:
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
    runs: _Runs,
    diagonal: Callable[[str], np.ndarray],
    calib: np.ndarray,
    watched: list[str],
    *,
    rel_noise: float,
    seed: int,
) -> dict[str, float]:
    """The scale of each layer's diagonal that makes sum(h d^2) predict the output change d
    causes. One weight's perturbation lives at a time; the unperturbed outputs of the
    calibration batches are kept (``len(calib)`` samples of the watched outputs)."""
    rng = np.random.default_rng([seed, 1])  # the perturbations, drawn weight after weight
    batches = list(runs.batches(calib))
    base = [runs.run(watched, batch) for batch in batches]
    scales = {}
    for p, w in runs.values.items():
        rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) or 1.0
        noise = (rel_noise * rms * rng.standard_normal(w.shape)).astype(w.dtype)
        change = 0.0
        for batch, before in zip(batches, base):
            moved = runs.run(watched, batch, {p: w + noise})
            change += sum(
                float(np.sum(np.square(a - b, dtype=np.float64))) for a, b in zip(moved, before)
            )
        predicted = float(np.sum(diagonal(p) * np.square(noise, dtype=np.float64)))
        scales[p] = change / len(calib) / predicted if predicted > 0 else 0.0
        log.debug("activation Hessian: %s scaled by %.4g", p, scales[p])
    return scales


class _Runs:
    """The weights-as-inputs model's session with its runtime inputs ``feeds`` and weights
    ``values``, run ``batch_size`` samples at a time; each run counted for ``progress``."""

    def __init__(self, session, feeds, values, batch_size: int, progress, total: int) -> None:
        self.session, self.feeds, self.values = session, feeds, values
        self.batch_size, self.progress, self.total, self.done = batch_size, progress, total, 0

    def batches(self, at: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """The feeds of the samples at positions ``at``, a batch at a time, in order."""
        for start in range(0, len(at), self.batch_size):
            yield {k: v[at[start : start + self.batch_size]] for k, v in self.feeds.items()}

    def run(self, names: list[str], batch: Mapping[str, np.ndarray], weights=None) -> list:
        """Outputs ``names`` on ``batch`` (none run for no names), ``weights`` replacing some."""
        got = self.session.run(names, {**batch, **self.values, **(weights or {})}) if names else []
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return got
