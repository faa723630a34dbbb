"""Diagonal Hessian estimates: the importance ``h_ii`` of each weight's quantization error.

Every estimator returns float32 arrays keyed by parameter name, shaped like the parameters, finite
and nonnegative. Their absolute scale does not matter to the quantizers (only ratios do).

``fisher`` (default, label-free)
    ``E_x E_{y~p(y|x)} g(x, y)^2`` with targets drawn from the model itself: the Fisher diagonal
    of the output's kind (`onnxhq.outputs`: class scores of any rank, Bernoulli maps, real
    values), see `output_fisher`; of several outputs, the sum of their Fishers from one engine.
    Given a `GradientEngine` (rank-2 class scores), `fisher`.
``empirical-fisher``
    ``E_x g(x, y_true)^2`` from per-sample gradients with the data's true labels.
``hutchinson``
    ``E_z[z * (H z)]`` for the Hessian ``H`` of the mean true-label cross-entropy, Rademacher
    ``z``, ``H z`` by central differences of two gradients. Needs labels.
``gauss-newton``
    ``diag(J^T J)`` of any float output (regression, embeddings) via random output projections;
    see `onnxhq.hessian.gauss_newton`.
``activations`` (no gradients, no labels)
    Per weight, the second moment of the input it multiplies (the diagonal of the layer-wise
    Hessian ``2 X X^T``), each layer scaled by its measured effect on the outputs; forward passes
    of plain onnxruntime only, any opset. See `onnxhq.hessian.activations`.
``adam``
    ``sqrt(v_hat)`` of a supplied Adam second moment, the paper's free alternative to the Hessian.
``none``
    No weighting (plain k-means): `estimate` returns None.

Draws (`common.Draws`): ``samples`` inputs are drawn from the data as whole random permutations
(so ``samples`` may exceed the data size: each pass brings fresh labels or probes), then cut into
batches. ``seed`` fixes both the inputs drawn and the random labels/probes, independently of
``batch_size``. ``activations`` and ``empirical-fisher``, deterministic given the inputs, draw at
most the data size. The samples drawn depend only on ``samples``, ``seed`` and the data size, so
`onnxhq.estimate_hessian` reads only those rows of a data file (`Draws.rows`).

Floor: `finalize` raises entries that are exactly zero (or tiny) to ``1e-8`` times the largest
entry of all tensors, so that no weight is free to move at no cost.

Modules: `common` (the draws and their averaging loop, checks, floor), `estimators` (fisher,
empirical-fisher, hutchinson, adam), `output_fisher` (the Fisher of each output kind),
`gauss_newton`, `activations` (with `uses`: which input each weight multiplies), `cost` (how
many samples are drawn unless told: a budget of multiply-adds), `files` (`save_hessian` /
`load_hessian` of ``.npz`` diagonals keyed by weight name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..data import Dataset
from ..errors import ConfigError, DataError
from ..options.vocabulary import BATCHED_HESSIANS
from ..options.vocabulary import HESSIAN_METHODS as METHODS
from ..outputs import OutputSpec, output_list, resolve_output
from ..training.engine import GradientEngine, ProjectionEngine
from ..training.graph import parameter_shapes
from ..training.output_engine import OutputEngine
from .activations import activation_hessian
from .common import (
    DEFAULT_BATCH,
    DEFAULT_REL_STEP,
    DEFAULT_SAMPLES,
    Diag,
    Draws,
    Progress,
    finalize,
)
from .estimators import adam, empirical_fisher, fisher, hutchinson
from .files import hessian_bytes, load_hessian, read_second_moment, save_hessian
from .gauss_newton import gauss_newton
from .output_fisher import output_fisher

if TYPE_CHECKING:
    import onnx

__all__ = [
    "DEFAULT_SAMPLES",
    "METHODS",
    "NEEDS_LABELS",
    "Draws",
    "activation_hessian",
    "adam",
    "empirical_fisher",
    "estimate",
    "finalize",
    "fisher",
    "gauss_newton",
    "hessian_bytes",
    "hutchinson",
    "input_shapes",
    "load_hessian",
    "output_fisher",
    "read_second_moment",
    "save_hessian",
]

#: Methods that need the data's true labels.
NEEDS_LABELS = ("empirical-fisher", "hutchinson")


def estimate(
    method: str,
    engine: GradientEngine | OutputEngine | Sequence[OutputEngine] | None,
    data: Dataset | None,
    *,
    params: list[str],
    samples: int = DEFAULT_SAMPLES,
    batch_size: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    rel_step: float | None = None,
    adam_state: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    model: onnx.ModelProto | None = None,
    output: str | OutputSpec | Sequence[str | OutputSpec] | None = None,
) -> Diag | None:
    """Dispatch to the estimator called ``method``; ``none`` returns None (plain, unweighted).

    ``engine``: a `GradientEngine` serves fisher (rank-2 class scores), empirical-fisher and
    hutchinson; an `OutputEngine` (or None, then one is built on ``model`` and ``output``, a
    ``NAME[:KIND]`` or a list of them: one gradient session for all) serves fisher of any
    output kind, summing its outputs' Fishers, one backward per output (`output_fisher`);
    ``activations`` watches every output named.
    ``gauss-newton`` builds its own projection view of ``model`` (or of ``engine.model``) and
    ``output``; ``activations`` runs ``model``
    forward (``output``: the one its calibration watches; default every float output); ``adam``
    needs only ``adam_state`` and the parameters' shapes (from ``engine`` or ``model``). Options
    a method does not use must be left at None.

    Returns
    -------
    name -> float32 array shaped like the parameter, for each of ``params``; or None.
    """
    if method == "none":
        return None
    _check_options(method, batch_size=batch_size, rel_step=rel_step, adam_state=adam_state)
    if method == "adam":
        assert adam_state is not None  # _check_options
        return adam(adam_state, _shapes(engine, model, params))
    if data is None:
        raise ConfigError(f"the {method!r} Hessian needs data: pass --data with model inputs")
    if method in NEEDS_LABELS and data.labels is None:
        raise DataError(
            f"the {method!r} Hessian needs the true labels: add an integer 'labels' array to the "
            "data file, or use 'fisher', which samples labels from the model"
        )
    batch = DEFAULT_BATCH if batch_size is None else batch_size
    outputs = output_list(output)
    if len(outputs) > 1 and method not in ("fisher", "activations"):
        raise ConfigError(
            f"the {method!r} Hessian reads one output, and {len(outputs)} were named; name one, "
            "or use 'fisher' or 'activations', which sum several"
        )
    source = model if model is not None else getattr(engine, "model", None)
    by_model = method in ("gauss-newton", "activations") or (method == "fisher" and engine is None)
    if by_model and source is None:
        raise ConfigError(f"the {method!r} Hessian needs the model")
    if method == "gauss-newton":
        assert source is not None
        named = output if output is not None else getattr(engine, "output", None)
        view = ProjectionEngine(
            source, params=list(params), output=None if named is None else str(named)
        )
        diag = gauss_newton(
            view, data, samples=samples, batch_size=batch, seed=seed, progress=progress
        )
    elif method == "activations":
        assert source is not None
        watched = None if output is None else [resolve_output(source, o).name for o in outputs]
        diag = activation_hessian(
            source,
            data,
            params,
            samples=samples,
            batch_size=batch,
            seed=seed,
            progress=progress,
            outputs=watched,
        )
    elif method == "fisher" and not isinstance(engine, GradientEngine):
        if engine is None:
            assert source is not None
            shapes = input_shapes(data)
            engine = output_engines(source, params, outputs, input_shapes=shapes)
        diag = output_fisher(
            engine, data, samples=samples, batch_size=batch, seed=seed, progress=progress
        )
    else:
        if engine is None:
            raise ConfigError(f"the {method!r} Hessian needs a gradient engine for the model")
        assert isinstance(engine, GradientEngine)
        missing = [p for p in params if p not in engine.values]
        if missing:
            raise ConfigError(
                f"the gradient engine does not differentiate {missing[0]!r}; build it with params="
            )
        if method == "fisher":
            diag = fisher(
                engine, data, samples=samples, batch_size=batch, seed=seed, progress=progress
            )
        elif method == "empirical-fisher":
            diag = empirical_fisher(engine, data, samples=samples, seed=seed, progress=progress)
        else:
            step = DEFAULT_REL_STEP if rel_step is None else rel_step
            diag = hutchinson(
                engine,
                data,
                samples=samples,
                batch_size=batch,
                seed=seed,
                rel_step=step,
                progress=progress,
            )
    return {p: diag[p] for p in params}


def output_engines(
    model: onnx.ModelProto,
    params: Sequence[str],
    outputs: Sequence[str | OutputSpec | None],
    *,
    input_shapes: Mapping[str, tuple[int | None, ...]] | None = None,
) -> list[OutputEngine]:
    """The engine of the Fisher of ``outputs`` (``NAME[:KIND]`` each): one gradient session for
    all, whose loss reads every output (a list of one engine; `output_fisher` also sums the
    Fishers of several). Of several outputs, a weight none depends on is a ModelError."""
    found = [resolve_output(model, o) for o in outputs]
    return [OutputEngine(model, list(params), output=found, input_shapes=input_shapes)]


def input_shapes(data: Dataset) -> dict[str, tuple[int | None, ...]]:
    """The dims a gradient view pins: each input's shape in ``data``, the batch axis left free."""
    return {name: (None, *np.shape(array)[1:]) for name, array in data.inputs.items()}


def _check_options(method: str, *, batch_size, rel_step, adam_state) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown Hessian method {method!r}; choose one of {', '.join(METHODS)}")
    if rel_step is not None and method != "hutchinson":
        raise ConfigError(f"rel_step applies to the 'hutchinson' Hessian only, not to {method!r}")
    if adam_state is not None and method != "adam":
        raise ConfigError(f"an Adam state applies to the 'adam' Hessian only, not to {method!r}")
    if adam_state is None and method == "adam":
        raise ConfigError(
            "the 'adam' Hessian needs an Adam second-moment state (.npz keyed by weight name)"
        )
    if batch_size is not None and method not in BATCHED_HESSIANS:
        raise ConfigError(
            f"batch_size does not apply to the {method!r} Hessian (it uses per-sample gradients "
            "or no data)"
        )


def _shapes(
    engine: GradientEngine | OutputEngine | Sequence[OutputEngine] | None,
    model: onnx.ModelProto | None,
    params: list[str],
) -> dict[str, tuple[int, ...]]:
    if isinstance(engine, Sequence):
        engine = engine[0] if engine else None
    if engine is not None and all(p in engine.values for p in params):
        return {p: engine.values[p].shape for p in params}
    if model is None:
        raise ConfigError(
            "the 'adam' Hessian needs the model (or a gradient engine) to check the state's shapes"
        )
    shapes = parameter_shapes(model)
    missing = [p for p in params if p not in shapes]
    if missing:
        raise ConfigError(f"the model has no float initializer {missing[0]!r}")
    return {p: shapes[p] for p in params}
