"""Size and accuracy reports: a frozen record, its stable JSON form, and a text table.

`compress` fills a `Report` from what it holds; `onnxhq.describe.describe_artifacts` rebuilds one
from the two saved files alone. Both build their rows here, with `layer_rows` and `codebook_rows`.
This module is the record only: numpy arrays in, no protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from . import naming
from .errors import SidecarError

if TYPE_CHECKING:
    from .coding.layout import StreamLayout
    from .quantize.guard import TensorError

#: Values of ``Report.original_source``: the file `compress` read, or the float model decoded
#: from the artifacts.
ORIGINAL_SOURCES = ("input", "decoded")


#: Values of ``ErrorRow.guard``: untouched, flagged and left (``--guard warn``), or given a
#: codebook of its own (``--guard requantize``); and their marks in the text table.
GUARD_MARKS = {"": " ", "flagged": "!", "requantized": "+"}


@dataclass(frozen=True)
class LayerRow:
    """One quantized tensor: parameters, clusters used, coded bytes (Huffman payload + table)."""

    name: str
    params: int
    clusters: int
    coded_bytes: int
    bits_per_weight: float
    entropy_bits: float


@dataclass(frozen=True)
class ErrorRow:
    """One quantized tensor's error against the original (known to `compress` only, not to the
    saved files): ``||w - q|| / ||w||``, the SQNR in dB (inf when exact), and what the guard did
    (a key of `GUARD_MARKS`)."""

    name: str
    rel_error: float
    sqnr_db: float
    guard: str = ""


@dataclass(frozen=True)
class SearchPoint:
    """One compression tried by a target search: scope, rate, size, and the target's metric."""

    scope: str
    group_size: int | None
    rate: str
    bits_per_weight: float
    compressed_bytes: int
    compression_ratio: float
    metric: float
    met: bool


@dataclass(frozen=True)
class CodebookRow:
    """One codebook of a compressed graph: its entries, how many the indices use, who reads it."""

    name: str
    entries: int
    used: int
    dtype: str
    values: tuple[float, ...]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    """Everything `compress` measured. Sizes are bytes; accuracies fractions in [0, 1].

    ``compressed_bytes`` counts every file decoding needs (graph + sidecar); ``original_bytes`` the
    input model's file(s), or with ``original_source="decoded"`` the float model rebuilt from the
    artifacts. ``paper_ratio`` is Choi et al.'s Eq. 1 figure (32-bit parameters against index bits
    + codebooks + unquantized parameters), shown for comparison with the paper.
    """

    model: str
    original_bytes: int
    files: dict[str, int]
    layers: tuple[LayerRow, ...]
    codebook_bytes: int
    unquantized_params: int
    graph_bytes: int
    sidecar_bytes: int
    settings: dict = field(default_factory=dict)
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    codebooks: tuple[CodebookRow, ...] = ()
    original_source: str = "input"
    errors: tuple[ErrorRow, ...] = ()
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    target: str | None = None
    search: tuple[SearchPoint, ...] = ()
    folded_batchnorms: int = 0

    @property
    def compressed_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def compression_ratio(self) -> float:
        return self.original_bytes / max(self.compressed_bytes, 1)

    @property
    def quantized_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Coded index bits (payload + code tables) per quantized weight, over all layers."""
        return 8 * sum(r.coded_bytes for r in self.layers) / max(self.quantized_params, 1)

    @property
    def paper_ratio(self) -> float:
        total = self.quantized_params + self.unquantized_params
        coded_bits = (
            8 * sum(r.coded_bytes for r in self.layers)
            + 8 * self.codebook_bytes
            + 32 * self.unquantized_params
        )
        return 32 * total / max(coded_bits, 1)

    def with_files(self, files: dict[str, int]) -> Report:
        return replace(self, files=dict(files))

    def with_accuracy(self, original: float | None, compressed: float | None) -> Report:
        return replace(self, accuracy_original=original, accuracy_compressed=compressed)

    def with_fidelity(self, fidelity: Mapping[str, Mapping[str, float]]) -> Report:
        """The report with ``fidelity``: output name -> {metric: value} against the original."""
        return replace(self, fidelity={o: dict(m) for o, m in fidelity.items()})

    def with_search(self, target: str, points: Iterable[SearchPoint]) -> Report:
        """The report with the target search that chose it (``target`` as ``METRIC=VALUE``)."""
        return replace(self, target=target, search=tuple(points))

    def to_dict(self) -> dict:
        """The JSON report. Key names are stable: scripts are written against them.

        Infinite values (the SQNR of an exact tensor or output) are written as null.
        """
        out = {
            "model": self.model,
            "original_bytes": self.original_bytes,
            "original_source": self.original_source,
            "compressed_bytes": self.compressed_bytes,
            "compression_ratio": self.compression_ratio,
            "paper_ratio": self.paper_ratio,
            "bits_per_weight": self.bits_per_weight,
            "files": list(self.files),
            "file_bytes": dict(self.files),
            "graph_bytes": self.graph_bytes,
            "sidecar_bytes": self.sidecar_bytes,
            "codebook_bytes": self.codebook_bytes,
            "quantized_params": self.quantized_params,
            "unquantized_params": self.unquantized_params,
            "folded_batchnorms": self.folded_batchnorms,
            "settings": dict(self.settings),
            "layers": [asdict(r) for r in self.layers],
        }
        if self.errors:
            out["errors"] = [_finite_values(asdict(e)) for e in self.errors]
        if self.fidelity:
            out["fidelity"] = {o: _finite_values(m) for o, m in self.fidelity.items()}
        if self.target is not None:
            out["search"] = {
                "target": self.target,
                "points": [asdict(p) for p in self.search],
            }
        if self.codebooks:
            out["codebooks"] = [asdict(c) for c in self.codebooks]
        if self.accuracy_original is not None or self.accuracy_compressed is not None:
            out["accuracy"] = {
                "original": self.accuracy_original,
                "compressed": self.accuracy_compressed,
            }
        return out

    def to_text(self) -> str:
        """A table per layer, the codebooks (when known) and the totals, for a terminal."""
        lines = _layer_table(self.layers, {e.name: e for e in self.errors})
        if any(e.guard for e in self.errors):
            lines.append("+ given a codebook of its own by the guard; ! flagged (--guard warn)")
        if self.codebooks:
            lines += [""] + _codebook_lines(self.codebooks)
        original = "original model" if self.original_source == "input" else "float model (decoded)"
        lines += [
            "",
            *_hessian_line(self.settings),
            f"codebooks             {self.codebook_bytes:>10,} bytes",
            f"unquantized params    {self.unquantized_params:>10,} "
            "(kept as they were, in the graph)",
            *(
                [f"batchnorms folded     {self.folded_batchnorms:>10,} (into the layers before)"]
                if self.folded_batchnorms
                else []
            ),
            f"graph file            {self.graph_bytes:>10,} bytes "
            "(structure, codebooks, unquantized tensors)",
            f"sidecar file          {self.sidecar_bytes:>10,} bytes (Huffman-coded indices)",
            f"{original:<21} {self.original_bytes:>10,} bytes",
            f"compressed total      {self.compressed_bytes:>10,} bytes",
            f"compression ratio     {self.compression_ratio:>10.2f}x  "
            f"(every byte; paper's Eq. 1: {self.paper_ratio:.2f}x)",
        ]
        if self.accuracy_original is not None:
            lines.append(f"accuracy original     {self.accuracy_original:>10.2%}")
        if self.accuracy_compressed is not None:
            drop = ""
            if self.accuracy_original is not None:
                drop = (
                    f"  ({100 * (self.accuracy_compressed - self.accuracy_original):+.2f} points)"
                )
            lines.append(f"accuracy compressed   {self.accuracy_compressed:>10.2%}{drop}")
        if self.fidelity or self.target is not None:
            from .text import fidelity_lines, search_lines

            lines += fidelity_lines(self.fidelity)
            lines += [] if self.target is None else search_lines(self.target, self.search)
        return "\n".join(lines)


def _hessian_line(settings: Mapping) -> list[str]:
    """The Hessian that weighed the errors as the settings record it: the estimator that ran
    (after a fallback, the one fallen back to) and its samples; none for an unweighted run."""
    method = settings.get("hessian")
    if method in (None, "none"):
        return []
    samples = settings.get("hessian_samples")
    return [f"hessian               {method:>10}" + (f" ({samples} samples)" if samples else "")]


def _finite_values(d: Mapping) -> dict:
    """``d`` with infinite floats as None (JSON has no infinity)."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in d.items()}


def _layer_table(layers: tuple[LayerRow, ...], errors: Mapping[str, ErrorRow]) -> list[str]:
    width = max([len("total quantized")] + [len(r.name) for r in layers])
    extra = f"  {'rel.err':>8}  {'SQNR dB':>7}" if errors else ""
    lines = [
        f"{'layer':<{width}}  {'params':>9}  {'clusters':>8}  {'bits/w':>6}  "
        f"{'entropy':>7}  {'bytes':>9}{extra}"
    ]
    for r in layers:
        more, e = "", errors.get(r.name)
        if e is not None:
            mark = GUARD_MARKS.get(e.guard, "?")
            more = f"  {e.rel_error:>8.3g}  {e.sqnr_db:>7.1f} {mark}".rstrip()
        lines.append(
            f"{r.name:<{width}}  {r.params:>9,}  {r.clusters:>8}  {r.bits_per_weight:>6.3f}  "
            f"{r.entropy_bits:>7.3f}  {r.coded_bytes:>9,}{more}"
        )
    q = sum(r.params for r in layers)
    coded = sum(r.coded_bytes for r in layers)
    entropy = sum(r.entropy_bits * r.params for r in layers) / max(q, 1)
    lines.append(
        f"{'total quantized':<{width}}  {q:>9,}  {'':>8}  {8 * coded / max(q, 1):>6.3f}  "
        f"{entropy:>7.3f}  {coded:>9,}"
    )
    return lines


def _codebook_lines(codebooks: tuple[CodebookRow, ...], *, max_values: int = 64) -> list[str]:
    lines = []
    for c in codebooks:
        layers = ", ".join(c.layers) if len(c.layers) <= 3 else f"{len(c.layers)} layers"
        lines.append(
            f"codebook {c.name}: {c.entries} entries ({c.dtype}), {c.used} used, read by {layers}"
        )
        if len(c.values) <= max_values:
            lines += _wrapped([f"{v:.4g}" for v in c.values], indent="  ")
        else:
            lines.append(f"  values from {min(c.values):.4g} to {max(c.values):.4g}")
    return lines


def _wrapped(words: list[str], *, indent: str, width: int = 100) -> list[str]:
    lines, line = [], indent
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += word + " "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def layer_rows(
    indices: Mapping[str, np.ndarray], layouts: Iterable[StreamLayout]
) -> tuple[LayerRow, ...]:
    """One `LayerRow` per quantized weight, in the order of ``indices``.

    Parameters
    ----------
    indices : weight name -> its cluster indices (any shape, one per weight element).
    layouts : the sidecar's stream layouts (`describe_sidecar`); the weight ``w`` is coded in the
        stream named ``naming.index_tensor(w)``. Other streams are ignored.
    """
    by_stream = {lay.name: lay for lay in layouts}
    rows = []
    for weight, idx in indices.items():
        lay = by_stream.get(naming.index_tensor(weight))
        if lay is None:
            raise SidecarError(
                f"the sidecar has no stream {naming.index_tensor(weight)!r} for weight {weight!r}; "
                "was it written for another graph?"
            )
        rows.append(layer_row(weight, idx, lay))
    return tuple(rows)


def layer_row(weight: str, indices: np.ndarray, lay: StreamLayout) -> LayerRow:
    """The `LayerRow` of quantized weight ``weight``: its indices, coded as ``lay`` says."""
    return LayerRow(
        name=weight,
        params=int(np.size(indices)),
        clusters=int(np.count_nonzero(np.bincount(np.ravel(indices)))),
        coded_bytes=lay.payload_bytes + lay.table_bytes,
        bits_per_weight=lay.coded_bits_per_weight,
        entropy_bits=lay.entropy_bits,
    )


def error_rows(
    errors: Mapping[str, TensorError],
    *,
    flagged: Iterable[str] = (),
    guarded: Iterable[str] = (),
) -> tuple[ErrorRow, ...]:
    """One `ErrorRow` per tensor of ``errors`` (name -> `TensorError`), in its order; the tensors
    the guard ``flagged`` and left, or ``guarded`` (gave a codebook of their own), marked."""
    marks = {**dict.fromkeys(flagged, "flagged"), **dict.fromkeys(guarded, "requantized")}
    return tuple(
        ErrorRow(name, float(e.rel_error), float(e.sqnr_db), marks.get(name, ""))
        for name, e in errors.items()
    )


def codebook_rows(
    codebooks: Mapping[str, np.ndarray],
    readers: Mapping[str, str],
    indices: Mapping[str, np.ndarray],
) -> tuple[CodebookRow, ...]:
    """One `CodebookRow` per codebook read, in the order of its first reader.

    Parameters
    ----------
    codebooks : codebook name -> its values, any shape (all entries count).
    readers : weight name -> name of the codebook it reads, in graph order.
    indices : weight name -> its cluster indices.
    """
    users: dict[str, list[str]] = {}
    for weight, book in readers.items():
        users.setdefault(book, []).append(weight)
    rows = []
    for book, weights in users.items():
        values = np.asarray(codebooks[book]).reshape(-1)
        used = np.unique(np.concatenate([np.ravel(indices[w]) for w in weights])).size
        rows.append(
            CodebookRow(
                name=book,
                entries=int(values.size),
                used=int(used),
                dtype=values.dtype.name,
                values=tuple(float(v) for v in values),
                layers=tuple(weights),
            )
        )
    return tuple(rows)
