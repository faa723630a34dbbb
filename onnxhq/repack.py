"""``repack``: write an existing graph + sidecar pair again with the current writer, without
quantizing again.

Artifacts written before the graph clean-up (`onnxhq.compact`: short names, no doc strings,
default attributes or inner shape annotations) or in graph format 1 keep their exporter's names
and annotations. `repack` decodes the pair (`onnxhq.decode`), applies the clean-up and the
current encoder (`onnxhq.encode.split_artifacts`: the current graph format, its
sidecar under the new stream names) and returns the new pair. Codebooks and indices are carried
over as they are, so every decoded weight is bit-identical to the old pair's; only names change
(``names``). The input size the graph recorded (``onnxhq.original_bytes``) is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import naming
from ._io import refuse_overwriting_inputs, write_files
from .compact import compact_graph, name_plan
from .decode import join_artifacts, read_pair, sidecar_path
from .encode import Artifacts, split_artifacts
from .errors import ConfigError
from .model import external_files, get_metadata
from .sidecar import IndexStream, read_sidecar

__all__ = ["Repacked", "repack", "repack_file"]


@dataclass(frozen=True)
class Repacked:
    """A pair written again.

    Attributes
    ----------
    artifacts : the new graph + sidecar (`onnxhq.encode.Artifacts`).
    names : each quantized weight's name in the old pair -> its name in the new one.
    before : file name -> bytes of the pair read (graph, its external data, sidecar).
    """

    artifacts: Artifacts
    names: dict[str, str]
    before: dict[str, int]

    @property
    def after(self) -> dict[str, int]:
        """File name -> bytes of the new pair."""
        a = self.artifacts
        return {
            a.graph_name: len(a.graph_bytes),
            a.sidecar_name: a.sidecar_size,
            **{name: size for name, _, size in a.graph_data},
        }


def repack(path: str | os.PathLike, *, name: str | None = None) -> Repacked:
    """The compressed graph at ``path`` and the sidecar beside it, written again in memory with
    short names (`onnxhq.compact`) and the current graph format; nothing is quantized again.

    ``name`` is the new pair's stem (default: the graph file's). Raises ModelError or
    SidecarError as `onnxhq.decode.load` does for a pair it cannot read.
    """
    path = Path(path)
    stem = path.stem if name is None else name
    if not stem or Path(stem).name != stem:
        raise ConfigError(f"name {stem!r} must be a plain file stem (no folder)")
    graph, streams = read_pair(path, _streams)
    before = {f.name: f.stat().st_size for f in [path, *external_files(path)]}
    before[sidecar_path(path, graph).name] = sidecar_path(path, graph).stat().st_size
    recorded = get_metadata(graph).get(naming.METADATA_ORIGINAL_BYTES)
    model = join_artifacts(graph, streams, in_place=True)
    plan = name_plan(model)
    weights = [n.output[0] for n in model.graph.node if n.domain == naming.DOMAIN]
    artifacts = split_artifacts(
        compact_graph(model, plan),
        stem,
        original_bytes=int(recorded) if recorded is not None and recorded.isdigit() else None,
    )
    return Repacked(artifacts, {w: plan.value(w) for w in weights}, before)


def repack_file(
    path: str | os.PathLike, directory: str | os.PathLike, *, name: str | None = None
) -> tuple[Repacked, list[Path]]:
    """`repack` the pair at ``path`` and write the new one into ``directory`` (as one:
    `onnxhq._io.write_files`); refused, before any work, where it would replace the pair read.
    Returns the result and the absolute paths written."""
    path, directory = Path(path), Path(directory)
    stem = path.stem if name is None else name
    targets = [directory / n for n in naming.artifact_names(stem)]
    refuse_overwriting_inputs(targets, [path, *_sidecar_guess(path)])
    result = repack(path, name=name)
    files = result.artifacts.files()
    write_files(directory, files)
    return result, [(directory / n).resolve() for n, _ in files]


def _streams(side: Path, crc32: int | None) -> list[IndexStream]:
    return read_sidecar(side, crc32=crc32)[0]


def _sidecar_guess(path: Path) -> list[Path]:
    """The sidecar compress would have written beside ``path`` (the recorded name is read later,
    with the pair; this only keeps an output from landing on it)."""
    return [path.with_name(naming.artifact_names(path.stem)[1])]
