"""The Fisher of any output kind, label-free: residuals drawn from the model's own distribution.

For an output whose distribution is made from a tensor ``t`` (`onnxhq.outputs.ModelOutput`),
the score of a draw ``y`` is ``J^T r`` with ``J = dt/dw`` and ``r = d(-log p(y|t))/dt``:

=========  ================================================  ==================================
kind       distribution of each sample                       residual ``r`` (per entry of t)
=========  ================================================  ==================================
classes    softmax over the class axis, every other axis a   ``softmax(t) - onehot(y)``,
           position drawn independently (sequences, CTC)     ``y ~ softmax(t)`` per position
bernoulli  independent Bernoulli(sigmoid(t)) per entry       ``sigmoid(t) - y``, ``y ~ B(.)``
real       Gaussian N(t, I)                                  Rademacher ``+-1`` (same moments)
=========  ================================================  ==================================

So ``E_y (J^T r)^2`` is the diagonal of ``J^T F_t J``: the Fisher, with ``F_t`` the Fisher of the
distribution in ``t`` (``diag p - p p^T`` per position; ``p (1 - p)``; the identity, which makes
the ``real`` kind the Gauss-Newton diagonal of `onnxhq.hessian.gauss_newton`). Positions of one
sample are independent draws, so their cross terms vanish in expectation, and likewise across
the samples of a batch: one projected gradient per batch estimates the batch's sum without bias.
For class scores of rank 2 the labels are drawn exactly as `onnxhq.hessian.fisher` draws them.

Several outputs count together: the model's distribution is taken as the product of theirs,
so its Fisher is the sum of theirs. One `OutputEngine` serves them all: one forward pass per
batch reads every output's tensor, and one gradient session, whose loss is
``sum_k sum(r_k * t_k)``, gives either estimator:

* exact (default): one backward per output, the others' residuals zero, so each output's
  ``(J_k^T r_k)^2`` is summed over the outputs; each output draws the residuals its single
  estimate would (the same generator state), so the sum equals the per-output estimates' sum.
  Each backward fetches only the weights its output reaches.
* ``joint``: one backward with every residual at once, ``(sum_k J_k^T r_k)^2``. The cross terms
  ``2 (J_j^T r_j)(J_k^T r_k)`` have zero expectation (independent zero-mean residuals), so it is
  unbiased too, with one backward per batch instead of one per output, but noisier on weights
  that several outputs reach (on a weight one output reaches it is the exact estimate).

A list of engines sums their Fishers, each over the same draws of inputs, floored once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..data import Dataset
from ..errors import DataError
from .common import DEFAULT_BATCH, Diag, Draws, Progress, finalize, squares

if TYPE_CHECKING:
    from ..outputs import ModelOutput
    from ..training.output_engine import OutputEngine


def output_fisher(
    engine: OutputEngine | Sequence[OutputEngine],
    data: Dataset,
    *,
    samples: int = 1000,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: Progress | None = None,
    joint: bool = False,
) -> Diag:
    """Diagonal Fisher ``E_x E_{y~p(y|x)} (J^T r)^2`` of ``engine``'s outputs (see the module
    doc): the sum of their Fishers, by one backward per output, or with ``joint`` one backward
    for all. Of several engines (the same parameters), the sum of their Fishers.

    Returns float32 arrays keyed by parameter, shaped like the parameters, finite and floored.
    """
    engines = list(engine) if isinstance(engine, Sequence) else [engine]
    draws = Draws(samples, batch_size, seed)
    total: Diag = {}
    for i, one in enumerate(engines):
        tell = None if progress is None else _offset(progress, i * samples, len(engines) * samples)
        for p, v in _fisher_sums(one, data, draws, tell, joint=joint).items():
            total[p] = total[p] + v if p in total else v
    return finalize(total)


def _fisher_sums(
    engine: OutputEngine, data: Dataset, draws: Draws, progress: Progress | None, *, joint: bool
) -> Diag:
    """The mean over ``draws`` of the outputs' summed ``(J_k^T r_k)^2`` (or with ``joint``,
    ``(sum_k J_k^T r_k)^2``), float64, not floored."""
    outs = engine.outputs
    for out, t in zip(outs, engine.forward(data.head(min(len(data), 64)).inputs)):
        check_scores(out, t)
    alone = len(outs) > 1 and not joint
    streams: list[np.random.Generator] = []  # exact: one generator per output, as if alone

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        ts = engine.forward(batch.inputs)
        if alone and not streams:  # the state the generator starts from, once per output
            streams.extend(copy.deepcopy(rng) for _ in outs)
        gens = streams if alone else [rng] * len(outs)
        rs = [_draw(o, t, g) for o, t, g in zip(outs, ts, gens)]
        if not alone:
            return squares(engine.projected_gradients(batch.inputs, rs), "projected gradient")
        sums: Diag = {}
        for k, reached in enumerate(engine.reached):
            only = [r if j == k else np.zeros_like(r) for j, r in enumerate(rs)]
            grads = engine.projected_gradients(batch.inputs, only, params=reached)
            for p, v in squares(grads, "projected gradient").items():
                sums[p] = sums[p] + v if p in sums else v
        return sums

    return draws.mean(data, step, progress=progress, method="fisher")


def _draw(out: ModelOutput, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    axis = out.axis if out.axis is not None else -1
    return residual(out.kind, t, rng, axis=axis, flat=out.flat).astype(t.dtype)


def _offset(progress: Progress, before: int, total: int) -> Progress:
    return lambda done, _: progress(before + done, total)


def residual(
    kind: str, t: np.ndarray, rng: np.random.Generator, *, axis: int = -1, flat: bool = False
) -> np.ndarray:
    """A draw of ``r`` for tensor ``t`` (float64, shaped like ``t``) under output ``kind``.

    ``axis`` is the class axis; with ``flat`` the classes span every axis from ``axis`` on.
    """
    if kind == "real":
        return (rng.integers(0, 2, size=t.shape) * 2 - 1).astype(np.float64)
    z = np.asarray(t, np.float64)
    if kind == "bernoulli":
        s = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        return s - (rng.random(z.shape) < s)
    if flat:
        lead = z.shape[: axis % z.ndim]
        return residual(kind, z.reshape(*lead, -1), rng).reshape(z.shape)
    moved = np.moveaxis(z, axis, -1)
    classes = moved.shape[-1]
    rows = moved.reshape(-1, classes)
    p = np.exp(rows - rows.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((len(p), 1))
    labels = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), classes - 1)
    p[np.arange(len(p)), labels] -= 1.0
    return np.moveaxis(p.reshape(moved.shape), -1, axis)


def check_scores(out: ModelOutput, t: np.ndarray) -> None:
    """Refuse scores the kind cannot read: fewer than 2 classes, or probabilities read as logits
    (no Softmax or Sigmoid makes the output, but its values look like probabilities)."""
    if out.kind == "real":
        return
    axis = out.axis if out.axis is not None else -1
    if out.kind == "classes" and out.flat:
        t = t.reshape(*t.shape[: axis % t.ndim], -1)
        axis = -1
    if out.kind == "classes" and (t.ndim < 1 or t.shape[axis] < 2):
        raise DataError(
            f"output {out.name!r} of shape {t.shape} has fewer than 2 classes on axis "
            f"{out.axis}; give its kind with --output {out.name}:bernoulli or :real"
        )
    if out.tensor != out.name or not t.size or t.min() < 0 or t.max() > 1:
        return
    sums = np.asarray(t, np.float64).sum(axis=axis if out.kind == "classes" else None)
    if out.kind == "classes" and np.abs(sums - 1).max() >= 1e-3:
        return
    maker = "Softmax" if out.kind == "classes" else "Sigmoid"
    raise DataError(
        f"output {out.name!r} holds probabilities (values in [0, 1]) but no {maker} node makes "
        f"it, so they cannot serve as logits; name the logits output with --output, or read it "
        f"as --output {out.name}:real"
    )
