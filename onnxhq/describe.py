"""The report of saved artifacts (compressed graph + sidecar), from those two files alone.

Exposed as ``onnxhq.report`` and by ``onnxhq report``. The original model is not needed: there
are no accuracies or settings, and when the graph does not record the input's size the decoded
float model stands in for it (``original_source="decoded"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import naming
from ._io import reading
from .decode import join_artifacts, sidecar_crc32, sidecar_path
from .errors import SidecarError
from .model import (
    count_float_params,
    external_files,
    get_metadata,
    load_model,
    read_initializers,
)
from .report import Report, codebook_rows, layer_rows
from .rewrite import dequantize_model
from .sidecar import decode_sidecar, describe_sidecar


def describe_artifacts(path: str | os.PathLike) -> Report:
    """The report of the compressed graph at ``path`` and the sidecar beside it.

    Layers, clusters used, entropy, coded bits per weight and the codebooks come from the files;
    ``original_bytes`` is the input size `compress` recorded in the graph, or for graphs without
    it the size of the float model they decode to (``original_source="decoded"``).

    Raises
    ------
    ModelError : ``path`` is not a graph written by ``onnxhq compress``.
    SidecarError : the sidecar is missing, corrupt, or belongs to another graph.
    """
    graph_path = Path(path)
    with reading(graph_path.parent):  # the pair as one write left it (`_io.write_files`)
        graph = load_model(graph_path)
        graph_files = [graph_path, *external_files(graph_path)]  # a graph past 2 GB has two
        graph_sizes = {str(f.resolve()): f.stat().st_size for f in graph_files}
        side_path = sidecar_path(graph_path, graph)
        try:
            sidecar = side_path.read_bytes()
        except OSError as exc:
            raise SidecarError(f"cannot read sidecar {side_path}: {exc.strerror or exc}") from None
    try:
        streams, _ = decode_sidecar(sidecar, crc32=sidecar_crc32(graph))
        layouts = describe_sidecar(sidecar, streams=streams)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {side_path}: {exc}") from None
    decoded = join_artifacts(graph, streams)  # also checks that the sidecar belongs to this graph

    by_stream = {s.name: s.indices for s in streams}
    readers: dict[str, str] = {}  # weight -> codebook, in graph order
    indices: dict[str, np.ndarray] = {}
    for node in decoded.graph.node:
        if node.domain == naming.DOMAIN:
            weight = node.output[0]
            readers[weight] = node.input[0]
            indices[weight] = by_stream[node.input[1]]
    books = read_initializers(decoded, list(dict.fromkeys(readers.values())))
    codebooks = codebook_rows(books, readers, indices)

    recorded = get_metadata(graph).get(naming.METADATA_ORIGINAL_BYTES, "")
    if recorded.isdigit():
        original, source = int(recorded), "input"
    else:
        original, source = dequantize_model(decoded).ByteSize(), "decoded"
    return Report(
        model=graph_path.stem,
        original_bytes=original,
        files={
            **graph_sizes,
            str(side_path.resolve()): len(sidecar),
        },
        layers=layer_rows(indices, layouts),
        codebook_bytes=sum(int(b.nbytes) for b in books.values()),
        unquantized_params=count_float_params(graph, exclude=set(books)),
        graph_bytes=sum(graph_sizes.values()),
        sidecar_bytes=len(sidecar),
        codebooks=codebooks,
        original_source=source,
    )
