"""Data files: ``.npz`` archives of model inputs and optional labels.

Layout: one array per model input, keyed by the input's name, first axis the sample axis; an
optional integer ``labels`` array of shape (N,). A model with a single input may use ``x`` (and
``y`` for the labels) instead. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import DataError
from .model import elem_dtype, runtime_inputs, static_shape


@dataclass(frozen=True)
class Dataset:
    """Model inputs (name -> array with N samples on axis 0) and optional labels (N,) int64."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches ``(inputs, labels)``; the last one may be smaller."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {k: v[start:stop] for k, v in self.inputs.items()}, labels

    def subset(self, indices: np.ndarray) -> "Dataset":
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels)

    def head(self, n: int | None) -> "Dataset":
        return self if n is None or n >= len(self) else self.subset(np.arange(n))


def load_data(source: str | os.PathLike | dict, model: onnx.ModelProto, *, need_labels: bool = False) -> Dataset:
    """Read and validate a data file (or dict of arrays) against ``model``'s runtime inputs."""
    where = "data" if isinstance(source, dict) else str(source)
    arrays = dict(source) if isinstance(source, dict) else read_npz(source)
    specs = runtime_inputs(model)
    if not specs:
        raise DataError("the model has no runtime inputs to feed")
    aliases = {"x": specs[0].name} if len(specs) == 1 else {}
    label_key = "labels" if "labels" in arrays else ("y" if aliases and "y" in arrays else None)
    inputs = {}
    for spec in specs:
        key = spec.name if spec.name in arrays else next((a for a, t in aliases.items() if t == spec.name and a in arrays), None)
        if key is None:
            hint = " (or 'x')" if aliases else ""
            raise DataError(f"{where} has no array for model input {spec.name!r}{hint}; it has: {', '.join(sorted(arrays)) or 'nothing'}")
        inputs[spec.name] = _check_input(where, key, np.asarray(arrays[key]), spec)
    sizes = {name: len(a) for name, a in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{where}: inputs have different sample counts {sizes}; axis 0 must be the sample axis")
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError(f"{where} holds no samples")
    labels = None
    if label_key is not None:
        labels = np.asarray(arrays[label_key])
        if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
            raise DataError(f"{where}: {label_key!r} must be integer class labels of shape ({n},), "
                            f"got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise DataError(f"{where}: {label_key!r} has negative labels (min {labels.min()})")
        labels = labels.astype(np.int64)
    elif need_labels:
        raise DataError(f"{where} has no 'labels' array; accuracy and training need integer labels of shape ({n},)")
    return Dataset(inputs, labels)


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive, read with ``allow_pickle=False``; ``what`` names it in errors.

    Anything that is not a zip is refused before numpy sees it: ``np.load`` would try to unpickle it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{what} {path} is a single .npy array; use an .npz archive keyed by name")
    if not magic.startswith(b"PK"):
        raise DataError(f"{what} {path} is not a readable .npz archive (it does not start like a zip file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{what} {path} holds pickled objects; onnxhq reads plain numeric arrays only") from None
        raise DataError(f"{what} {path} is not a readable .npz archive ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what} {path} is not a readable .npz archive ({type(exc).__name__})") from None
    if not arrays:
        raise DataError(f"{what} {path} holds no arrays")
    return arrays


def _check_input(where: str, key: str, array: np.ndarray, spec: onnx.ValueInfoProto) -> np.ndarray:
    want_dtype = elem_dtype(spec)
    want_shape = static_shape(spec)
    if array.dtype.kind not in "fiub":
        raise DataError(f"{where}: {key!r} has dtype {array.dtype}; numeric arrays only")
    if want_dtype.kind == "f" and array.dtype.kind in "iu":
        raise DataError(f"{where}: {key!r} is {array.dtype} but input {spec.name!r} takes {want_dtype}; "
                        f"scale and convert it the way the model was trained (e.g. x / 255 as float32)")
    if want_dtype.kind != array.dtype.kind and not (want_dtype.kind in "iu" and array.dtype.kind in "iu"):
        raise DataError(f"{where}: {key!r} has dtype {array.dtype}, input {spec.name!r} takes {want_dtype}")
    if want_shape and array.ndim != len(want_shape):
        raise DataError(f"{where}: {key!r} has shape {array.shape}, input {spec.name!r} takes rank "
                        f"{len(want_shape)} {_fmt_shape(want_shape)}")
    for axis, (got, want) in enumerate(zip(array.shape, want_shape)):
        if axis > 0 and want is not None and got != want:
            raise DataError(f"{where}: {key!r} has shape {array.shape}, input {spec.name!r} takes {_fmt_shape(want_shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{where}: {key!r} contains NaN or infinite values")
    return np.ascontiguousarray(array.astype(want_dtype, copy=False))


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def save_data(path: str | os.PathLike, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None) -> None:
    """Write a data file in the layout `load_data` reads."""
    arrays = dict(inputs)
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    np.savez_compressed(path, **arrays)
