"""Gauss-Newton diagonals of any float output (regression, embeddings) by random projections.

The output ``y`` of such a model is not a class distribution, so the cross-entropy view does not
apply. The projection view (`onnxhq.training.graph.build_projection_model`) feeds ``r`` shaped
like ``y`` and differentiates ``sum(r * y)``: its gradient is ``J^T r`` (``J`` the Jacobian of
``y`` for the parameters). With Rademacher ``r``, ``E[(J^T r)^2] = diag(J^T J)``: the Gauss-Newton
diagonal of the squared error ``1/2 ||y(w) - y(w0)||^2`` at ``w0``, which is also its exact
Hessian there because the residual is zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..data import Dataset
from .common import DEFAULT_BATCH, Diag, Draws, Progress, finalize, squares

if TYPE_CHECKING:
    from ..training.engine import ProjectionEngine


def gauss_newton(
    engine: ProjectionEngine,
    data: Dataset,
    *,
    samples: int = 1000,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: Progress | None = None,
) -> Diag:
    """Gauss-Newton diagonal ``E_x diag(J^T J)`` of the projected output, summed over its entries.

    With Rademacher ``r`` drawn independently for every output entry of the batch,
    ``E[(J^T r)^2] = sum over the batch of diag(J_x^T J_x)``, so one projected gradient per batch
    estimates the whole batch without bias, as in `onnxhq.hessian.fisher`.
    """
    draws = Draws(samples, batch_size, seed)

    def step(batch: Dataset, rng: np.random.Generator) -> Diag:
        shape, dtype = engine.output_shape(batch.inputs)
        r = (rng.integers(0, 2, size=shape) * 2 - 1).astype(dtype)
        grads = engine.projected_gradients(batch.inputs, r)
        return squares(grads, "projected gradient")

    return finalize(draws.mean(data, step, progress=progress, method="gauss-newton"))
