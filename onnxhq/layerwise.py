"""The layer-wise Hessian ``H = X X^T / n`` of one weight and the column kernels that use it.

A layer ``y = W x`` is seen as a matrix (rows: outputs, columns: input features), per Conv
group; ``tr((W - Q) H (W - Q)^T)`` is its output error ``||X (W - Q)^T||^2 / n``. OBQ, GPTQ
(`onnxhq.compensate`) and SparseGPT (`onnxhq.prune`, criterion ``obs``) all walk the columns
once, through the upper Cholesky factor ``U`` of ``H^-1``: fixing column ``c`` to ``q`` costs
``((w_c - q) / U_cc)^2`` per row, and the columns after it take ``-(w_c - q) / U_cc * U[c, c:]``,
which cancels the error as far as they can. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError

ORDERS = ("descending", "natural")
#: Relative dampening of ``H``: ``damp * mean(diag H)`` is added to its diagonal (GPTQ's 1 %).
DAMP = 0.01
#: Columns per lazy batch update.
BLOCK = 128
#: Columns per pruning mask choice (SparseGPT's adaptive mask selection).
MASK_BLOCK = 128


@dataclass(frozen=True)
class LayerHessian:
    """``H = X X^T / n`` of one weight's inputs, as a block-diagonal of the weight's matrix view.

    Attributes
    ----------
    transpose : the matrix view ``(outputs, inputs)`` is ``w.T`` (a ``(K, N)`` weight ``x @ w``)
        rather than ``w`` reshaped to ``(outputs, -1)`` (Conv, ``(M, K)`` weights).
    groups : G, Conv groups: the view is ``(G, outputs / G, d)``, one ``H`` per group.
    blocks : float64 arrays ``(G, b, b)``, contiguous along the ``d`` inputs (one block of all
        ``d`` unless ``d`` exceeded the cap they were gathered with).
    samples : positions averaged (samples times output positions).
    mean : (G, d) float64, the mean input ``E[x]`` of each group (what bias correction needs), or
        None where it was not gathered.
    """

    transpose: bool
    groups: int
    blocks: tuple[np.ndarray, ...]
    samples: int
    mean: np.ndarray | None = None

    @property
    def width(self) -> int:
        return sum(b.shape[-1] for b in self.blocks)

    def diagonal(self) -> np.ndarray:
        """(G, d) float64: ``H_cc`` of each group."""
        return np.concatenate([np.diagonal(b, axis1=1, axis2=2) for b in self.blocks], axis=1)


def matrix_view(w: np.ndarray, lh: LayerHessian) -> np.ndarray:
    """(G, outputs / G, d) view of ``w`` (a copy when transposed); see `LayerHessian`."""
    m = w.T if lh.transpose else w.reshape(w.shape[0], -1)
    if m.ndim != 2 or m.shape[0] % lh.groups or m.shape[1] != lh.width:
        raise DataError(f"a weight of shape {w.shape} does not match its Hessian "
                        f"({lh.groups} groups of {lh.width} inputs)")  # fmt: skip
    return m.reshape(lh.groups, m.shape[0] // lh.groups, m.shape[1])


def from_view(m: np.ndarray, shape: tuple[int, ...], lh: LayerHessian) -> np.ndarray:
    """Inverse of `matrix_view`."""
    flat = m.reshape(-1, m.shape[-1])
    return np.ascontiguousarray(flat.T) if lh.transpose else flat.reshape(shape)


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) I)^-1``; dead inputs get ``H_cc = 1``.

    ``h``: (..., d, d) symmetric positive semi-definite, one or a stack (Conv groups: each
    matrix on its own). ``U`` is the inverse of the upper factor ``V`` of ``H = V V^T`` (the
    Cholesky factor of ``H`` with rows and columns reversed), so no ``H^-1`` is formed: one
    Cholesky and one triangular inverse. Raises DataError if not positive definite after
    dampening.
    """
    h = np.array(h, dtype=np.float64)
    d = h.shape[-1]
    diag = np.diagonal(h, axis1=-2, axis2=-1).copy()
    dead = diag <= 0
    alive = np.count_nonzero(~dead, axis=-1)
    mean = np.where(
        alive > 0, np.sum(np.where(dead, 0.0, diag), axis=-1) / np.maximum(alive, 1), 1.0
    )
    at = np.arange(d)
    h[..., at, at] = np.where(dead, 1.0, diag) + damp * mean[..., None]
    try:
        lower = np.linalg.cholesky(h[..., ::-1, ::-1])
    except np.linalg.LinAlgError:
        raise DataError(f"a layer Hessian of {d} inputs is not positive definite with "
                        f"damp={damp:g}; raise the dampening") from None  # fmt: skip
    return _upper_inverse(np.ascontiguousarray(lower[..., ::-1, ::-1]))


def _upper_inverse(v: np.ndarray) -> np.ndarray:
    """Inverse of upper triangular ``v`` (..., d, d), by halves (matrix products, ``d^3 / 3``)."""
    d = v.shape[-1]
    if d <= 64:
        return np.triu(np.linalg.inv(v))
    m = d // 2
    top, bottom = _upper_inverse(v[..., :m, :m]), _upper_inverse(v[..., m:, m:])
    out = np.zeros_like(v)
    out[..., :m, :m], out[..., m:, m:] = top, bottom
    out[..., :m, m:] = -(top @ v[..., :m, m:]) @ bottom
    return out


def column_order(diag: np.ndarray, order: str) -> np.ndarray:
    """Processing order of the columns (along the last axis of ``diag``, ``H_cc``; one order per
    row of a stack): by decreasing ``H_cc`` (ties by position), or natural."""
    if order == "natural":
        return np.broadcast_to(np.arange(diag.shape[-1]), diag.shape).copy()
    return np.argsort(-diag, axis=-1, kind="stable")


def gptq_columns(w, u, choose, *, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ over the columns of ``w`` (..., R, d), already in processing order.

    ``u``: (..., d, d) upper Cholesky factor of the (dampened) ``H^-1`` in that order (a stack:
    Conv groups, each with its own ``H`` and order, walked together). ``choose(c, w_c, u_cc)``
    gets column ``c`` (..., R) and ``U_cc`` (a scalar, or (...,) for a stack) and returns
    ``(indices, values)`` shaped like ``w_c``. Each lazy batch of ``block`` columns is walked
    one column at a time inside the batch, then moved onto the columns after it with one matrix
    product. Returns the indices and values, shaped like ``w``. ``w`` is not changed.
    """
    w = np.array(w, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    d = w.shape[-1]
    q, idx = np.empty_like(w), np.empty(w.shape, np.int64)
    diag = np.diagonal(u, axis1=-2, axis2=-1)[..., None]  # (..., d, 1)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        err = np.empty((*w.shape[:-1], i2 - i1))
        for j in range(i2 - i1):
            c = i1 + j
            idx[..., c], q[..., c] = choose(c, w[..., c], u[..., c, c])
            e = (w[..., c] - q[..., c]) / diag[..., c, :]
            w[..., c:i2] -= e[..., None] * u[..., None, c, c:i2]
            err[..., j] = e
        w[..., i2:] -= err @ u[..., i1:i2, i2:]
    return idx, q


def obs_prune_columns(
    w: np.ndarray, u: np.ndarray, fraction: float, forced: np.ndarray, *, block: int = MASK_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on ``w`` (R, d): prune ``fraction`` of each lazy block, update the rest.

    In each block of ``block`` columns the entries of smallest OBS saliency ``w^2 / U_cc^2``
    (``w`` as updated so far) are pruned, ``round(fraction * R * width)`` of them, or more where
    ``forced`` (R, d) bool marks entries that must stay pruned; the columns are then walked as
    in `gptq_columns`, a pruned entry's error moved onto the entries after it. Returns the new
    weights (pruned entries exactly 0) and the keep mask. ``w`` is not changed.
    """
    w = np.array(w, dtype=np.float64)
    rows, d = w.shape
    keep = np.ones((rows, d), bool)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        score = np.square(w[:, i1:i2]) / np.square(np.diagonal(u)[i1:i2])
        score[forced[:, i1:i2]] = -np.inf
        count = max(round(fraction * score.size), int(np.count_nonzero(forced[:, i1:i2])))
        cut = np.argsort(score, axis=None, kind="stable")[:count]
        part = np.ones(score.size, bool)
        part[cut] = False
        keep[:, i1:i2] = part.reshape(score.shape)
        err = np.empty((rows, i2 - i1))
        for j in range(i2 - i1):
            c = i1 + j
            e = np.where(keep[:, c], 0.0, w[:, c]) / u[c, c]
            w[:, c:i2] -= np.outer(e, u[c, c:i2])
            w[~keep[:, c], c] = 0.0
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep
