"""Which weights `compress` quantizes, and what each one's error costs.

`quantized_names` picks the tensors; `estimate_hessian` estimates their Hessian diagonal (the
importances) from data or an Adam state; `estimate_importances` gives `compress` the importances
its options ask for, estimated or supplied.

Fallback: when `compress` chose the ``fisher`` Hessian itself (``HessianSource.fallback``) and the
model has no gradient graph (an op onnxruntime-training cannot differentiate and onnxhq cannot
rewrite, or no onnxruntime-training at all), it uses the forward-only ``activations`` Hessian
instead and logs one warning saying why. A gradient Hessian asked for by name fails instead.
The estimate (an `Estimate`) records the estimator that ran and the samples it drew, and the
report's settings say so (`settled`).

Samples: unless told (``samples`` / ``--samples``), the estimators draw as many as a fixed
budget of multiply-adds buys on the model (`onnxhq.hessian.cost`), at most 1000; one log line
gives the number and the cost per sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import hessian as hessian_mod
from .data import Dataset, load_data, sample_count
from .errors import ConfigError, DataError, ModelError
from .hessian.cost import default_samples, multiply_adds
from .model import initializer_map, load_model, quantizable_weights
from .options import HESSIAN_METHODS, SUPPLIED, CompressOptions, HessianSource, OptionError
from .options.vocabulary import DEFAULT_HESSIAN, FALLBACK_HESSIAN
from .outputs import OutputSpec, output_list, resolve_output
from .training.engine import GradientEngine
from .training.graph import INSTEAD
from .training.output_engine import OutputEngine
from .training.worker import TrainingUnavailable, training_available

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True, eq=False)
class Estimate(Mapping[str, np.ndarray]):
    """A Hessian estimate: the diagonals by weight name (read as a mapping), and the ``source``
    that made them: the estimator that ran (``activations`` after a fallback) and the samples it
    drew (at most the data's size for the estimators that draw no sample twice), so that
    ``HessianSource`` runs the same estimate again. ``distinct``: the data's samples it read."""

    diagonals: Mapping[str, np.ndarray]
    source: HessianSource
    distinct: int | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.diagonals[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.diagonals)

    def __len__(self) -> int:
        return len(self.diagonals)


def settled(
    options: CompressOptions, importances: Mapping[str, np.ndarray] | None
) -> CompressOptions:
    """``options`` with the Hessian that made ``importances`` where they were estimated (an
    `Estimate`): the report's settings then name the estimator that ran and its samples."""
    if isinstance(importances, Estimate):
        return replace(options, hessian=importances.source)
    return options


def estimate_importances(
    proto: onnx.ModelProto,
    data: str | os.PathLike | Dataset | None,
    options: CompressOptions,
    progress: StageProgress | None = None,
) -> Mapping[str, np.ndarray] | None:
    """The importances `compress` weighs errors by: name -> float32 array shaped like the weight,
    for every quantized tensor (an `Estimate` when estimated); None for an unweighted run."""
    if not options.weighted:
        return None
    names = weight_names(proto, options)
    source = options.hessian
    assert source is not None
    if source.method != SUPPLIED:
        return estimate_hessian(
            proto,
            data,
            method=source.method,
            params=names,
            samples=None if source.by_cost else source.samples,
            batch_size=source.batch_size,
            seed=options.seed,
            adam_state=source.state,
            output=options.output,
            progress=progress,
            fallback=source.fallback,
        )
    arrays = source.arrays
    assert arrays is not None  # HessianSource checked it
    if not isinstance(arrays, Mapping):  # an .npz file: checked against the model's tensors
        arrays = hessian_mod.load_hessian(arrays, proto)
    for n in names:
        if n not in arrays:
            raise DataError(f"the supplied Hessian has no entry for weight {n!r}")
        if np.shape(arrays[n]) != initializer_shape(proto, n):
            raise DataError(
                f"the supplied Hessian of {n!r} has shape {np.shape(arrays[n])}, "
                f"the weight {initializer_shape(proto, n)}"
            )
    return {n: np.asarray(arrays[n], np.float32) for n in names}


def estimate_hessian(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    data: str | os.PathLike | Dataset | None,
    *,
    method: str = DEFAULT_HESSIAN,
    params: Sequence[str] | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    adam_state: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    include_biases: bool = False,
    extra_ops: tuple[str, ...] = (),
    output: str | OutputSpec | Sequence[str | OutputSpec] | None = None,
    progress: StageProgress | None = None,
    fallback: bool = False,
) -> Estimate:
    """The Hessian diagonal of ``model``'s weights, as `compress` estimates it.

    Parameters
    ----------
    model : path, bytes or ModelProto of the model.
    data : its inputs (labels too for ``empirical-fisher`` and ``hutchinson``); None for ``adam``.
        Of a data file only the samples the estimator draws are read (`onnxhq.hessian.Draws`).
    method : an estimator of `onnxhq.hessian.METHODS` other than ``none``.
    params : initializer names; default the tensors `compress` quantizes (`quantized_names`).
    samples, batch_size, seed : the draws (None: as many samples as `onnxhq.hessian.cost`
        gives the model, at most 1000; the estimator's batch size); estimators that draw no
        samples (``adam``) take neither.
    adam_state : the ``.npz`` (or mapping) of Adam's second moments, for ``method="adam"`` only.
    output : ``NAME[:KIND]`` of the output the loss reads (`onnxhq.outputs.resolve_output`), or
        a list of them: ``fisher`` sums their Fishers, ``activations`` watches them all.
    progress : called with ``("hessian", done, total)``.
    fallback : with ``method="fisher"``, use ``activations`` (one warning logged) when the model
        has no gradient graph, instead of raising.

    Returns
    -------
    `Estimate`: name -> float32 array shaped like the weight, finite and positive, and the
    estimator and samples that made it. With the same ``samples`` and ``seed``,
    ``compress(hessian=estimate_hessian(...))`` equals ``compress(hessian=method)``.
    """
    if method == "none":
        raise OptionError(
            "the 'none' Hessian is no estimate (it means unweighted k-means); choose "
            "one of " + ", ".join(m for m in HESSIAN_METHODS if m != "none"),
            "hessian",
        )
    if method not in HESSIAN_METHODS:  # "supplied" is no estimator either
        raise OptionError(
            f"unknown Hessian method {method!r}; choose one of {', '.join(HESSIAN_METHODS)}",
            "hessian",
        )
    source = HessianSource(method, samples, batch_size, state=adam_state)
    outputs = output_list(output)
    CompressOptions(
        hessian=source,
        include_biases=include_biases,
        extra_ops=extra_ops,
        output=None if outputs[0] is None else str(outputs[0]),
        seed=seed,
    )  # checks them all before the model is read
    if len(outputs) > 1 and method not in ("fisher", FALLBACK_HESSIAN):
        raise OptionError(
            f"the {method!r} Hessian reads one output, and {len(outputs)} were named; name one, "
            "or use 'fisher' or 'activations', which sum several",
            "output",
            "hessian",
        )
    if source.needs_data and data is None:
        raise OptionError(f"the {method!r} Hessian needs data: pass data with model inputs", "data")
    proto = load_model(model)
    names = (
        list(params)
        if params is not None
        else quantized_names(proto, include_biases=include_biases, extra_ops=tuple(extra_ops))
    )
    if not names:
        raise ConfigError(
            "the model has no quantizable weights (float initializers of Conv, "
            "ConvTranspose, Gemm, MatMul, Gather), so there is no Hessian to estimate"
        )
    samples = source.samples
    if source.needs_data and data is not None and source.by_cost:
        samples = _samples_by_cost(proto, names, data, source)
    dataset = data if isinstance(data, Dataset) else None
    if data is not None and not isinstance(data, Dataset) and source.needs_data:
        assert samples is not None
        dataset = _drawn(data, proto, samples, seed)  # only the samples the estimator draws
    engine: GradientEngine | list[OutputEngine] | None = None
    if method in ("empirical-fisher", "hutchinson") and dataset is not None:
        named = None if output is None else str(output)
        engine = GradientEngine(proto, params=names, output=named)
    elif method == "fisher" and dataset is not None:
        engine = _fisher_engine(proto, names, dataset, output, fallback=fallback)
        method = method if engine is not None else FALLBACK_HESSIAN
    report = None if progress is None else (lambda done, total: progress("hessian", done, total))
    draws = {} if samples is None else {"samples": samples}
    diag = hessian_mod.estimate(
        method,
        engine,
        dataset,
        params=names,
        batch_size=batch_size,
        seed=seed,
        progress=report,
        adam_state=adam_state,
        model=proto,
        output=output,
        **draws,
    )
    assert diag is not None  # only "none" gives None, refused above
    if dataset is None or samples is None:
        return Estimate(diag, HessianSource(method, state=adam_state))
    distinct = min(samples, dataset.source_size)
    if method in ("activations", "empirical-fisher"):  # they draw no sample twice
        samples = distinct
    return Estimate(diag, HessianSource(method, samples, batch_size), distinct)


def _samples_by_cost(
    proto: onnx.ModelProto,
    names: list[str],
    data: str | os.PathLike | Dataset,
    source: HessianSource,
) -> int:
    """The samples a default estimate draws (`onnxhq.hessian.cost`, at most ``source.samples``),
    from the multiply-adds of one forward pass on the data's first sample; logged."""
    first = data.head(1) if isinstance(data, Dataset) else load_data(data, proto, rows=[0])
    most = source.samples or hessian_mod.DEFAULT_SAMPLES
    try:
        cost = multiply_adds(proto, names, first.inputs)
    except ModelError as exc:  # weights the forward pass cannot feed as inputs: the cap
        log.info(
            "the %r Hessian draws %d samples (cost not measured: %s)", source.method, most, exc
        )
        return most
    samples = min(most, default_samples(cost))
    log.info(
        "the %r Hessian draws %d samples (%.3g multiply-adds each; --samples sets the number)",
        source.method,
        samples,
        cost,
    )
    return samples


def _drawn(path: str | os.PathLike, proto: onnx.ModelProto, samples: int, seed: int) -> Dataset:
    """The samples of the data file ``path`` that the estimator draws, and no others (N from
    the file's headers, the draws from ``samples`` and ``seed``: `onnxhq.hessian.Draws.rows`)."""
    n = sample_count(path, proto)
    return load_data(path, proto, rows=hessian_mod.Draws(samples, seed=seed).rows(n))


def _fisher_engine(
    proto: onnx.ModelProto,
    names: list[str],
    data: Dataset,
    output: str | OutputSpec | Sequence[str | OutputSpec] | None,
    *,
    fallback: bool,
) -> list[OutputEngine] | None:
    """The Fisher's engine (a list of one, one gradient session for every output named); None
    (after one warning) when ``fallback`` and no gradient graph."""
    outputs = output_list(output)
    for o in outputs:
        resolve_output(proto, o)  # a wrong output name is an error, never a fallback
    if fallback and not training_available():
        log.warning(
            "the 'fisher' Hessian needs onnxruntime-training, which is not installed ('onnxhq "
            "setup-training' installs it); using the 'activations' Hessian (forward passes only)"
        )
        return None
    try:
        shapes = hessian_mod.input_shapes(data)
        return hessian_mod.output_engines(proto, names, outputs, input_shapes=shapes)
    except (ModelError, TrainingUnavailable) as exc:
        if not fallback:
            raise
        reason = str(exc).removesuffix(f"; {INSTEAD}")
        log.warning(
            "the 'fisher' Hessian cannot run on this model (%s); using the 'activations' Hessian "
            "(forward passes only)",
            reason,
        )
        return None


def quantized_names(
    model: onnx.ModelProto, *, include_biases: bool = False, extra_ops: tuple[str, ...] = ()
) -> list[str]:
    """Initializers `compress` quantizes: the weights of `quantizable_weights`, then their biases
    if asked."""
    infos = quantizable_weights(model, extra_ops=extra_ops, min_size=2)
    return [w.name for w in infos] + (_biases(model, infos) if include_biases else [])


def initializer_shape(proto: onnx.ModelProto, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in initializer_map(proto)[name].dims)


def weight_names(proto: onnx.ModelProto, options: CompressOptions) -> list[str]:
    """`quantized_names` under ``options``; ConfigError when there are none."""
    names = quantized_names(
        proto, include_biases=options.include_biases, extra_ops=options.extra_ops
    )
    if not names:
        raise ConfigError(
            "the model has no quantizable weights (float initializers of Conv, "
            "ConvTranspose, Gemm, MatMul, Gather); add op types with extra_ops"
        )
    return names


# TODO(H4): `_biases` reads the graph; it belongs in model.py (e.g. `bias_names(model, weights)`).
def _biases(proto: onnx.ModelProto, infos) -> list[str]:
    """Float initializers feeding the bias input (position 2) of the nodes that use the weights."""
    inits = initializer_map(proto)
    weights = {w.name for w in infos}
    out: list[str] = []
    for node in proto.graph.node:
        bias = node.input[2] if len(node.input) > 2 and node.input[1] in weights else None
        if bias in inits and bias not in out and bias not in weights:
            out.append(bias)
    return out
