"""Data files: ``.npz`` archives of model inputs and optional labels.

Layout: one array per model input, keyed by the input's name, first axis the sample axis; an
optional integer ``labels`` array of shape (N,). A model with a single input may use ``x`` (and
``y`` for the labels) instead. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError
from .model import InputSpec, input_specs
from .npz import NpzMembers, available_memory, open_npz, read_npz

__all__ = [
    "Dataset",
    "available_memory",
    "check_label_range",
    "load_data",
    "open_npz",
    "read_npz",
    "sample_count",
    "save_data",
]

if TYPE_CHECKING:
    from onnx import ModelProto


@dataclass(frozen=True)
class Dataset:
    """Model inputs (name -> array with N samples on axis 0) and optional labels (N,) int64;
    ``source`` names where they came from in messages (the file's path).

    A dataset read in part (`load_data` with ``rows``) also knows which samples of its source it
    holds: ``rows``, sorted indices into the source's ``total`` samples. Samplers draw indices
    of the whole source (`source_size`) and `take` them from what was read.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "the data"
    rows: np.ndarray | None = None
    total: int | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def source_size(self) -> int:
        """Samples in the source: ``total`` for a dataset read in part, else ``len(self)``."""
        return len(self) if self.rows is None or self.total is None else self.total

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches ``(inputs, labels)``; the last one may be smaller."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {k: v[start:stop] for k, v in self.inputs.items()}, labels

    def subset(self, indices: np.ndarray) -> Dataset:
        """The samples at positions ``indices`` of this dataset, as a dataset of their own."""
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels, self.source)

    def head(self, n: int | None) -> Dataset:
        return self if n is None or n >= len(self) else self.subset(np.arange(n))

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """Where the source's samples ``indices`` sit in this dataset (they must have been read)."""
        indices = np.asarray(indices, np.int64)
        if self.rows is None:
            return indices
        at = np.searchsorted(self.rows, indices)
        held = (at < len(self.rows)) & (self.rows[np.minimum(at, len(self.rows) - 1)] == indices)
        if not held.all():
            raise DataError(
                f"{self.source}: sample {indices[~held][0]} was not read (only {len(self.rows)} "
                f"of its {self.source_size} samples were); read it with load_data(rows=...)"
            )
        return at

    def take(self, indices: np.ndarray) -> Dataset:
        """The source's samples ``indices`` (in that order), read or not in part."""
        return self.subset(self.positions(indices))


def load_data(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    model: ModelProto | Sequence[InputSpec],
    *,
    need_labels: bool = False,
    max_samples: int | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
) -> Dataset:
    """Read and validate a data file (or mapping of arrays) against a model's runtime inputs.

    ``model`` is the ONNX model or its `input_specs`. Of an ``.npz`` file only the arrays the
    model reads (and the labels) are decompressed, and with ``max_samples`` only their first
    ``max_samples`` samples (the rest of each member is never inflated). With ``rows`` (indices
    into the file's N samples, any order, repeats allowed; `sample_count` gives N) only those
    samples are kept, each member inflated up to its last such row: the dataset holds them in
    increasing order, and its `Dataset.take` maps indices of the file onto them.
    """
    specs = list(model) if isinstance(model, Sequence) else input_specs(model)
    if not specs:
        raise DataError("the model has no runtime inputs to feed")
    if isinstance(source, Mapping):
        data = _dataset("data", dict(source), specs, need_labels)
        if rows is None:
            return data.head(max_samples)
        wanted = _wanted("data", rows, len(data))
        return dataclasses.replace(data.subset(wanted), rows=wanted, total=len(data))
    if rows is None:
        with open_npz(source, max_rows=max_samples) as arrays:
            return _dataset(str(source), arrays, specs, need_labels)
    with open_npz(source) as arrays:
        n = _count(str(source), arrays, specs, need_labels)
        wanted = _wanted(str(source), rows, n)
        arrays.rows = wanted
        data = _dataset(str(source), arrays, specs, need_labels)
    return dataclasses.replace(data, rows=wanted, total=n)


def sample_count(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    model: ModelProto | Sequence[InputSpec],
    *,
    need_labels: bool = False,
) -> int:
    """The number of samples N of a data file, from its ``.npy`` headers (nothing inflated).

    Checks what the headers tell: an array for every model input, equal counts on axis 0
    (labels included), at least one sample.
    """
    specs = list(model) if isinstance(model, Sequence) else input_specs(model)
    if not specs:
        raise DataError("the model has no runtime inputs to feed")
    if isinstance(source, Mapping):
        return len(_dataset("data", dict(source), specs, need_labels))
    with open_npz(source) as arrays:
        return _count(str(source), arrays, specs, need_labels)


def _wanted(where: str, rows: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    wanted = np.unique(np.asarray(rows, np.int64))
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= n):
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise DataError(f"{where} holds {n} samples; sample {bad} does not exist")
    return wanted


def _keys(
    where: str, names: Collection[str], specs: list[InputSpec], need_labels: bool
) -> tuple[dict[str, str], str | None]:
    """The array key of each model input (input name -> key) and the labels' key, if any."""
    aliases = {"x": specs[0].name} if len(specs) == 1 else {}
    label_key = "labels" if "labels" in names else ("y" if aliases and "y" in names else None)
    keys = {}
    for spec in specs:
        key = spec.name if spec.name in names else None
        if key is None:
            key = next((a for a, t in aliases.items() if t == spec.name and a in names), None)
        if key is None:
            hint = " (or 'x')" if aliases else ""
            raise DataError(
                f"{where} has no array for model input {spec.name!r}{hint}; "
                f"it has: {', '.join(sorted(names)) or 'nothing'}"
            )
        keys[spec.name] = key
    return keys, label_key


def _count(where: str, arrays: NpzMembers, specs: list[InputSpec], need_labels: bool) -> int:
    keys, label_key = _keys(where, list(arrays), specs, need_labels)
    shapes = {name: arrays.shape(key) for name, key in keys.items()}
    scalar = next((name for name, shape in shapes.items() if not shape), None)
    if scalar is not None:
        raise DataError(f"{where}: {keys[scalar]!r} is a scalar; put the samples on axis 0")
    sizes = {name: shape[0] for name, shape in shapes.items()}
    _check_counts(where, sizes)
    n = next(iter(sizes.values()))
    if label_key is not None:
        shape = arrays.shape(label_key)
        if len(shape) != 1 or shape[0] != n:
            raise DataError(
                f"{where}: {label_key!r} must be integer class labels of shape ({n},), "
                f"got shape {tuple(shape)}"
            )
    elif need_labels:
        raise _no_labels(where, n)
    return n


def _check_counts(where: str, sizes: dict[str, int]) -> None:
    if len(set(sizes.values())) != 1:
        raise DataError(
            f"{where}: inputs have different sample counts {sizes}; axis 0 must be the sample axis"
        )
    if next(iter(sizes.values())) == 0:
        raise DataError(f"{where} holds no samples")


def _no_labels(where: str, n: int) -> DataError:
    return DataError(
        f"{where} has no 'labels' array; accuracy and training need integer labels of shape ({n},)"
    )


def _dataset(
    where: str, arrays: Mapping[str, np.ndarray], specs: list[InputSpec], need_labels: bool
) -> Dataset:
    keys, label_key = _keys(where, list(arrays), specs, need_labels)
    inputs = {
        name: _check_input(where, key, np.asarray(arrays[key]), spec)
        for spec in specs
        for name, key in [(spec.name, keys[spec.name])]
    }
    sizes = {name: len(a) for name, a in inputs.items()}
    _check_counts(where, sizes)
    n = next(iter(sizes.values()))
    labels = None
    if label_key is not None:
        labels = _check_labels(where, label_key, np.asarray(arrays[label_key]), n)
    elif need_labels:
        raise _no_labels(where, n)
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
