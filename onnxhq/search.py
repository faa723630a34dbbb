"""A target instead of a rate: the smallest artifacts that keep a fidelity on the eval data.

`search_target` takes the importances (and layer statistics) estimated once and, for each
codebook scope (network, layer, channel groups of `GROUP_SIZE` where the opset allows; only the
scope given when it is not the default network), bisects an ordered ladder of rates
(`LADDER`: target bits per weight for uniform and ECSQ, bits per index for the k-means methods)
for the lowest that meets the target, assuming more bits never lose fidelity; a later scope
tries no rate above the best met so far (at equal rates the scopes differ by their codebooks).
Each point tried is a full compression (exact bytes) measured against the original's outputs;
the smallest meeting the target is returned with the whole search in its report: about
log2(len(LADDER)) + 1 compressions per scope, fewer for the later ones.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from . import naming
from .data import Dataset
from .errors import DataError
from .fidelity import measure
from .model import default_opset
from .options import CompressOptions, OptionError, Rate, Scope
from .options.target import ACCURACY_DROP, Target
from .report import SearchPoint
from .rewrite import MIN_OPSET

if TYPE_CHECKING:
    import onnx

    from .compensate import LayerHessian
    from .evaluate import Reference
    from .pipeline import Result

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]

#: The rates tried, lowest first: target bits per weight (uniform, ECSQ; finer where the ratio
#: moves most) or bits per index (k-means, hkmeans: k = 2**bits).
LADDER = {
    "target_bits": (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0),
    "bits": (1, 2, 3, 4, 5, 6, 7, 8),
}
#: Output channels per codebook row of the channel-group scope the search tries.
GROUP_SIZE = 16


def check_target(target: Target, reference: Reference, data: Dataset) -> None:
    """Refuse, before any quantization, a target the eval data cannot measure."""
    if target.metric == ACCURACY_DROP or target.metric == "accuracy":
        if not any(reference.accuracy(n) is not None for n in reference.outputs):
            raise OptionError(
                f"{target.label()} needs labels that fit a class-score output in the eval data; "
                "add 'labels' or give min_fidelity (e.g. agreement=0.99)",
                target.field,
            )
        return
    measured = _self_metrics(reference)
    if not any(target.metric in m for m in measured.values()):
        have = sorted({k for m in measured.values() for k in m})
        raise OptionError(
            f"{target.label()}: no output of the model measures {target.metric!r} (outputs "
            f"{', '.join(f'{n} ({reference.kinds[n].kind})' for n in measured)} measure "
            f"{', '.join(have)}); choose one of those",
            target.field,
        )


def search_target(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    proto: onnx.ModelProto,
    options: CompressOptions,
    statistics: tuple[Mapping[str, np.ndarray] | None, Mapping[str, LayerHessian] | None],
    data: Dataset,
    reference: Reference,
    progress: StageProgress | None = None,
) -> Result:
    """The smallest compression of ``proto`` meeting ``options.target`` on ``data`` (see the
    module doc) with the `onnxhq.pipeline.estimate_statistics` shared by the points, its report
    holding the fidelity, the accuracies and every point tried.

    Raises `DataError` naming the best value reached when no point meets the target.
    """
    from .pipeline import compress_point

    target = options.target
    assert target is not None
    name = "bits" if options.method in ("kmeans", "hkmeans") else "target_bits"
    ladder = LADDER[name]
    points: list[SearchPoint] = []
    best: Result | None = None
    scopes = _scopes(proto, options.scope)
    most = len(scopes) * math.ceil(math.log2(len(ladder) + 1))
    top = len(ladder) - 1  # a later scope tries no rate above the best one met so far
    for scope in scopes:
        lo, hi = 0, top
        while lo <= hi:
            mid = (lo + hi) // 2
            point = replace(options, scope=scope, target=None, rate=Rate.named(name, ladder[mid]))
            assert point.rate is not None
            label = f"{_scope_label(scope)} {point.rate.label()}"
            result = compress_point(
                model, proto, point, statistics, reference, data, label=label, progress=progress
            )
            value = _metric(target, result.report)
            r = result.report
            ok = target.reached(value)
            points.append(
                SearchPoint(
                    scope.kind,
                    scope.group_size,
                    point.rate.label(),
                    r.bits_per_weight,
                    r.compressed_bytes,
                    r.compression_ratio,
                    value,
                    ok,
                )
            )
            log.info(
                "search %s: %.2fx, %s %.4g (%s)",
                label,
                r.compression_ratio,
                target.metric,
                value,
                "met" if ok else "not met",
            )
            if progress is not None:
                progress("search", len(points), max(most, len(points)))
            if ok:
                hi = mid - 1
                if best is None or r.compressed_bytes < best.report.compressed_bytes:
                    best, top = result, mid
            else:
                lo = mid + 1
    if best is None:
        raise DataError(_unreachable(target, points))
    best.report = best.report.with_search(_target_text(target), points)
    return best


def _scopes(proto: onnx.ModelProto, given: Scope) -> list[Scope]:
    """The scopes to search: ``given`` alone when it is not the default (network), else all."""
    if given.kind != "network":
        return [given]
    scopes = [Scope("network"), Scope("layer")]
    need = MIN_OPSET[naming.GROUPED_OP]
    if default_opset(proto) >= need:
        scopes.append(Scope("channel-group", GROUP_SIZE))
    else:
        log.info("the search skips channel groups: the model's opset is below %d", need)
    return scopes


def _scope_label(scope: Scope) -> str:
    return scope.kind if scope.group_size is None else f"{scope.kind}/{scope.group_size}"


def _metric(target: Target, report) -> float:
    """The target's metric of a measured report: the worst output's value (a drop in points)."""
    if target.metric == ACCURACY_DROP:
        assert report.accuracy_original is not None and report.accuracy_compressed is not None
        return 100.0 * (report.accuracy_original - report.accuracy_compressed)
    values = [m[target.metric] for m in report.fidelity.values() if target.metric in m]
    return max(values) if target.upper else min(values)


def _self_metrics(reference: Reference) -> dict[str, dict[str, float]]:
    """The metrics each output measures (the original against itself)."""
    out = reference.outputs
    return {n: measure(k.kind, out[n], out[n], axis=k.axis) for n, k in reference.kinds.items()}


def _target_text(target: Target) -> str:
    if target.metric == ACCURACY_DROP:
        return f"max_drop={target.value:g}"
    return f"{target.metric}={target.value:g}"


def _unreachable(target: Target, points: list[SearchPoint]) -> str:
    """One line: the target, the best reached and where, and what to try."""
    if target.upper:
        top = min(points, key=lambda p: p.metric if not math.isnan(p.metric) else math.inf)
    else:
        top = max(points, key=lambda p: p.metric if not math.isnan(p.metric) else -math.inf)
    what = "accuracy drop" if target.metric == ACCURACY_DROP else target.metric
    where = top.scope if top.group_size is None else f"{top.scope} {top.group_size}"
    bound = f"{what} {'<=' if target.upper else '>='} {target.value:g}"
    return (
        f"no compression tried reaches {bound}: the best {what} reached was "
        f"{top.metric:.4g} ({where} scope, {top.rate}, {top.compression_ratio:.2f}x) in "
        f"{len(points)} tries; relax the target or give a rate"
    )
