"""Rate-fidelity sweeps: one Hessian estimate, many compressions, size against fidelity.

`sweep` checks every point's options first, estimates the importances (with compensate, the
layer statistics too: `pipeline.estimate_statistics`) once and compresses the model at every
rate with them, so its points differ only in the rate. Each point's report keeps its full
settings (`CompressOptions.to_dict`), so any point can be compressed again alone.
This module is light (no numpy or onnx at import): the pipeline loads on first use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import RATES, CompressOptions, OptionError, Rate, require_data, resolve_options

if TYPE_CHECKING:  # the heavy modules load on first use (see onnxhq/__init__.py)
    from .data import Dataset
    from .report import Report

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SweepPoint:
    """One compression of a sweep: the rate setting it used and what it gave."""

    rate: str
    value: float
    report: Report

    @property
    def label(self) -> str:
        return Rate.named(self.rate, self.value).label()


@dataclass(frozen=True)
class Sweep:
    """Points of a sweep in the order given, all sharing one model, method and Hessian estimate.

    ``hessian`` is the estimator that ran (``activations`` where the default ``fisher`` fell
    back), as each point's report settings say."""

    model: str
    method: str
    hessian: str
    original_bytes: int
    accuracy_original: float | None
    points: tuple[SweepPoint, ...]

    def to_dict(self) -> dict:
        """The JSON of ``sweep.json``: settings, the float model, and one entry per point."""
        return {
            "model": self.model,
            "method": self.method,
            "hessian": self.hessian,
            "original_bytes": self.original_bytes,
            "accuracy_original": self.accuracy_original,
            "points": [_point_dict(p) for p in self.points],
        }

    def headline(self) -> tuple[str, str] | None:
        """(output, metric) of the fidelity a table or plot shows: the first metric (agreement,
        iou, cosine) of the first output compared; None when no output was."""
        first = self.points[0].report.fidelity if self.points else {}
        return next(((o, m) for o, metrics in first.items() for m in metrics), None)

    def to_text(self) -> str:
        """The rate-accuracy table, for a terminal."""
        from .text import sweep_table

        return sweep_table(self)


def sweep(
    model: str | os.PathLike,
    data: str | os.PathLike | Dataset | None,
    *,
    eval_data: str | os.PathLike | Dataset,
    rates: Sequence[Rate] = (),
    k: Sequence[int] = (),
    bits: Sequence[int] = (),
    lam: Sequence[float] = (),
    target_bits: Sequence[float] = (),
    options: CompressOptions | None = None,
    progress: StageProgress | None = None,
    **keywords: Any,
) -> Sweep:
    """Compress ``model`` at each rate of one list and measure size and accuracy; the Hessian once.

    Parameters
    ----------
    model : path of the model (its file size is the original size).
    data : inputs for the Hessian estimate; may be None for ``method="kmeans"``,
        ``hessian="none"`` or precomputed diagonals.
    eval_data : inputs (labels optional); every point's outputs are compared with the float
        model's (``report.fidelity``), and with labels both accuracies are measured.
    rates : the `Rate` of each point, all of one kind; or instead exactly one non-empty list of
        ``k``, ``bits``, ``lam`` or ``target_bits``.
    options : the `CompressOptions` shared by the points (their rate is replaced), or None to
        build them from ``keywords`` (those of `compress` other than the rate).
    progress : called with ``(stage, done, total)``; the stages of a point are prefixed by its
        setting (``"k=8 quantize"``).

    Returns
    -------
    Sweep, with one point per rate in the order given.
    """
    points_rates = _rates(rates, k=k, bits=bits, lam=lam, target_bits=target_bits)
    given_rates = sorted(set(keywords) & set(RATES))
    if given_rates:
        raise OptionError(
            f"a sweep takes its rates as lists: {given_rates[0]}=[...]", given_rates[0]
        )
    base = resolve_options(
        options,
        {**keywords, **points_rates[0].to_dict()} if options is None else keywords,
        caller="sweep",
    )
    if base.target is not None:
        raise OptionError(
            f"a sweep compresses at the rates given; {base.target.label()} is for compress",
            base.target.field,
        )
    settings = [base.with_rate(r) for r in points_rates]  # every point checked before any work
    require_data(base, data)
    from .data import Dataset, load_data  # the heavy modules, once the options are known good
    from .evaluate import reference_outputs
    from .importances import settled
    from .model import load_model
    from .pipeline import check_scope_opset, compress_point, estimate_statistics, fold_layers

    proto = load_model(model)
    proto = check_scope_opset(base, proto)
    test = eval_data if isinstance(eval_data, Dataset) else load_data(eval_data, proto)
    dataset = data if isinstance(data, Dataset) or data is None else load_data(data, proto)
    reference = reference_outputs(proto, test, output=base.output)
    fold_layers(base, proto)  # after the reference: compared with the model as given
    statistics = estimate_statistics(proto, dataset, base, progress)
    points = []
    for i, point in enumerate(settings):
        assert point.rate is not None
        label = point.rate.label()
        report = compress_point(
            model, proto, point, statistics, reference, test, label=label, progress=progress
        ).report
        points.append(SweepPoint(point.rate.name, point.rate.value, report))
        log.info(
            "sweep %s: %.3f bits/weight, fidelity %s",
            points[-1].label,
            report.bits_per_weight,
            report.fidelity,
        )
        if progress is not None:
            progress("sweep", i + 1, len(settings))
    first = points[0].report
    assert base.hessian is not None
    return Sweep(
        model=first.model,
        method=base.method,
        hessian=settled(base, statistics[0]).to_dict()["hessian"],  # the one that ran
        original_bytes=first.original_bytes,
        accuracy_original=first.accuracy_original,  # every point measured the same original
        points=tuple(points),
    )


def _point_dict(p: SweepPoint) -> dict:
    report = p.report.to_dict()
    return {
        "rate": p.rate,
        "value": p.value,
        "bits_per_weight": p.report.bits_per_weight,
        "compressed_bytes": p.report.compressed_bytes,
        "compression_ratio": p.report.compression_ratio,
        "accuracy": p.report.accuracy_compressed,
        "fidelity": report.get("fidelity", {}),
        "report": report,
    }


def _rates(rates: Sequence[Rate], **lists: Sequence[float]) -> list[Rate]:
    """The points' rates: ``rates``, or the one non-empty list of ``lists``; one kind, distinct."""
    given = {
        name: list(values) for name, values in lists.items() if values is not None and len(values)
    }
    if rates and given:
        raise OptionError(f"give rates= or one list of {', '.join(RATES)}, not both", *RATES)
    if not rates:
        if len(given) != 1:
            raise OptionError(
                f"a sweep varies exactly one rate: give a list for one of "
                f"{', '.join(RATES)} (got {', '.join(given) or 'none'})",
                *RATES,
            )
        ((name, values),) = given.items()
        rates = [Rate.named(name, v) for v in values]
    kinds = sorted({r.name for r in rates})
    if len(kinds) != 1:
        raise OptionError(f"a sweep varies exactly one rate; got {', '.join(kinds)}", *kinds)
    values = [r.value for r in rates]
    if len(set(values)) != len(values):
        raise OptionError(
            f"the {kinds[0]} values {values} repeat a setting; give each once", kinds[0]
        )
    return list(rates)
