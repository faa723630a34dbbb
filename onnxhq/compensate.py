"""Error-compensated assignment onto codebooks (OBQ / GPTQ), with the layer-wise Hessian.

The diagonal model rounds every weight on its own. `compensate` rounds a layer one input column
at a time and moves the columns not yet rounded to cancel the error on the layer's outputs
(`onnxhq.layerwise`: ``H = X X^T / n``, GPTQ's ``2 X X^T`` up to the constant), onto the
codebooks an onnxhq quantizer already fit (any method, any scope: each weight picks among its own
codebook row's codewords, those the plain assignment used), then refits the codebook values to
the new codes by least squares on the same objective (all layers together for a shared
codebook).

What is promised (and tested):

- column ``c`` (in processing order) takes the codeword that minimises the layer objective with
  the earlier columns fixed at their codewords and the later columns free (solved in closed
  form); for one column this is the exact optimum; the objective equals the sum of the per-column
  costs (with ``damp=0``);
- rows (outputs) are independent: permuting them permutes the result; scaling the inputs ``X``
  changes nothing; with ``order="descending"`` (GPTQ's act-order: columns by decreasing
  ``H_cc``, ties by position) permuting the input features (columns of ``W`` with ``H``) permutes
  the result when the ``H_cc`` are distinct.

Layers are put on one scale by the importances the codebook was fit with: a layer's objective is
multiplied by ``s = sum(h) / sum(H_cc)`` over its weights, so that its diagonal matches the
importances. With an entropy rate (``lam``, or ``match_bits``) the choice adds ``lam * l_j``,
``l_j = -log2 p_j`` the code length of codeword ``j`` in the plain assignment, as ECSQ does;
``match_bits`` finds the smallest ``lam`` (to 5 %, `onnxhq.ratematch`) whose coded size stays at
most the plain assignment's.

Speed (the column walk is the cost): a Conv's groups are walked together (one numpy call per
column for all of them), each column's choice searches only a window of the sorted codewords
(`onnxhq.cells`), the rate multiplier is matched in 5-7 walks, and the refit stops when a
conjugate-gradient step gains less than `REFIT_TOL` of the objective.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from .cells import SortedCells
from .errors import ConfigError, DataError
from .layerwise import (
    BLOCK,
    DAMP,
    ORDERS,
    LayerHessian,
    column_order,
    from_view,
    gptq_columns,
    inverse_cholesky,
    matrix_view,
)
from .quantize.codes import QuantizedWeights, coded_bits
from .quantize.ecsq import code_lengths
from .quantize.guard import measure_errors
from .ratematch import match_rate

log = logging.getLogger(__name__)

#: The codebook refit stops when a step gains less than this share of the objective.
REFIT_TOL = 1e-6

__all__ = ["Compensation", "LayerHessian", "compensate"]


@dataclass(frozen=True)
class Compensation:
    """What `compensate` did: layer objectives (importance units) before and after, per tensor.

    Attributes
    ----------
    plain, compensated : name -> ``s * tr(E H E^T)`` of the compensated tensors.
    lam : the rate multiplier used (0: nearest codeword).
    diagonal : names left with their plain assignment (no ``H``), sorted.
    """

    plain: dict[str, float]
    compensated: dict[str, float]
    lam: float
    diagonal: tuple[str, ...]


def compensate(
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
    importances: Mapping[str, np.ndarray] | None = None,
    *,
    pruned: Mapping[str, np.ndarray] | None = None,
    lam: float | None = None,
    match_bits: bool = False,
    refit: bool = True,
    damp: float = DAMP,
    order: str = "descending",
    block: int = BLOCK,
) -> tuple[QuantizedWeights, Compensation]:
    """Reassign ``quantized``'s codes with error compensation, then refit the codebook values.

    Parameters
    ----------
    quantized : the plain result (`onnxhq.quantize.quantize_weights`) for ``weights``.
    weights : name -> the original float arrays (every quantized tensor).
    hessians : name -> `LayerHessian` for the tensors to compensate; the others keep their plain
        codes (they still count in the refit, with their importances).
    importances : the importances the codebooks were fit with (the scale of each layer); None
        puts every layer at unit mean ``H_cc``.
    pruned : name -> bool mask; pruned weights keep the pruned (0.0) codeword.
    lam, match_bits : the rate term (see the module doc); at most one. Neither: nearest codeword.
    refit : refit the codebook values to the new codes (least squares on the layer objectives).
    damp, order, block : GPTQ's dampening, column order (`ORDERS`), lazy-batch width.

    Returns
    -------
    (QuantizedWeights, Compensation) : same codebook keys and shapes; errors measured again.
    """
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    if lam is not None and match_bits:
        raise ConfigError("give lam or match_bits, not both")
    if not (damp >= 0 and block >= 1):
        raise ConfigError(f"damp={damp} must be >= 0 and block={block} >= 1")
    unknown = sorted(set(hessians) - set(quantized.tensors))
    if unknown:
        raise DataError(f"a Hessian is given for {unknown[0]!r}, which is not quantized")
    plan = _Plan(quantized, weights, hessians, importances, pruned, damp, order)
    plain_bits = coded_bits(quantized)
    if match_bits:
        lam, codes = _match(plan, plain_bits, block)
    else:
        lam = float(lam or 0.0)
        codes = plan.assign(lam, block)
    qw = plan.with_codes(codes)
    if refit:  # (a second assignment from the refit values gained nothing on ResNet-32)
        qw = replace(qw, codebooks=plan.refit(qw))
    objective = plan.objectives(qw)
    qw = replace(qw, errors=measure_errors(dict(weights), qw))
    before = plan.objectives(quantized)
    log.info("compensation: layer objective %.4g -> %.4g (lam %.3g, %.4g -> %.4g coded bits)",
             sum(before.values()), sum(objective.values()), lam, plain_bits,
             coded_bits(qw))  # fmt: skip
    diagonal = tuple(sorted(set(quantized.tensors) - set(hessians)))
    return qw, Compensation(before, objective, lam, diagonal)


def _match(plan: _Plan, target: float, block: int) -> tuple[float, dict[str, np.ndarray]]:
    """The smallest lam (to 5 %) whose compensated codes cost at most ``target`` bits, and the
    codes (`onnxhq.ratematch`)."""

    def assign(lam: float) -> dict[str, np.ndarray]:
        return plan.assign(lam, block)

    def size(codes: dict[str, np.ndarray]) -> float:
        return coded_bits(plan.with_codes(codes))

    return match_rate(assign, size, target, plan.unit)


class _Plan:
    """The validated problem: each tensor's view, codebook rows, fixed entries and scale."""

    def __init__(self, qw, weights, hessians, importances, pruned, damp, order) -> None:
        self.qw, self.hessians = qw, hessians
        self.names = sorted(qw.tensors)
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise DataError(f"no original weight given for quantized tensor {missing[0]!r}")
        self.w = {n: np.asarray(weights[n], np.float64) for n in self.names}
        self.fixed = {n: _pruned(self.w[n], pruned, n) for n in self.names}
        self.rows = {n: _book_rows(qw.tensors[n]) for n in self.names}
        self.h = {n: _importance(self.w[n], importances, n) for n in self.names}
        self.scale, self.factors = {}, {}
        self.walk: dict[str, list] = {}
        for n in sorted(hessians):
            lh = hessians[n]
            diag = lh.diagonal()[:, None, :]
            hsum = float(np.sum(np.broadcast_to(diag, matrix_view(self.w[n], lh).shape)))
            hn = self.h[n]
            mean_h = self.w[n].size if hn is None else float(np.sum(hn))
            self.scale[n] = mean_h / hsum if hsum > 0 else 0.0
            self.factors[n] = [_factor(b, order, damp) for b in lh.blocks]
        self.ell = {k: _code_lengths(qw, k, self.fixed) for k in qw.codebooks}
        self.live = {k: np.isfinite(v) for k, v in self.ell.items()}
        self.cells = {k: SortedCells(_rows_of(qw.codebooks[k]), self.live[k]) for k in self.ell}
        total = sum(w.size for w in self.w.values())
        d0 = sum(self.objectives(qw).values()) + sum(
            _diag_objective(self, n, qw) for n in self.names if n not in hessians
        )
        self.unit = max(d0 / total, 1e-300)

    def with_codes(self, codes: Mapping[str, np.ndarray]) -> QuantizedWeights:
        tensors = {n: replace(t, indices=codes.get(n, t.indices)) for n, t in
                   self.qw.tensors.items()}  # fmt: skip
        return replace(self.qw, tensors=tensors)

    def assign(self, lam: float, block: int) -> dict[str, np.ndarray]:
        """New codes of the compensated tensors."""
        return {n: self._assign_one(n, lam, block) for n in sorted(self.hessians)}

    def _assign_one(self, n: str, lam: float, block: int) -> np.ndarray:
        lh, t = self.hessians[n], self.qw.tensors[n]
        book = _rows_of(self.qw.codebooks[t.codebook])
        live, cells = self.live[t.codebook], self.cells[t.codebook]
        pen = cells.penalties(
            np.where(live, lam * np.where(live, self.ell[t.codebook], 0.0), np.inf)
        )
        s = self.scale[n]
        out = np.empty(matrix_view(t.indices, lh).shape, np.int64)
        for cols, at, u, (w, r, f, ol) in self._walks(n):
            some = bool(f.any())

            def choose(c, wc, ucc, r=r, f=f, ol=ol, some=some):  # wc: (G, R)
                rows = r[:, :, c]
                a = np.broadcast_to((s / (ucc * ucc))[:, None], wc.shape)
                if not some:
                    j = cells.best(wc.ravel(), a.ravel(), rows.ravel(), pen).reshape(wc.shape)
                    return j, book[rows, j]
                j = np.array(ol[:, :, c])
                free = ~f[:, :, c]
                j[free] = cells.best(wc[free], a[free], rows[free], pen)
                return j, book[rows, j]

            idx, _ = gptq_columns(w, u, choose, block=block)
            np.put_along_axis(out[:, :, cols], at, idx, axis=2)
        return from_view(out, t.indices.shape, lh).astype(np.int32)

    def _walks(self, n: str) -> list:
        """Per ``H`` block of tensor ``n``: its columns, each group's order (broadcast to the
        view), ``U``, and the weights, codebook rows, fixed marks and plain codes in that order
        (G, R, width); made once, shared by every assignment."""
        if n not in self.walk:
            lh, t = self.hessians[n], self.qw.tensors[n]
            views = [
                matrix_view(m, lh) for m in (self.w[n], self.rows[n], self.fixed[n], t.indices)
            ]
            out, start = [], 0
            for b, (o, u) in zip(lh.blocks, self.factors[n]):
                cols = slice(start, start + b.shape[-1])
                at = np.broadcast_to(o[:, None, :], (*views[0].shape[:2], b.shape[-1]))
                ordered = tuple(np.take_along_axis(m[:, :, cols], at, axis=2) for m in views)
                out.append((cols, at, u, ordered))
                start += b.shape[-1]
            self.walk[n] = out
        return self.walk[n]

    def objectives(self, qw: QuantizedWeights) -> dict[str, float]:
        """name -> ``s * tr(E H E^T)`` of each compensated tensor (block-diagonal ``H``)."""
        out = {}
        for n in sorted(self.hessians):
            lh = self.hessians[n]
            e = matrix_view(self.w[n] - qw.dequantize(n).astype(np.float64), lh)
            total, start = 0.0, 0
            for b in lh.blocks:
                eb = e[:, :, start : start + b.shape[-1]]
                total += float(np.sum(np.matmul(eb, b) * eb))
                start += b.shape[-1]
            out[n] = self.scale[n] * total
        return out

    def refit(self, qw: QuantizedWeights) -> dict[str, np.ndarray]:
        """Codebook values minimising the sum of the objectives for fixed codes (per key)."""
        books = dict(qw.codebooks)
        for key, book in qw.codebooks.items():
            names = [n for n in self.names if qw.tensors[n].codebook == key]
            if names:
                books[key] = _refit_key(self, qw, key, names).reshape(book.shape).astype(
                    book.dtype)  # fmt: skip
        return books


def _refit_key(plan: _Plan, qw: QuantizedWeights, key: str, names: list[str]) -> np.ndarray:
    """Projected conjugate gradients on the codewords of one key (pruned codewords fixed)."""
    c0 = np.asarray(qw.codebooks[key], np.float64).ravel()
    k = np.asarray(qw.codebooks[key]).shape[-1]
    terms, fixed = [], np.zeros(c0.size, bool)
    for n in names:
        gid = plan.rows[n] * k + qw.tensors[n].indices
        fixed[gid[plan.fixed[n]]] = True
        if n in plan.hessians:
            lh, s = plan.hessians[n], plan.scale[n]
            gv, wv = matrix_view(gid, lh), matrix_view(plan.w[n], lh)
            start = 0
            for b in lh.blocks:  # (G, R, width) codes and weights, (G, width, width) H
                cols = slice(start, start + b.shape[-1])
                terms.append((gv[:, :, cols], wv[:, :, cols], s * b))
                start += b.shape[-1]
        else:
            hn = plan.h[n]
            h = np.ones(gid.shape) if hn is None else hn
            terms.append((gid.ravel(), plan.w[n].ravel(), h.ravel()))

    def apply(values: np.ndarray, of_weights: bool = False) -> np.ndarray:
        out = np.zeros(c0.size)
        for gid, wv, h in terms:
            x = wv if of_weights else values[gid]
            y = x @ h if h.ndim == 3 else x * h
            out += np.bincount(gid.ravel(), y.ravel(), c0.size)
        return out

    diag = np.zeros(c0.size)
    for gid, _, h in terms:
        hd = np.broadcast_to(np.diagonal(h, axis1=1, axis2=2)[:, None, :], gid.shape) if (
            h.ndim == 3) else h  # fmt: skip
        diag += np.bincount(gid.ravel(), hd.ravel(), c0.size)
    used = diag > 0
    ridge = 1e-9 * float(np.mean(diag[used])) if np.any(used) else 1.0
    free = used & ~fixed
    b = apply(c0, of_weights=True)
    rhs = b + ridge * c0
    x = c0.copy()
    ax = apply(x)
    r = np.where(free, rhs - ax - ridge * x, 0.0)
    # the objective sum (w - q) H (w - q)^T, less its constant w H w^T: -2 b.x + x.A x
    objective = float(x @ ax - 2 * b @ x) + _constant(terms)
    pre = 1.0 / (diag + ridge)
    z = r * pre
    p, rz = z.copy(), float(r @ z)
    norm0 = float(np.linalg.norm(r)) or 1.0
    for _ in range(int(np.count_nonzero(free)) + 20):
        if float(np.linalg.norm(r)) <= 1e-12 * norm0:
            break
        ap = np.where(free, apply(p) + ridge * p, 0.0)
        alpha = rz / float(p @ ap)
        x += alpha * p
        r -= alpha * ap
        objective -= alpha * rz  # what this step gained
        if alpha * rz <= REFIT_TOL * abs(objective):
            break
        z = r * pre
        rz, rz_old = float(r @ z), rz
        p = z + (rz / rz_old) * p
    return np.where(free, x, c0)


def _constant(terms) -> float:
    """``sum w H w^T`` over the refit's terms."""
    total = 0.0
    for _, wv, h in terms:
        total += float(np.sum((wv @ h) * wv) if h.ndim == 3 else np.sum(h * wv * wv))
    return total


def _factor(h: np.ndarray, order: str, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(G, d) column order of each group and (G, d, d) ``U`` of each group's reordered ``H``."""
    o = column_order(np.diagonal(h, axis1=1, axis2=2), order)
    ordered = np.take_along_axis(
        np.take_along_axis(h, o[:, :, None], axis=1), o[:, None, :], axis=2
    )
    return o, inverse_cholesky(ordered, damp)


def _rows_of(book: np.ndarray) -> np.ndarray:
    """A codebook as (rows, k) float64 (one row unless channel groups)."""
    book = np.asarray(book, np.float64)
    return book.reshape(-1, book.shape[-1])


def _diag_objective(plan: _Plan, n: str, qw: QuantizedWeights) -> float:
    e = plan.w[n] - qw.dequantize(n).astype(np.float64)
    hn = plan.h[n]
    return float(np.sum(e * e) if hn is None else np.sum(hn * e * e))


def _book_rows(codes) -> np.ndarray:
    """Codebook row of each entry (0 without channel groups), shaped like the indices."""
    idx = codes.indices
    if codes.group_size is None:
        return np.zeros(idx.shape, np.int64)
    rows = np.arange(idx.shape[0]) // codes.group_size
    return np.broadcast_to(rows.reshape(-1, *[1] * (idx.ndim - 1)), idx.shape).copy()


def _pruned(w: np.ndarray, pruned, name: str) -> np.ndarray:
    if pruned is None or name not in pruned:
        return np.zeros(w.shape, bool)
    p = np.asarray(pruned[name])
    if p.shape != w.shape or p.dtype != np.bool_:
        raise DataError(f"the pruned mask of {name!r} must be bool of shape {w.shape}")
    return p


def _importance(w: np.ndarray, importances, name: str) -> np.ndarray | None:
    if importances is None:
        return None
    if name not in importances:
        raise DataError(f"importances have no entry for weight {name!r}")
    h = np.asarray(importances[name], np.float64)
    if h.shape != w.shape:
        raise DataError(f"importances of {name!r} have shape {h.shape}, the weight {w.shape}")
    return h


def _code_lengths(qw: QuantizedWeights, key: str, fixed: Mapping[str, np.ndarray]) -> np.ndarray:
    """(rows, k) code lengths ``-log2 p`` of each key's codewords (all rows share one code);
    inf where a row's unpruned weights used the codeword in none of the plain codes."""
    book = np.asarray(qw.codebooks[key])
    k, nrows = book.shape[-1], (book.shape[0] if book.ndim == 2 else 1)
    counts, live = np.zeros(k), np.zeros((nrows, k), bool)
    for n, t in qw.tensors.items():
        if t.codebook != key:
            continue
        counts += np.bincount(t.indices.ravel(), minlength=k)
        rows = _book_rows(t)[~fixed[n]]
        live[rows, t.indices[~fixed[n]]] = True
    with np.errstate(divide="ignore"):
        ell = code_lengths(counts, max(int(counts.sum()), 1))
    return np.where(live, ell[None, :], np.inf)
