"""Weights in external data files, read one tensor at a time.

A model `model.load_model` reads with ``lazy`` keeps its main graph's external initializers as
references: `read_weight` reads one of them from its file when it is needed, `drop_weight` frees
the bytes a weight holds in the message once it has been used, and `load_external` reads the
ones still wanted (the tensors a compressed graph keeps as they were). A location outside the
model's folder, also through a symlink, is refused without being opened.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import graphfile
from .errors import ModelError
from .graphfile import one_line


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _load_external(tensors, path: Path) -> None:
    """Read the bytes of the external ``tensors`` of the model at ``path`` into them (onnx
    refuses a location outside the model's folder)."""
    try:
        for t in tensors:
            if _is_external(t):
                onnx.external_data_helper.load_external_data_for_tensor(t, str(path.parent))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
    # onnx raises OSError, ValueError or its checker's ValidationError
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot read its external data files ({one_line(exc)}); "
            "keep them beside the model, inside its folder"
        ) from None


def _external_span(t: onnx.TensorProto, folder: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of external tensor ``t``: a file inside ``folder`` (a location that
    escapes it, also through a symlink, is refused without being opened) holding the range."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    base = folder.resolve()
    file = (base / location).resolve()
    if not location or Path(location).is_absolute() or not file.is_relative_to(base):
        raise ModelError(
            f"tensor {t.name!r}: external data location {location!r} is outside the model's "
            "folder; keep the data files beside the model"
        )
    if not file.is_file():
        raise ModelError(f"tensor {t.name!r}: external data file {file} does not exist")
    offset = int(info.get("offset", "0") or 0)
    bits = graphfile.element_bits(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64))
    length = int(info["length"]) if info.get("length", "").isdigit() else -(-count * bits // 8)
    if offset < 0 or offset + length > file.stat().st_size:
        raise ModelError(
            f"tensor {t.name!r}: bytes {offset}..{offset + length} are past the end of "
            f"{file.name} ({file.stat().st_size} bytes); the file is truncated"
        )
    return file, offset, length


def read_weight(
    model: onnx.ModelProto, name: str, path: str | os.PathLike | None = None
) -> np.ndarray:
    """The value of initializer ``name`` (a fresh array): from the message, or from its external
    data file beside the model file at ``path`` (one `load_model` read with ``lazy``). A NaN is
    refused."""
    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    if tensor is None:
        raise ModelError(f"the model has no initializer named {name!r}")
    if not _is_external(tensor):
        value = numpy_helper.to_array(tensor).copy()
    else:
        if path is None:
            raise ModelError(f"tensor {name!r} is external; load the model from its path")
        file, offset, length = _external_span(tensor, Path(path).parent)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        shape = tuple(int(d) for d in tensor.dims)
        with open(file, "rb") as f:
            f.seek(offset)
            value = np.fromfile(f, dtype=dtype, count=length // dtype.itemsize)
        value = value.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    if value.dtype.kind == "f" and np.isnan(value).any():
        raise ModelError(f"tensor {name!r} holds {int(np.isnan(value).sum()):,} NaN values")
    return value


def drop_weight(model: onnx.ModelProto, name: str) -> None:
    """Free, in place, the bytes initializer ``name`` holds in the message (its dims stay)."""
    for t in model.graph.initializer:
        if t.name == name and not _is_external(t):
            for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                t.ClearField(field)


def load_external(model: onnx.ModelProto, path: str | os.PathLike | None) -> None:
    """Read, in place, the bytes of every initializer still in an external data file of the
    model file at ``path`` (one `load_model` read with ``lazy``)."""
    if path is not None:
        _load_external(list(model.graph.initializer), Path(path))
