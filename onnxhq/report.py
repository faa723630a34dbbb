"""Size and accuracy reports: a frozen record, its stable JSON form, and a text table.

`compress` fills a `Report` while it works; `describe_artifacts` rebuilds one from the two saved
files alone (graph + sidecar), without the original model, so it has no accuracy and counts the
decoded float model as the original.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

#: Values of ``Report.original_source``: the file `compress` read, or the float model decoded from the artifacts.
ORIGINAL_SOURCES = ("input", "decoded")
_FLOAT_TENSOR_TYPES = (1, 10, 11, 16)  # onnx FLOAT, FLOAT16, DOUBLE, BFLOAT16: what `compress` counts


@dataclass(frozen=True)
class LayerRow:
    """One quantized tensor: parameters, clusters used, coded size (Huffman payload + code table)."""

    name: str
    params: int
    clusters: int
    coded_bytes: int
    bits_per_weight: float
    entropy_bits: float


@dataclass(frozen=True)
class CodebookRow:
    """One codebook of a compressed graph: its entries, how many the indices use, and who reads it."""

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
        coded_bits = 8 * sum(r.coded_bytes for r in self.layers) + 8 * self.codebook_bytes + 32 * self.unquantized_params
        return 32 * total / max(coded_bits, 1)

    def with_files(self, files: dict[str, int]) -> "Report":
        return replace(self, files=dict(files))

    def with_accuracy(self, original: float | None, compressed: float | None) -> "Report":
        return replace(self, accuracy_original=original, accuracy_compressed=compressed)

    def to_dict(self) -> dict:
        """The JSON report. Key names are stable: scripts are written against them."""
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
            "settings": dict(self.settings),
            "layers": [asdict(r) for r in self.layers],
        }
        if self.codebooks:
            out["codebooks"] = [asdict(c) for c in self.codebooks]
        if self.accuracy_original is not None or self.accuracy_compressed is not None:
            out["accuracy"] = {"original": self.accuracy_original, "compressed": self.accuracy_compressed}
        return out

    def to_text(self) -> str:
        """A table per layer, the codebooks (when known) and the totals, for a terminal."""
        lines = _layer_table(self.layers)
        if self.codebooks:
            lines += [""] + _codebook_lines(self.codebooks)
        original = "original model" if self.original_source == "input" else "float model (decoded)"
        lines += [
            "",
            f"codebooks             {self.codebook_bytes:>10,} bytes",
            f"unquantized params    {self.unquantized_params:>10,} (kept as they were, in the graph)",
            f"graph file            {self.graph_bytes:>10,} bytes (structure, codebooks, unquantized tensors)",
            f"sidecar file          {self.sidecar_bytes:>10,} bytes (Huffman-coded indices)",
            f"{original:<21} {self.original_bytes:>10,} bytes",
            f"compressed total      {self.compressed_bytes:>10,} bytes",
            f"compression ratio     {self.compression_ratio:>10.2f}x  (every byte; paper's Eq. 1: {self.paper_ratio:.2f}x)",
        ]
        if self.accuracy_original is not None:
            lines.append(f"accuracy original     {self.accuracy_original:>10.2%}")
        if self.accuracy_compressed is not None:
            drop = ""
            if self.accuracy_original is not None:
                drop = f"  ({100 * (self.accuracy_compressed - self.accuracy_original):+.2f} points)"
            lines.append(f"accuracy compressed   {self.accuracy_compressed:>10.2%}{drop}")
        return "\n".join(lines)


def _layer_table(layers: tuple[LayerRow, ...]) -> list[str]:
    width = max([len("total quantized")] + [len(r.name) for r in layers])
    lines = [f"{'layer':<{width}}  {'params':>9}  {'clusters':>8}  {'bits/w':>6}  {'entropy':>7}  {'bytes':>9}"]
    for r in layers:
        lines.append(f"{r.name:<{width}}  {r.params:>9,}  {r.clusters:>8}  {r.bits_per_weight:>6.3f}  "
                     f"{r.entropy_bits:>7.3f}  {r.coded_bytes:>9,}")
    q = sum(r.params for r in layers)
    coded = sum(r.coded_bytes for r in layers)
    entropy = sum(r.entropy_bits * r.params for r in layers) / max(q, 1)
    lines.append(f"{'total quantized':<{width}}  {q:>9,}  {'':>8}  {8 * coded / max(q, 1):>6.3f}  "
                 f"{entropy:>7.3f}  {coded:>9,}")
    return lines


def _codebook_lines(codebooks: tuple[CodebookRow, ...], *, max_values: int = 64) -> list[str]:
    lines = []
    for c in codebooks:
        layers = ", ".join(c.layers) if len(c.layers) <= 3 else f"{len(c.layers)} layers"
        lines.append(f"codebook {c.name}: {c.entries} entries ({c.dtype}), {c.used} used, read by {layers}")
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


def describe_artifacts(path: str | os.PathLike) -> Report:
    """The report of a compressed graph and the sidecar beside it, from those two files alone.

    Exposed as ``onnxhq.report``. Layers, clusters used, entropy, coded bits per weight and the
    codebooks come from the files; ``original_bytes`` is the input size `compress` recorded in the
    graph, or for graphs without it the size of the float model they decode to
    (``original_source="decoded"``); there are no accuracies or settings.

    Raises
    ------
    ModelError : ``path`` is not a graph written by ``onnxhq compress``.
    SidecarError : the sidecar is missing, corrupt, or belongs to another graph.
    """
    # Imported here: `import onnxhq` loads this module eagerly (onnxhq.report is also the
    # function's name), and onnx + numpy would slow every CLI start.
    from pathlib import Path

    import numpy as np

    from . import naming
    from .decode import join_artifacts
    from .rewrite import dequantize_model

    graph_path = Path(path)
    graph, side_path, sidecar, streams, layouts = _read_artifacts(graph_path)
    decoded = join_artifacts(graph, streams)  # checks that the sidecar belongs to this graph
    rows, codebooks = _layers_and_codebooks(decoded, {s.name: s for s in streams}, layouts)
    books = {c.name for c in codebooks}
    unquantized = sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.graph.initializer
                      if t.data_type in _FLOAT_TENSOR_TYPES and t.name not in books)
    graph_bytes = graph_path.stat().st_size
    recorded = {p.key: p.value for p in graph.metadata_props}.get(naming.METADATA_ORIGINAL_BYTES, "")
    original, source = (int(recorded), "input") if recorded.isdigit() else (dequantize_model(decoded).ByteSize(), "decoded")
    return Report(model=graph_path.stem, original_bytes=original,
                  files={str(graph_path.resolve()): graph_bytes, str(side_path.resolve()): len(sidecar)},
                  layers=rows, codebook_bytes=sum(c.entries * np.dtype(c.dtype).itemsize for c in codebooks),
                  unquantized_params=unquantized, graph_bytes=graph_bytes, sidecar_bytes=len(sidecar),
                  codebooks=codebooks, original_source=source)


def _read_artifacts(graph_path):
    """``(graph, sidecar path, sidecar bytes, streams, layouts by stream name)``; errors name the file."""
    from .decode import sidecar_crc32, sidecar_path
    from .errors import SidecarError
    from .model import load_model
    from .sidecar import decode_sidecar, describe_sidecar

    graph = load_model(graph_path)
    side_path = sidecar_path(graph_path, graph)
    try:
        sidecar = side_path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read sidecar {side_path}: {exc.strerror or exc}") from None
    try:
        streams, _ = decode_sidecar(sidecar, crc32=sidecar_crc32(graph))
        layouts = {s.name: s for s in describe_sidecar(sidecar, streams=streams)}
    except SidecarError as exc:
        raise SidecarError(f"sidecar {side_path}: {exc}") from None
    return graph, side_path, sidecar, streams, layouts


def _layers_and_codebooks(graph, streams, layouts) -> tuple[tuple[LayerRow, ...], tuple[CodebookRow, ...]]:
    """A row per dequantize node of ``graph`` (in graph order) and a row per codebook they read."""
    import numpy as np
    from onnx import numpy_helper

    from . import naming

    inits = {t.name: t for t in graph.graph.initializer}
    rows, readers = [], {}
    for node in graph.graph.node:
        if node.domain != naming.DOMAIN:
            continue
        weight, book, index = node.output[0], node.input[0], node.input[1]
        stream, lay = streams[index], layouts[index]
        rows.append(LayerRow(name=weight, params=lay.count, clusters=int(np.unique(stream.indices).size),
                             coded_bytes=lay.payload_bytes + lay.table_bytes,
                             bits_per_weight=lay.coded_bits_per_weight, entropy_bits=lay.entropy_bits))
        readers.setdefault(book, []).append((weight, stream.indices))
    codebooks = []
    for book, uses in readers.items():
        values = numpy_helper.to_array(inits[book]).reshape(-1)
        used = np.unique(np.concatenate([idx.reshape(-1) for _, idx in uses])).size
        codebooks.append(CodebookRow(name=book, entries=int(values.size), used=int(used), dtype=values.dtype.name,
                                     values=tuple(float(v) for v in values), layers=tuple(w for w, _ in uses)))
    return tuple(rows), tuple(codebooks)
