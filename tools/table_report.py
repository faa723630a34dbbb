"""The stage cache of ``tools.reproduce_table`` and its report stage: markdown tables and
rate-accuracy plots.

`Cache` keeps one network's finished steps (``results.json``) and `Where` says where a run
writes. The report reads only the cache: the best fine-tuned result per method (or the most
accurate failing attempt, marked ✗) and the curve points without fine-tuning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tools import datasets
from tools.table_nets import METHODS, PAPER, Net

TAGS = ("dense", "dense@layer", "pruned", "pruned@layer")
TICKS = (0.25, 0.35, 0.5, 0.7, 1, 1.5, 2, 3, 4, 6)  # bits per weight on the log axis


@dataclass(frozen=True)
class Where:
    """Where a run writes: the stage cache, the best artifacts, the plots."""

    cache: Path = datasets.CACHE / "table"
    compressed: Path = datasets.MODELS / "compressed"
    plots: Path = datasets.REPO / "tools"

    @classmethod
    def under(cls, root: Path) -> Where:
        """Everything below ``root`` (smoke runs)."""
        return cls(root / "cache", root / "compressed", root)


class Cache:
    """results.json of one network: a dict of finished steps, rewritten atomically after each."""

    def __init__(self, net: str, root: Path) -> None:
        self.dir = root / net
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str):
        return self.data.get(key)

    def artifacts(self, key: str) -> Path:
        """The folder holding the compressed files of step ``key``."""
        return self.dir / "artifacts" / key.replace("/", "_").replace(" ", "-")

    def drop(self, key: str) -> None:
        """Forget one step (its inputs changed)."""
        self._merge()
        self.data.pop(key, None)
        self._write()

    def put(self, key: str, value) -> None:
        """Store one step; steps that other runs stored meanwhile are kept (re-read first)."""
        self._merge()
        self.data[key] = value
        self._write()

    def _merge(self) -> None:
        if self.path.is_file():
            self.data = {**self.data, **json.loads(self.path.read_text())}

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def report_stage(net: Net, cache: Cache, plots: Path) -> None:
    """Print the tables of the fine-tuned results (pruned, and dense where run), plot the curves."""
    float_acc = cache.get("float")["accuracy"]
    pruned = cache.get("polished") or cache.get("pruned")
    head = f"\n### {net.name}: float {float_acc:.2%}"
    if pruned:
        sparsity = cache.get("pruned")["sparsity"]
        head += f", pruned {pruned['accuracy']:.2%} at sparsity {sparsity:.2%}"
    print(head)
    for suffix, what in (("", "pruned"), ("@dense", "dense")):
        threshold = cache.get(f"threshold{suffix}")
        if threshold:
            print(
                f"\n{what} model (pass: accuracy >= {threshold['accuracy']:.2%}, 0.1 point below "
                f"the {threshold['relative_to']} model)\n"
            )
            print("\n".join(table_rows(net, cache, suffix)))
    paired = compensation_rows(cache)
    if paired:
        print("\nWith and without --compensate, same settings, no fine-tuning\n")
        print("\n".join(paired))
    plot_curves(net, cache, plots)


def table_rows(net: Net, cache: Cache, suffix: str) -> list[str]:
    rows = [
        "| method | rate | accuracy | bits/weight | bytes | ratio (all bytes) | paper Eq. 1 "
        "| paper's Table 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in METHODS:
        best = cache.get(f"best{suffix}/{label}")
        paper = PAPER.get(net.name, {}).get(label)
        paper_txt = f"{paper[0]:.2f} %, {paper[1]:.2f}x" if paper else "n/a"
        mark = ""
        if not best:  # show the most accurate fine-tuned attempt, marked as failing
            tried = [
                dict(row, key=key)
                for key, row in cache.data.items()
                if key.startswith(f"table{suffix}/{label}/")
            ]
            if not tried:
                continue
            best, mark = max(tried, key=lambda r: (r["accuracy"], r["ratio"])), " ✗"
        rate = best["key"].split("/")[-1]
        rows.append(
            f"| {label} | {rate} | {best['accuracy']:.2%}{mark} | {best['bits_per_weight']:.3f} "
            f"| {best['bytes']:,} | {best['ratio']:.2f}x | {best['paper_ratio']:.2f}x "
            f"| {paper_txt} |"
        )
    return rows


def plot_curves(net: Net, cache: Cache, plots: Path) -> None:
    """``plots/curves_<net>.png``: accuracy against coded bits per weight, one panel per model."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: pip install -e '.[bench]' for the plot)")
        return
    tags = [t for t in TAGS if any(key.startswith(f"curve/{t}/") for key in cache.data)]
    if not tags:
        return
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4.5), sharey=True, squeeze=False)
    float_acc = cache.get("float")["accuracy"]
    low, high = max(0.0, float_acc - 0.05), min(1.0, float_acc + 0.01)
    for ax, tag in zip(axes[0], tags):
        shown = []
        for label in METHODS:
            pts = sorted(
                (row["bits_per_weight"], row["accuracy"])
                for key, row in cache.data.items()
                if key.startswith(f"curve/{tag}/{label}/") and "accuracy" in row
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
                shown += [b for b, a in pts if a >= low]
            comp = sorted(
                (row["bits_per_weight"], row["accuracy"])
                for key, row in cache.data.items()
                if key.startswith(f"compensated/{tag}/{label}/") and "accuracy" in row
            )
            if comp:
                ax.plot(*zip(*comp), marker="x", ls="--", label=f"{label}, compensated")
                shown += [b for b, a in comp if a >= low]
        # the rates whose accuracy is on the chart, with room for the lines falling off it
        if shown:
            ax.set_xlim(min(shown) / 1.3, max(shown) * 1.1)
        ax.axhline(float_acc, color="gray", ls="--", lw=1, label="float model")
        scope = "one codebook per layer" if tag.endswith("@layer") else "one codebook"
        ax.set_title(f"{net.name}, {tag.split('@')[0]}, {scope} (no fine-tuning)")
        ax.set_xlabel("coded bits per weight (Huffman, all quantized weights; log scale)")
        ax.set_xscale("log")  # pruned rates span 0.3-4 bits: a log axis shows the low end
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(TICKS))
        ax.set_ylim(low, high)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (test set)")
    axes[0][-1].legend(loc="lower right")
    fig.tight_layout()
    out = plots / f"curves_{net.name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"\n![{net.name} rate-accuracy]({out.name})")


def compensation_rows(cache: Cache) -> list[str]:
    """Markdown rows pairing each compensated point with the curve point of the same settings."""
    rows = [
        "| model | method | rate | plain: accuracy | bits/weight | ratio "
        "| compensated: accuracy | bits/weight | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = [k.split("/") for k in cache.data if k.startswith("compensated/")]
    keys.sort(key=lambda k: (k[1], k[2], float(k[3].split("=")[1])))  # rates by value
    for _, where, label, rate in keys:
        key = f"{where}/{label}/{rate}"
        comp, plain = cache.get(f"compensated/{key}"), cache.get(f"curve/{key}")
        cells = [_cells(plain), _cells(comp)]
        rows.append(f"| {where} | {label} | {rate} | {cells[0]} | {cells[1]} |")
    return rows if len(rows) > 2 else []


def _cells(row: dict | None) -> str:
    if not row or "accuracy" not in row:
        return " | ".join([(row or {}).get("error", "not run")[:40], "", ""])
    return f"{row['accuracy']:.2%} | {row['bits_per_weight']:.3f} | {row['ratio']:.2f}x"
