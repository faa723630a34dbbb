"""A target instead of a rate: the smallest artifacts that keep a fidelity on the eval data.

`search_target` takes the importances (and layer statistics) estimated once and, for each
codebook scope (network; for uniform quantization ``allocated``: a codebook per layer, the layers'
rates set by one Hessian-weighted slope, `onnxhq.quantize.allocate`; layer; channel groups of
`GROUP_SIZE` where the opset allows; only the scope given when it is not the default network),
bisects an ordered ladder of rates
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
import time
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
    "target_bits": tuple(
        float(b) for b in (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 6.5, 7, 8)
    ),
    "bits": (1, 2, 3, 4, 5, 6, 7, 8),
}
#: The compensated pass is tried when gathering the layer statistics and one compensated point
#: are estimated at most this many multiply-adds (`onnxhq.layer_inputs.compensation_cost`: the
#: OCR recognizer with 64 calibration lines 5.3e11, 35 s a compensated point on a loaded 2-core
#: CPU; the MiniLM encoder 3.3e11, 1-2 min); `--compensate` compensates every point.
COMPENSATE_BUDGET = 1e12
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
    target = options.target
    assert target is not None
    name = "bits" if options.method in ("kmeans", "hkmeans") else "target_bits"
    ladder = LADDER[name]
    scopes = _scopes(proto, options)
    run = _Run(model, proto, options, statistics, data, reference, target, progress)
    run.most = (len(scopes) + 2) * math.ceil(math.log2(len(ladder) + 1))
    top = len(ladder) - 1  # a later scope tries no rate above the best one met so far
    for scope in scopes:
        top = run.bisect(scope, ladder, name, top, compensate=options.compensate)
    if top > 0 and _compensation_pays(options, statistics):
        # error compensation at the chosen scope, at the rates below the chosen one (at the
        # scope that came closest, all rates, when none met the target), then at network scope
        # when another was chosen; each pass for at most as long as the plain points took
        run.budget = time.perf_counter() - run.start
        met = run.best is not None
        chosen = run.best_scope if met else _closest_scope(target, run.points)
        run.bisect(chosen, ladder, name, top - 1 if met else top, compensate=True)
        if chosen.kind != "network" and any(s.kind == "network" for s in scopes):
            # one network codebook, compensated, often beats the per-layer winner: it stores
            # one codebook (fewer bytes at the same rate), and compensation recovers what
            # sharing it loses; so up to the plain winner's rate
            run.bisect(Scope("network"), ladder, name, top, compensate=True)
    if run.best is None:
        raise DataError(_unreachable(target, run.points))
    run.best.report = run.best.report.with_search(_target_text(target), run.points)
    return run.best


def statistics_options(
    options: CompressOptions, proto: onnx.ModelProto, data: object
) -> CompressOptions:
    """The options `compress` estimates a search's statistics with: ``compensate`` on (each
    layer's input statistics gathered too) when the search will add a compensated pass, that is
    with a target, data, and an estimated cost within `COMPENSATE_BUDGET` (one log line if
    not)."""
    if options.target is None or data is None or options.compensate:
        return options
    from .data import sample_count
    from .importances import weight_names
    from .layer_inputs import SAMPLES, compensation_cost

    n = SAMPLES
    if isinstance(data, Dataset):
        n = len(data)
    elif isinstance(data, (str, os.PathLike, Mapping)):
        n = sample_count(data, proto)  # from the .npy headers
    cost = compensation_cost(proto, weight_names(proto, options), samples=min(n, SAMPLES))
    if cost > COMPENSATE_BUDGET:
        log.info("the search skips error compensation: an estimated %.2g multiply-adds, "
                 "above %.2g (--compensate compensates every point)", cost,
                 COMPENSATE_BUDGET)  # fmt: skip
        return options
    return replace(options, compensate=True)


def _compensation_pays(options: CompressOptions, statistics) -> bool:
    """Whether the search adds a compensated pass: it has the layer statistics
    (`statistics_options`) and its points are not compensated already."""
    return not options.compensate and statistics[1] is not None


#: Points a pass tries before its time budget can stop it (a bisection of the ladder takes 4-5).
PASS_POINTS = 4


class _Run:
    """One search's state: the points tried and the smallest result meeting the target."""

    def __init__(self, model, proto, options, statistics, data, reference, target, progress):
        self.model, self.proto, self.options = model, proto, options
        self.statistics, self.data, self.reference = statistics, data, reference
        self.target, self.progress = target, progress
        self.points: list[SearchPoint] = []
        self.best: Result | None = None
        self.best_scope = options.scope
        self.most = 0
        self.start = time.perf_counter()
        self.budget = math.inf  # seconds a pass may take from its start

    def bisect(self, scope: Scope, ladder, name: str, top: int, *, compensate: bool) -> int:
        """Bisect ``ladder[: top + 1]`` at ``scope`` for the lowest rate meeting the target;
        returns the index of the best rate met so far over the whole search (``top`` if none)."""
        from .pipeline import compress_point

        lo, hi = 0, top
        began, tried = time.perf_counter(), 0
        while lo <= hi:
            if tried >= PASS_POINTS and time.perf_counter() - began > self.budget:
                log.info("the search stops its %s pass: over its %.0f s", scope.kind, self.budget)
                break
            mid, tried = (lo + hi) // 2, tried + 1
            point = replace(self.options, scope=scope, target=None, compensate=compensate,
                            rate=Rate.named(name, ladder[mid]))  # fmt: skip
            assert point.rate is not None
            rate = point.rate.label() + (", compensated" if compensate else "")
            label = f"{_scope_label(scope)} {rate}"
            stats = self.statistics if compensate else (self.statistics[0], None)
            result = compress_point(self.model, self.proto, point, stats, self.reference,
                                    self.data, label=label, progress=self.progress)  # fmt: skip
            r = result.report
            value = _metric(self.target, r)
            ok = self.target.reached(value)
            self.points.append(
                SearchPoint(
                    scope.kind,
                    scope.group_size,
                    rate,
                    r.bits_per_weight,
                    r.compressed_bytes,
                    r.compression_ratio,
                    value,
                    ok,
                )
            )
            log.info("search %s: %.2fx, %s %.4g (%s)", label, r.compression_ratio,
                     self.target.metric, value, "met" if ok else "not met")  # fmt: skip
            if self.progress is not None:
                self.progress("search", len(self.points), max(self.most, len(self.points)))
            if ok:
                hi = mid - 1
                if self.best is None or r.compressed_bytes < self.best.report.compressed_bytes:
                    self.best, self.best_scope, top = result, scope, mid
            else:
                lo = mid + 1
        return top


def scope_opset(options: CompressOptions, proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` converted up (`onnx.version_converter`, one log line) to the opset the
    channel-group scope decodes with, when it imports an older one and that scope is asked for
    or a target search will try it; else ``proto`` itself. A failed conversion is an
    `OptionError` for a scope asked for, and leaves a search without channel groups."""
    need = MIN_OPSET[naming.GROUPED_OP]
    have = default_opset(proto)
    asked = options.scope.kind == "channel-group"
    if have >= need or not (
        asked or (options.target is not None and options.scope.kind == "network")
    ):
        return proto
    from .graphfile import convert_opset

    try:
        converted = convert_opset(proto, need)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValueErrors
        if not asked:
            log.info("the search skips channel groups: onnx could not convert opset %d to %d (%s)",
                     have, need, str(exc).strip()[:120])  # fmt: skip
            return proto
        raise OptionError(
            f"scope 'channel-group' decodes with ops of opset {need}, the model imports opset "
            f"{have} and onnx could not convert it ({str(exc).strip()[:120]}); use scope 'layer'",
            "scope",
        ) from None
    log.info("converted the model from opset %d to %d for the channel-group scope", have, need)
    return converted


def _scopes(proto: onnx.ModelProto, options: CompressOptions) -> list[Scope]:
    """The scopes to search: the one given alone when it is not the default (network), else all
    (``allocated`` for uniform quantization, the method it takes)."""
    if options.scope.kind != "network":
        return [options.scope]
    scopes = [Scope("network")]
    if options.method == "uniform":
        scopes.append(Scope("allocated"))
    scopes.append(Scope("layer"))
    need = MIN_OPSET[naming.GROUPED_OP]
    if default_opset(proto) >= need:
        scopes.append(Scope("channel-group", GROUP_SIZE))
    else:
        log.info("the search skips channel groups: the model's opset is below %d", need)
    return scopes


def _closest_scope(target: Target, points: list[SearchPoint]) -> Scope:
    """The scope of the point whose metric came closest to ``target``."""
    sign = 1.0 if target.upper else -1.0
    top = min(points, key=lambda p: sign * p.metric if not math.isnan(p.metric) else math.inf)
    return Scope(top.scope, top.group_size)


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
