"""Block grids: a weight's rows cut into blocks along their last axis, each block on its own
uniform grid of ``2**bits`` levels (a scale and an integer zero point), as onnxruntime's
``MatMulNBits`` and ``GatherBlockQuantized`` store weights.

A weight is handled as its *view* ``(R, K)``: rows are what the kernel keeps apart (the output
columns of a MatMul weight ``(K, N)``, i.e. ``w.T``; the rows of an embedding table), blocks run
along ``K``. The value of level ``q`` in block ``b`` of row ``r`` is
``(q - zero[r, b]) * scale[r, b]`` in float32.

`fit_block_grid` chooses each block's range by a clip search: the block's ``[min, max]`` shrunk
by factors of `SHRINK` (1 = the plain min-max grid, always a candidate), both ends together,
then each end alone, keeping what lowers the (importance-weighted) squared error after rounding
to nearest. `gptq_onto_grid` then rounds onto that fixed grid one input column at a time with the
layer-wise Hessian (`onnxhq.layerwise`, GPTQ with static groups), so the columns not yet rounded
cancel the error on the layer's outputs. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import ConfigError, DataError
from .layerwise import DAMP, column_order, gptq_columns, inverse_cholesky
from .options.vocabulary import LOWBIT_BITS, LOWBIT_BLOCKS

#: Range factors the clip search tries at each end of a block (1.0: the block's own min/max).
SHRINK = tuple(np.round(np.linspace(1.0, 0.6, 9), 3))
BITS = LOWBIT_BITS
BLOCKS = LOWBIT_BLOCKS
#: Rows per chunk in the clip search (bounds its temporary memory to ~100 MB per 1,000 columns).
_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class BlockGrid:
    """A view ``(R, K)`` on block grids.

    Attributes
    ----------
    levels : uint8 (R, K), stored levels in ``[0, 2**bits)``.
    scales : float32 (R, blocks), the step of each block's grid.
    zeros : uint8 (R, blocks), the stored level of 0 in each block.
    bits, block : bits per level, elements of K per block (the last block may be shorter).
    """

    levels: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.levels.shape[0]), int(self.levels.shape[1]))

    def values(self) -> np.ndarray:
        """float32 (R, K): ``(level - zero) * scale`` of every element."""
        k = self.levels.shape[1]
        zero = np.repeat(self.zeros, self.block, axis=1)[:, :k].astype(np.float32)
        scale = np.repeat(self.scales, self.block, axis=1)[:, :k]
        return (self.levels.astype(np.float32) - zero) * scale

    def nbytes(self) -> int:
        """Bytes of the stored form: levels (two per byte at 4 bits, each block padded to whole
        bytes), a float32 scale and a zero point (packed like the levels) per block."""
        rows, blocks = self.scales.shape
        per_block = self.block * self.bits // 8
        return rows * (blocks * (per_block + 4) + -(-blocks * self.bits // 8))


def check_layout(bits: int, block: int) -> None:
    """ConfigError unless ``bits`` is one of `BITS` and ``block`` one of `BLOCKS`."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits} is not one of {', '.join(map(str, BITS))}")
    if block not in BLOCKS:
        raise ConfigError(f"block size {block} is not one of {', '.join(map(str, BLOCKS))}")


def fit_block_grid(
    view: np.ndarray,
    *,
    bits: int,
    block: int,
    importance: np.ndarray | None = None,
    shrink: tuple[float, ...] = SHRINK,
) -> BlockGrid:
    """Block grids for ``view`` (R, K), each block's range chosen by the clip search.

    Parameters
    ----------
    view : float (R, K), not changed.
    bits, block : see `BlockGrid` (`check_layout`).
    importance : (R, K) non-negative weights of the squared error (a Hessian diagonal), or None
        for plain squared error. A block whose importances are all 0 is fitted unweighted.
    shrink : factors of the block's min and max tried (see `_search`); ``(1.0,)`` gives the plain
        min-max grid.

    Returns
    -------
    The grid of least weighted error among the candidates, per block, levels by rounding to
    nearest.
    """
    check_layout(bits, block)
    w = np.asarray(view, dtype=np.float32)
    if w.ndim != 2 or not np.all(np.isfinite(w)):
        raise DataError(f"a block grid needs a finite 2-D view, got shape {w.shape}")
    if importance is not None and np.shape(importance) != w.shape:
        raise DataError(f"importance of shape {np.shape(importance)} for a view of {w.shape}")
    rows, k = w.shape
    blocks = -(-k // block)
    pad = blocks * block - k
    wp = np.pad(w, ((0, 0), (0, pad))).reshape(rows, blocks, block)
    hp = None if importance is None and not pad else np.ones((rows, blocks, block), np.float32)
    if importance is not None:
        h = np.pad(np.asarray(importance, np.float32), ((0, 0), (0, pad)))
        hp = h.reshape(rows, blocks, block)
        empty = hp.sum(axis=2, keepdims=True) <= 0
        hp = np.where(empty, 1.0, hp).astype(np.float32)
    if pad:  # padding repeats the block's first element: it moves neither end of the range
        wp[:, -1, block - pad :] = wp[:, -1, :1]
        if hp is not None:
            hp[:, -1, block - pad :] = 0.0
    scales = np.empty((rows, blocks), np.float32)
    zeros = np.empty((rows, blocks), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(1, blocks * block))
    for r0 in range(0, rows, step):
        part = slice(r0, r0 + step)
        scales[part], zeros[part] = _search(wp[part], None if hp is None else hp[part], bits,
                                            shrink)  # fmt: skip
    grid = BlockGrid(np.zeros((rows, k), np.uint8), scales, zeros, bits, block)
    return replace(grid, levels=round_to_grid(w, grid))


def _search(wp, hp, bits: int, shrink) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zeros) of blocks ``wp`` (r, b, n) by coordinate search over the shrink factors:
    both ends by the same factor, then the low end alone, then the high end alone (each step
    keeps a block's best so far, so the result is never worse than the min-max grid)."""
    top = (1 << bits) - 1
    lo0 = wp.min(axis=2).astype(np.float64)
    hi0 = wp.max(axis=2).astype(np.float64)
    best = np.full(lo0.shape, np.inf)
    a_best = np.ones(lo0.shape)
    b_best = np.ones(lo0.shape)
    for stage in range(3):
        a_now, b_now = a_best.copy(), b_best.copy()
        for f in shrink:
            a = f if stage < 2 else a_now
            b = f if stage != 1 else b_now
            scale, zero = _grid(lo0 * a, hi0 * b, top)
            s, z = scale[..., None], zero[..., None].astype(np.float32)
            err = np.square((np.clip(np.rint(wp / s) + z, 0, top) - z) * s - wp)
            cost = (err if hp is None else err * hp).sum(axis=2)
            better = cost < best
            best = np.where(better, cost, best)
            a_best = np.where(better, a, a_best)
            b_best = np.where(better, b, b_best)
    scale, zero = _grid(lo0 * a_best, hi0 * b_best, top)
    return scale, zero.astype(np.uint8)


def _grid(lo: np.ndarray, hi: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 scale and integer zero point of the grid spanning ``[min(lo, 0), max(hi, 0)]``
    with levels ``0..top`` (a block of zeros gets scale 1)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    span = hi - lo
    scale = np.where(span > 0, span / top, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, top)
    return scale, zero


def round_to_grid(view: np.ndarray, grid: BlockGrid) -> np.ndarray:
    """uint8 (R, K): the nearest level of each element of ``view`` on ``grid``."""
    w = np.asarray(view, dtype=np.float32)
    k = w.shape[1]
    zero = np.repeat(grid.zeros, grid.block, axis=1)[:, :k].astype(np.float32)
    scale = np.repeat(grid.scales, grid.block, axis=1)[:, :k]
    return np.clip(np.rint(w / scale) + zero, 0, (1 << grid.bits) - 1).astype(np.uint8)


def weighted_error(view: np.ndarray, grid: BlockGrid, importance: np.ndarray | None) -> float:
    """``sum(importance * (view - grid.values())**2)`` (plain squared error without importance)."""
    err = np.square(grid.values().astype(np.float64) - np.asarray(view, np.float64))
    return float(err.sum() if importance is None else (err * importance).sum())


def gptq_onto_grid(
    view: np.ndarray,
    grid: BlockGrid,
    hessian: np.ndarray,
    *,
    order: str = "descending",
    damp: float = DAMP,
) -> BlockGrid:
    """``grid`` with its levels chosen by GPTQ over the columns of ``view`` (R, K) against the
    layer-wise Hessian ``hessian`` (K, K) of the view's inputs; scales and zero points stay.

    Each column is rounded to the nearest level of its own block's grid after the earlier
    columns' errors were moved onto it (`onnxhq.layerwise.gptq_columns`); ``order`` is the
    columns' processing order (`onnxhq.layerwise.column_order`).
    """
    w = np.asarray(view, dtype=np.float64)
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise DataError(f"a layer Hessian of shape {hessian.shape} for a view of {w.shape}")
    perm = column_order(np.diagonal(hessian), order)
    u = inverse_cholesky(hessian[np.ix_(perm, perm)], damp)
    top = (1 << grid.bits) - 1
    owner = perm // grid.block
    scales = grid.scales.astype(np.float64)
    zeros = grid.zeros.astype(np.float64)

    def choose(c, w_c, _u_cc):
        s, z = scales[:, owner[c]], zeros[:, owner[c]]
        q = np.clip(np.rint(w_c / s) + z, 0, top)
        return q.astype(np.int64), (q - z) * s

    idx, _ = gptq_columns(w[:, perm], u, choose)
    levels = np.empty_like(grid.levels)
    levels[:, perm] = idx.astype(np.uint8)
    return replace(grid, levels=levels)
