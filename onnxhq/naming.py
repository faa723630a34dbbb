"""The one place where onnxhq makes tensor, node and file names."""

from __future__ import annotations

DOMAIN = "onnxhq"
DEQUANTIZE_OP = "Dequantize"
METADATA_SIDECAR = "onnxhq.sidecar"
METADATA_VERSION = "onnxhq.version"
GRAPH_SUFFIX = ".onnx"
SIDECAR_SUFFIX = ".onnxhq"


def index_tensor(weight: str) -> str:
    """Name of the index tensor that replaces initializer ``weight``."""
    return f"{weight}.onnxhq_indices"


def codebook_tensor(key: str) -> str:
    """Name of codebook ``key`` ("shared" for one network-wide codebook, else a weight name)."""
    return f"onnxhq.codebook.{key}"


def dequantize_node(weight: str) -> str:
    return f"{weight}.onnxhq_dequantize"


def artifact_names(stem: str) -> tuple[str, str]:
    """File names of the compressed graph and its sidecar for a model called ``stem``."""
    return stem + GRAPH_SUFFIX, stem + SIDECAR_SUFFIX
