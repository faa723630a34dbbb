"""Data files: ``.npz`` archives of model inputs and optional labels.

Layout: one array per model input, keyed by the input's name, first axis the sample axis; an
optional integer ``labels`` array of shape (N,). A model with a single input may use ``x`` (and
``y`` for the labels) instead. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .errors import DataError
from .model import InputSpec, input_specs

if TYPE_CHECKING:
    from onnx import ModelProto


@dataclass(frozen=True)
class Dataset:
    """Model inputs (name -> array with N samples on axis 0) and optional labels (N,) int64;
    ``source`` names where they came from in messages (the file's path)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "the data"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches ``(inputs, labels)``; the last one may be smaller."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {k: v[start:stop] for k, v in self.inputs.items()}, labels

    def subset(self, indices: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels, self.source)

    def head(self, n: int | None) -> Dataset:
        return self if n is None or n >= len(self) else self.subset(np.arange(n))


def load_data(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    model: ModelProto | Sequence[InputSpec],
    *,
    need_labels: bool = False,
    max_samples: int | None = None,
) -> Dataset:
    """Read and validate a data file (or mapping of arrays) against a model's runtime inputs.

    ``model`` is the ONNX model or its `input_specs`. Of an ``.npz`` file only the arrays the
    model reads (and the labels) are decompressed, and with ``max_samples`` only their first
    ``max_samples`` samples (the rest of each member is never inflated).
    """
    specs = list(model) if isinstance(model, Sequence) else input_specs(model)
    if not specs:
        raise DataError("the model has no runtime inputs to feed")
    if isinstance(source, Mapping):
        data = _dataset("data", dict(source), specs, need_labels)
        return data.head(max_samples)
    with open_npz(source, max_rows=max_samples) as arrays:
        return _dataset(str(source), arrays, specs, need_labels)


def _dataset(
    where: str, arrays: Mapping[str, np.ndarray], specs: list[InputSpec], need_labels: bool
) -> Dataset:
    aliases = {"x": specs[0].name} if len(specs) == 1 else {}
    label_key = "labels" if "labels" in arrays else ("y" if aliases and "y" in arrays else None)
    inputs = {}
    for spec in specs:
        key = spec.name if spec.name in arrays else None
        if key is None:
            key = next((a for a, t in aliases.items() if t == spec.name and a in arrays), None)
        if key is None:
            hint = " (or 'x')" if aliases else ""
            raise DataError(
                f"{where} has no array for model input {spec.name!r}{hint}; "
                f"it has: {', '.join(sorted(arrays)) or 'nothing'}"
            )
        inputs[spec.name] = _check_input(where, key, np.asarray(arrays[key]), spec)
    sizes = {name: len(a) for name, a in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(
            f"{where}: inputs have different sample counts {sizes}; axis 0 must be the sample axis"
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise DataError(f"{where} holds no samples")
    labels = None
    if label_key is not None:
        labels = _check_labels(where, label_key, np.asarray(arrays[label_key]), n)
    elif need_labels:
        raise DataError(
            f"{where} has no 'labels' array; accuracy and training need integer labels "
            f"of shape ({n},)"
        )
    return Dataset(inputs, labels, where)


def _check_labels(where: str, key: str, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise DataError(
            f"{where}: {key!r} must be integer class labels of shape ({n},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.dtype.kind == "u" and labels.max() >= 2**63:
        raise DataError(
            f"{where}: {key!r} has label {labels.max()}, past int64; class labels are 0..classes-1"
        )
    if labels.min() < 0:
        raise DataError(f"{where}: {key!r} has negative labels (min {labels.min()})")
    return labels.astype(np.int64)


def check_label_range(data: Dataset, classes: int) -> None:
    """DataError unless every label of ``data`` is a class index of a model scoring ``classes``.

    Run before any label reaches onnxruntime: its loss kernels read out of bounds otherwise.
    """
    if data.labels is None:
        return
    labels, where = np.asarray(data.labels), data.source
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels.max() if labels.max() >= classes else labels.min()
        raise DataError(
            f"{where}: label {bad} is not a class of the model, which scores {classes} classes "
            f"(labels 0..{classes - 1}); check the labels match this model"
        )


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive (see `open_npz`); ``what`` names the file in errors."""
    with open_npz(path, what) as arrays:
        return {k: arrays[k] for k in arrays}


@contextmanager
def open_npz(
    path: str | os.PathLike, what: str = "data file", *, max_rows: int | None = None
) -> Iterator[Mapping[str, np.ndarray]]:
    """The arrays of an ``.npz`` archive as a mapping that reads a member when it is accessed.

    Members are streamed from the zip, never through pickle: the ``.npy`` header is parsed
    first, and a member whose declared shape disagrees with its stored size, holds objects,
    or would not fit in the memory available is refused with `DataError` before anything is
    allocated. With ``max_rows`` only the first ``max_rows`` entries of axis 0 are inflated.
    Anything that is not a zip is refused before it is parsed. ``what`` names the file in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{what} {path} is a single .npy array; use an .npz archive keyed by name")
    if not magic.startswith(b"PK"):
        raise DataError(
            f"{what} {path} is not a readable .npz archive (it does not start like a zip file)"
        )
    try:
        archive = zipfile.ZipFile(path)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _npz_error(what, path, exc) from None
    with archive:
        members = {i.filename[:-4]: i for i in archive.infolist() if i.filename.endswith(".npy")}
        if not members:
            raise DataError(f"{what} {path} holds no arrays")
        yield _NpzMembers(archive, members, what, path, max_rows)


class _NpzMembers(Mapping[str, np.ndarray]):
    """Read-only view of an open ``.npz`` zip; each access streams (and checks) one member."""

    def __init__(
        self,
        archive: zipfile.ZipFile,
        members: dict[str, zipfile.ZipInfo],
        what: str,
        path: Path,
        max_rows: int | None,
    ):
        self._archive, self._members, self._what, self._path = archive, members, what, path
        self._max_rows = max_rows

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._members[key]
        try:
            with self._archive.open(info) as f:
                return _read_npy(f, info.file_size, key, self._max_rows, self._where)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise _npz_error(self._what, self._path, exc) from None

    @property
    def _where(self) -> str:
        return f"{self._what} {self._path}"

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)


def _read_npy(f: IO[bytes], stored: int, key: str, max_rows: int | None, where: str) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` (``stored`` bytes), or its first ``max_rows``."""
    version = np.lib.format.read_magic(f)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise DataError(f"{where} holds pickled objects; onnxhq reads plain numeric arrays only")
    count = math.prod(shape)  # exact Python ints: a declared shape of terabytes stays a number
    nbytes = count * dtype.itemsize
    body = stored - f.tell()
    if body != nbytes:
        raise DataError(
            f"{where}: {key!r} declares shape {tuple(shape)} {dtype} ({_size(nbytes)}) but stores "
            f"{_size(max(body, 0))}; the file is broken, re-save it with numpy.savez"
        )
    rows = shape[0] if shape else 1
    take = rows if max_rows is None or fortran or not shape else min(rows, max_rows)
    want = nbytes if take == rows else take * (nbytes // max(rows, 1))
    if want > available_memory():
        raise DataError(
            f"{where}: {key!r} has shape {tuple(shape)} {dtype}: {_size(want)} to read, more than "
            f"the {_size(available_memory())} of memory available; pass fewer samples"
        )
    buffer = bytearray(want)
    view, done = memoryview(buffer), 0
    while done < want:
        got = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise EOFError
        done += got
    out_shape = (take, *shape[1:]) if take != rows else tuple(shape)
    return np.frombuffer(buffer, dtype=dtype).reshape(out_shape, order="F" if fortran else "C")


def available_memory() -> int:
    """Bytes of memory available to allocate now (Linux: MemAvailable; else the physical RAM)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _npz_error(what: str, path: Path, exc: Exception) -> DataError:
    detail = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
    return DataError(f"{what} {path} is not a readable .npz archive ({detail})")


def _check_input(where: str, key: str, array: np.ndarray, spec: InputSpec) -> np.ndarray:
    want_dtype, want_shape = spec.dtype, spec.shape
    if array.dtype.kind not in "fiub":
        raise DataError(f"{where}: {key!r} has dtype {array.dtype}; numeric arrays only")
    if want_dtype.kind == "f" and array.dtype.kind in "iu":
        raise DataError(
            f"{where}: {key!r} is {array.dtype} but input {spec.name!r} takes {want_dtype}; "
            "scale and convert it the way the model was trained (e.g. x / 255 as float32)"
        )
    if want_dtype.kind != array.dtype.kind and not (
        want_dtype.kind in "iu" and array.dtype.kind in "iu"
    ):
        raise DataError(
            f"{where}: {key!r} has dtype {array.dtype}, input {spec.name!r} takes {want_dtype}"
        )
    if want_shape and array.ndim != len(want_shape):
        raise DataError(
            f"{where}: {key!r} has shape {array.shape}, input {spec.name!r} takes rank "
            f"{len(want_shape)} {_fmt_shape(want_shape)}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, want_shape)):
        if axis > 0 and want is not None and got != want:
            raise DataError(
                f"{where}: {key!r} has shape {array.shape}, input {spec.name!r} takes "
                f"{_fmt_shape(want_shape)}"
            )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{where}: {key!r} contains NaN or infinite values")
    return np.ascontiguousarray(array.astype(want_dtype, copy=False))


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def save_data(
    path: str | os.PathLike, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None
) -> None:
    """Write a data file in the layout `load_data` reads."""
    arrays: dict[str, Any] = dict(inputs)  # Any: numpy's stub types the ** of savez as its flags
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    np.savez_compressed(path, **arrays)
