"""Terminal tables of the CLI's results other than the size report (`Report.to_text`).

Each function returns text without a trailing newline; the CLI prints it. Light at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .report import SearchPoint
    from .sweep import Sweep


def inspect_table(info: Mapping[str, Any]) -> str:
    """``onnxhq inspect``: the model's opset, inputs and outputs, then one line per weight.

    ``info`` is the JSON of ``inspect --json``: ``model``, ``opset``, ``ir_version``, ``inputs``,
    ``outputs``, and ``weights`` (dicts of ``name``, ``shape``, ``dtype``, ``params``, ``used_by``).
    """
    weights = info["weights"]
    width = max([6] + [len(w["name"]) for w in weights])
    lines = [
        f"{info['model']}: opset {info['opset']}, IR {info['ir_version']}, "
        f"inputs {info['inputs']}, outputs {info['outputs']}",
        f"{'weight':<{width}}  {'shape':<18} {'dtype':<8} {'params':>10}  used by",
    ]
    for w in weights:
        lines.append(
            f"{w['name']:<{width}}  {tuple(w['shape'])!s:<18} {w['dtype']:<8} "
            f"{w['params']:>10,}  {', '.join(w['used_by'])}"
        )
    lines.append(
        f"{len(weights)} quantizable weights, {sum(w['params'] for w in weights):,} parameters"
    )
    return "\n".join(lines)


def hessian_table(diag: Mapping[str, np.ndarray]) -> str:
    """``onnxhq hessian``: shape, mean and largest importance of each weight."""
    import numpy as np

    width = max([6] + [len(n) for n in diag])
    lines = [f"{'weight':<{width}}  {'shape':<18} {'mean h':>10} {'max h':>10}"]
    for name, h in diag.items():
        lines.append(
            f"{name:<{width}}  {h.shape!s:<18} {float(np.mean(h)):>10.3g} {float(np.max(h)):>10.3g}"
        )
    return "\n".join(lines)


def prune_table(masks: Mapping[str, np.ndarray]) -> str:
    """``onnxhq prune``: parameters and pruned fraction of each weight (keep-masks), and in all."""
    import numpy as np

    def pruned(ms) -> float:
        total = sum(m.size for m in ms)
        return 0.0 if total == 0 else sum(m.size - np.count_nonzero(m) for m in ms) / total

    width = max([len("total")] + [len(n) for n in masks])
    lines = [f"{'weight':<{width}}  {'params':>9}  {'pruned':>7}"]
    for name, mask in masks.items():
        lines.append(f"{name:<{width}}  {mask.size:>9,}  {pruned([mask]):>7.2%}")
    lines.append(
        f"{'total':<{width}}  {sum(m.size for m in masks.values()):>9,}  "
        f"{pruned(list(masks.values())):>7.2%}"
    )
    return "\n".join(lines)


def sweep_table(sweep: Sweep) -> str:
    """``onnxhq sweep``: one line per point: setting, bits per weight, bytes, ratio, accuracy,
    and the headline fidelity (the first metric of the first output: agreement, iou, cosine)."""
    acc = "" if sweep.accuracy_original is None else f", accuracy {sweep.accuracy_original:.2%}"
    output, metric = sweep.headline() or (None, None)
    shown = "" if metric is None else f"; fidelity: {metric} of {output}"
    lines = [
        f"{sweep.model}: method {sweep.method}, {sweep.hessian} Hessian; original "
        f"{sweep.original_bytes:,} bytes{acc}{shown}",
        f"{'setting':<14} {'bits/w':>7} {'bytes':>10} {'ratio':>7} {'accuracy':>9} {'change':>8} "
        f"{metric or '':>10}",
    ]
    for p in sweep.points:
        r = p.report
        accuracy = "" if r.accuracy_compressed is None else f"{r.accuracy_compressed:.2%}"
        change = ""
        if r.accuracy_compressed is not None and sweep.accuracy_original is not None:
            change = f"{100 * (r.accuracy_compressed - sweep.accuracy_original):+.2f}"
        value = r.fidelity.get(output or "", {}).get(metric or "")
        fid = "" if value is None else _number(value)
        lines.append(
            f"{p.label:<14} {r.bits_per_weight:>7.3f} {r.compressed_bytes:>10,} "
            f"{r.compression_ratio:>6.2f}x {accuracy:>9} {change:>8} {fid:>10}".rstrip()
        )
    return "\n".join(lines)


def fidelity_lines(fidelity: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The report's fidelity to the original: one line per output, its metrics."""
    lines = ["", "fidelity to the original (eval inputs):"] if fidelity else []
    for output, metrics in fidelity.items():
        shown = ", ".join(f"{m} {_number(v)}" for m, v in metrics.items())
        lines.append(f"  {output}: {shown}")
    return lines


def search_lines(target: str, points: Sequence[SearchPoint]) -> list[str]:
    """The report's target search: one line per compression tried, the chosen one marked."""
    met = [p for p in points if p.met]
    chosen = min(met, key=lambda p: p.compressed_bytes) if met else None
    lines = [
        "",
        f"search for {target}: {len(points)} tried (* chosen: the smallest meeting it)",
        f"  {'scope':<17} {'rate':<16} {'bits/w':>7} {'bytes':>10} {'ratio':>7} "
        f"{'metric':>10}  met",
    ]
    for p in points:
        scope = p.scope if p.group_size is None else f"{p.scope}/{p.group_size}"
        mark = "*" if p is chosen else " "
        lines.append(
            f"{mark} {scope:<17} {p.rate:<16} {p.bits_per_weight:>7.3f} "
            f"{p.compressed_bytes:>10,} {p.compression_ratio:>6.2f}x {_number(p.metric):>10}  "
            f"{'yes' if p.met else 'no'}"
        )
    return lines


def _number(value: float) -> str:
    return f"{value:.4g}" if value == value and abs(value) != float("inf") else str(value)
