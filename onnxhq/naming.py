"""The one place where onnxhq makes tensor, node and file names."""

from __future__ import annotations

DOMAIN = "onnxhq"
DEQUANTIZE_OP = "Dequantize"
GROUPED_OP = "DequantizeGrouped"
PACKED_OP = "DequantizePacked4"
METADATA_SIDECAR = "onnxhq.sidecar"
METADATA_VERSION = "onnxhq.version"
METADATA_ORIGINAL_BYTES = "onnxhq.original_bytes"
METADATA_SIDECAR_CRC = "onnxhq.sidecar_crc32"
GRAPH_SUFFIX = ".onnx"
SIDECAR_SUFFIX = ".onnxhq"


def index_tensor(weight: str) -> str:
    """Name of the index tensor that replaces initializer ``weight``."""
    return f"{weight}.onnxhq_indices"


def codebook_tensor(key: str) -> str:
    """Name of codebook ``key`` ("shared" for one network-wide codebook, else a weight name)."""
    return f"onnxhq.codebook.{key}"


def codebook_size_tensor(codebook: str) -> str:
    """Name of the int64 scalar holding the row length k of grouped codebook tensor ``codebook``."""
    return f"{codebook}.k"


def shape_tensor(shape: tuple[int, ...]) -> str:
    """Name of the int64 initializer holding a packed weight's shape (shared by weights of one
    shape)."""
    return "onnxhq.shape." + "x".join(str(d) for d in shape)


def folded_bias(output: str) -> str:
    """Name of the bias a layer writing ``output`` gets when a BatchNormalization is folded in."""
    return f"{output}.folded_bias"


def dequantize_node(weight: str) -> str:
    return f"{weight}.onnxhq_dequantize"


def artifact_names(stem: str) -> tuple[str, str]:
    """File names of the compressed graph and its sidecar for a model called ``stem``."""
    return stem + GRAPH_SUFFIX, stem + SIDECAR_SUFFIX
