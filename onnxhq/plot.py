"""The rate-accuracy plot of a sweep: accuracy (without labels: the headline fidelity to the
original) against coded bits per weight, as a PNG.

matplotlib is optional (the ``plot`` extra) and loads only here, on first use.
"""

from __future__ import annotations

import io
import os

from ._io import atomic_write_bytes
from .errors import ConfigError
from .sweep import Sweep


def require_matplotlib() -> None:
    """Raise ConfigError saying how to install matplotlib when it is missing (call it before the
    slow work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib, which is not installed: pip install 'onnxhq[plot]' (or "
            "skip the plot with --no-plot)"
        ) from None


def sweep_figure_png(sweep: Sweep, *, dpi: int = 120) -> bytes:
    """PNG bytes of accuracy (%) against bits per weight, one labelled marker per point."""
    require_matplotlib()
    # Figure + Agg canvas directly, not pyplot: no global state and no GUI backend is ever picked.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ordered = sorted(sweep.points, key=lambda p: p.report.bits_per_weight)
    points = [p for p in ordered if p.report.accuracy_compressed is not None]
    ylabel, title = "top-1 accuracy (%)", "accuracy"
    ys = [100 * (p.report.accuracy_compressed or 0.0) for p in points]  # all measured
    headline = None if points else sweep.headline()
    if headline is not None:  # no labels: the fidelity of the first output (agreement, iou...)
        output, metric = headline
        points = [p for p in ordered if metric in p.report.fidelity.get(output, {})]
        ys = [p.report.fidelity[output][metric] for p in points]
        ylabel, title = f"{metric} of {output} to the original", "fidelity"
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p.report.bits_per_weight for p in points]
    ax.plot(xs, ys, marker="o", color="tab:blue", label=f"{sweep.method}, {sweep.hessian} Hessian")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(
            f"{p.label}\n{p.report.compression_ratio:.1f}x",
            (x, y),
            textcoords="offset points",
            xytext=(4, -22),
            fontsize=7,
        )
    if sweep.accuracy_original is not None:
        ax.axhline(
            100 * sweep.accuracy_original,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"float model {sweep.accuracy_original:.2%}",
        )
    ax.margins(x=0.12, y=0.12)  # room for the labels of the end points
    ax.set_xlabel("coded bits per weight (Huffman payload + code tables)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{sweep.model}: {title} against rate")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_sweep_plot(sweep: Sweep, path: str | os.PathLike) -> int:
    """Write the sweep's plot to ``path`` (PNG) atomically; returns the bytes written."""
    return atomic_write_bytes(path, sweep_figure_png(sweep))
