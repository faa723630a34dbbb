"""Size and accuracy reports: a frozen record, its stable JSON form, and a text table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


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
class Report:
    """Everything `compress` measured. Sizes are bytes; accuracies fractions in [0, 1].

    ``compressed_bytes`` counts every file decoding needs (graph + sidecar); ``original_bytes`` the
    input model's file(s). ``paper_ratio`` is Choi et al.'s Eq. 1 figure (32-bit parameters against
    index bits + codebooks + unquantized parameters), shown for comparison with the paper.
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
    def paper_ratio(self) -> float:
        total = self.quantized_params + self.unquantized_params
        coded_bits = 8 * sum(r.coded_bytes for r in self.layers) + 8 * self.codebook_bytes + 32 * self.unquantized_params
        return 32 * total / max(coded_bits, 1)

    def with_files(self, files: dict[str, int]) -> "Report":
        return replace(self, files=dict(files))

    def to_dict(self) -> dict:
        """The JSON report. Key names are stable: scripts are written against them."""
        out = {
            "model": self.model,
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "compression_ratio": self.compression_ratio,
            "paper_ratio": self.paper_ratio,
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
        if self.accuracy_original is not None or self.accuracy_compressed is not None:
            out["accuracy"] = {"original": self.accuracy_original, "compressed": self.accuracy_compressed}
        return out

    def to_text(self) -> str:
        """A table per layer and the totals, for a terminal."""
        width = max([len("layer")] + [len(r.name) for r in self.layers])
        lines = [f"{'layer':<{width}}  {'params':>9}  {'clusters':>8}  {'bits/w':>6}  {'entropy':>7}  {'bytes':>9}"]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.params:>9,}  {r.clusters:>8}  {r.bits_per_weight:>6.3f}  "
                         f"{r.entropy_bits:>7.3f}  {r.coded_bytes:>9,}")
        q = self.quantized_params
        coded = sum(r.coded_bytes for r in self.layers)
        lines.append(f"{'total quantized':<{width}}  {q:>9,}  {'':>8}  {8 * coded / max(q, 1):>6.3f}  "
                     f"{'':>7}  {coded:>9,}")
        lines += [
            "",
            f"codebooks             {self.codebook_bytes:>10,} bytes",
            f"unquantized params    {self.unquantized_params:>10,} (kept as they were, in the graph)",
            f"graph file            {self.graph_bytes:>10,} bytes (structure, codebooks, unquantized tensors)",
            f"sidecar file          {self.sidecar_bytes:>10,} bytes (Huffman-coded indices)",
            f"original model        {self.original_bytes:>10,} bytes",
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
