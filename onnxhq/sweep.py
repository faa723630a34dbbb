"""Rate-accuracy sweeps: one Hessian estimate, many compressions, size against accuracy.

`onnxhq.pipeline.estimate_hessian` computes the importances `compress` would compute, so they can be saved
(``onnxhq hessian``) or shared: `sweep` estimates once and compresses the model at every rate
with the same diagonal, so its points differ only in the rate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .errors import ConfigError
from .report import Report

if TYPE_CHECKING:  # the heavy modules load on first use (see onnxhq/__init__.py)
    import numpy as np

    from .data import Dataset

log = logging.getLogger(__name__)

#: Rate settings a sweep can vary, as `compress` keywords.
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SweepPoint:
    """One compression of a sweep: the rate setting it used and what it gave."""

    rate: str
    value: float
    report: Report

    @property
    def label(self) -> str:
        return _label(self.rate, self.value)


@dataclass(frozen=True)
class Sweep:
    """Points of a sweep in the order given, all sharing one model, method and Hessian estimate."""

    model: str
    method: str
    hessian: str
    original_bytes: int
    accuracy_original: float | None
    points: tuple[SweepPoint, ...]

    def to_dict(self) -> dict:
        """The JSON of ``sweep.json``: settings, the float model, and one entry per point."""
        return {
            "model": self.model, "method": self.method, "hessian": self.hessian,
            "original_bytes": self.original_bytes, "accuracy_original": self.accuracy_original,
            "points": [{
                "rate": p.rate, "value": p.value, "bits_per_weight": p.report.bits_per_weight,
                "compressed_bytes": p.report.compressed_bytes, "compression_ratio": p.report.compression_ratio,
                "accuracy": p.report.accuracy_compressed, "report": p.report.to_dict(),
            } for p in self.points],
        }

    def to_text(self) -> str:
        """The rate-accuracy table, for a terminal."""
        acc = "" if self.accuracy_original is None else f", accuracy {self.accuracy_original:.2%}"
        lines = [f"{self.model}: method {self.method}, {self.hessian} Hessian; original {self.original_bytes:,} "
                 f"bytes{acc}",
                 f"{'setting':<14} {'bits/w':>7} {'bytes':>10} {'ratio':>7} {'accuracy':>9} {'change':>8}"]
        for p in self.points:
            r = p.report
            accuracy = "" if r.accuracy_compressed is None else f"{r.accuracy_compressed:.2%}"
            change = ""
            if r.accuracy_compressed is not None and self.accuracy_original is not None:
                change = f"{100 * (r.accuracy_compressed - self.accuracy_original):+.2f}"
            lines.append(f"{p.label:<14} {r.bits_per_weight:>7.3f} {r.compressed_bytes:>10,} "
                         f"{r.compression_ratio:>6.2f}x {accuracy:>9} {change:>8}")
        return "\n".join(lines)


def sweep(model: str | os.PathLike, data: str | os.PathLike | Dataset | None, *,
          eval_data: str | os.PathLike | Dataset, k: Sequence[int] = (), lam: Sequence[float] = (),
          target_bits: Sequence[float] = (), method: str = "uniform", scope: str = "network",
          hessian: str | Mapping[str, np.ndarray] = "fisher", hessian_samples: int = 1000,
          output: str | None = None, seed: int = 0, progress: StageProgress | None = None) -> Sweep:
    """Compress ``model`` at each rate of one list and measure size and accuracy; the Hessian once.

    Parameters
    ----------
    model : path of the model (its file size is the original size).
    data : inputs for the Hessian estimate; may be None for ``method="kmeans"``, ``hessian="none"``
        or a precomputed ``hessian`` mapping.
    eval_data : labelled data; the float model and every point are evaluated on it.
    k, lam, target_bits : exactly one non-empty list: cluster counts, ECSQ rate weights, or target
        bits per weight.
    method, scope, hessian, hessian_samples, output, seed : as in `compress`.
    progress : called with ``(stage, done, total)``; the stages of a point are prefixed by its
        setting (``"k=8 quantize"``).

    Returns
    -------
    Sweep, with one point per rate in the order given.
    """
    from .data import Dataset, load_data
    from .evaluate import accuracy
    from .model import load_model
    from .pipeline import WEIGHTED_METHODS, compress, estimate_hessian

    rate, values = _one_rate(k=k, lam=lam, target_bits=target_bits)
    proto = load_model(model)
    test = eval_data if isinstance(eval_data, Dataset) else load_data(eval_data, proto, need_labels=True)
    dataset = data if isinstance(data, Dataset) or data is None else load_data(data, proto)
    importances: str | Mapping[str, np.ndarray] = hessian
    if method in WEIGHTED_METHODS and isinstance(hessian, str) and hessian != "none":
        importances = estimate_hessian(proto, dataset, method=hessian, samples=hessian_samples, seed=seed,
                                       output=output, progress=progress)
    before = accuracy(proto, test, output=output)
    points = []
    for i, value in enumerate(values):
        point_progress = _prefixed(progress, _label(rate, value))
        result = compress(model, dataset, method=method, scope=scope, hessian=importances, output=output, seed=seed,
                          progress=point_progress, **{rate: value})
        after = accuracy(result.model(), test, output=output)
        points.append(SweepPoint(rate, value, result.report.with_accuracy(before, after)))
        log.info("sweep %s: %.3f bits/weight, accuracy %.4f", points[-1].label, points[-1].report.bits_per_weight,
                 after)
        if progress is not None:
            progress("sweep", i + 1, len(values))
    first = points[0].report
    return Sweep(model=first.model, method=method, hessian=hessian if isinstance(hessian, str) else "supplied",
                 original_bytes=first.original_bytes, accuracy_original=before, points=tuple(points))


def _one_rate(**rates: Sequence[float]) -> tuple[str, list[float]]:
    given = {name: list(values) for name, values in rates.items() if values is not None and len(values)}
    if len(given) != 1:
        raise ConfigError(f"a sweep varies exactly one rate: give a list for one of k, lam, target_bits "
                          f"(got {', '.join(given) or 'none'})")
    (rate, values), = given.items()
    if len(set(values)) != len(values):
        raise ConfigError(f"the {rate} values {values} repeat a setting; give each once")
    return rate, values


def _label(rate: str, value: float) -> str:
    return f"{'lambda' if rate == 'lam' else rate}={value:g}"


def _prefixed(progress: StageProgress | None, prefix: str) -> StageProgress | None:
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{prefix} {stage}", done, total)
