"""Hessian-diagonal files and Adam second-moment states: ``.npz`` arrays keyed by initializer name.

A Hessian file holds one float32 array per weight, shaped like the weight, finite and nonnegative.
`save_hessian` writes it atomically and byte-for-byte deterministically (entries sorted by name,
fixed zip timestamps), so the same diagonal always gives the same file. `load_hessian` and
`read_second_moment` check every entry against the model and raise `DataError` naming the entry.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .._io import atomic_write_bytes
from ..data import read_npz
from ..errors import DataError, NumericalError
from ..training.graph import parameter_shapes

if TYPE_CHECKING:
    import onnx

Shapes = Mapping[str, tuple[int, ...]]
_EPOCH = (
    1980,
    1,
    1,
    0,
    0,
    0,
)  # the earliest zip timestamp: fixed, so files do not depend on the clock


def hessian_bytes(diag: Mapping[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of ``diag`` (float32, sorted by name); NumericalError if invalid."""
    if not diag:
        raise NumericalError("the Hessian diagonal has no entries; nothing to write")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(diag):
            a = np.asarray(diag[name])
            bad = _problem(a)
            if bad:
                raise NumericalError(
                    f"the Hessian diagonal of {name!r} {bad}; refusing to write it"
                )
            with zf.open(
                zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), "w", force_zip64=True
            ) as f:
                np.lib.format.write_array(
                    f, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False
                )
    return buf.getvalue()


def save_hessian(path: str | os.PathLike, diag: Mapping[str, np.ndarray]) -> int:
    """Write ``diag`` to ``path`` as ``.npz`` atomically; returns the bytes written."""
    return atomic_write_bytes(path, hessian_bytes(diag))


def load_hessian(
    path: str | os.PathLike, reference: onnx.ModelProto | Shapes
) -> dict[str, np.ndarray]:
    """Read a Hessian file written by `save_hessian` (or any npz of that layout) and validate it.

    Parameters
    ----------
    path : the ``.npz`` file.
    reference : the model (every entry must name one of its float initializers, with its shape), or
        a mapping name -> shape (every name must be present with that shape; other entries are
        ignored).

    Returns
    -------
    dict name -> float32 array shaped like the weight; finite and nonnegative.
    """
    arrays = read_npz(path, "Hessian file")
    return _validated(arrays, reference, where=f"Hessian file {path}")


def read_second_moment(
    source: str | os.PathLike | Mapping[str, np.ndarray], shapes: Shapes
) -> dict[str, np.ndarray]:
    """Adam's bias-corrected second moment v-hat for each name of ``shapes``, validated (float64).

    ``source`` is an npz keyed by initializer name (as written by ``tools/train_mnist.py``) or a
    mapping of arrays. Entries for other names are ignored.
    """
    if isinstance(source, Mapping):
        arrays, where = {k: np.asarray(v) for k, v in source.items()}, "the Adam state"
    else:
        arrays, where = read_npz(source, "Adam state file"), f"Adam state file {source}"
    return _validated(arrays, shapes, where=where, dtype=np.float64)


def _validated(
    arrays: Mapping[str, np.ndarray],
    reference: onnx.ModelProto | Shapes,
    *,
    where: str,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    if not isinstance(reference, Mapping):
        shapes = parameter_shapes(reference)
        unknown = [n for n in arrays if n not in shapes]
        if unknown:
            raise DataError(
                f"{where}: entry {unknown[0]!r} is not a float initializer of the model "
                f"(it has {_some(shapes)}); was it computed for another model?"
            )
        wanted = list(arrays)
    else:
        shapes = {n: tuple(int(d) for d in s) for n, s in reference.items()}
        missing = [n for n in shapes if n not in arrays]
        if missing:
            raise DataError(
                f"{where} has no entry for weight {missing[0]!r}; it has {_some(arrays)}"
            )
        wanted = list(shapes)
    out = {}
    for name in wanted:
        a = np.asarray(arrays[name])
        if a.dtype.kind != "f":
            raise DataError(
                f"{where}: {name!r} has dtype {a.dtype}; expected floating-point values"
            )
        if a.shape != shapes[name]:
            raise DataError(
                f"{where}: {name!r} has shape {a.shape}, the model's weight has {shapes[name]}"
            )
        bad = _problem(a)
        if bad:
            raise DataError(f"{where}: {name!r} {bad}")
        out[name] = a.astype(dtype)
    return out


def _problem(a: np.ndarray) -> str | None:
    """What makes ``a`` unusable as importances (non-float, non-finite, negative), or None."""
    if a.dtype.kind != "f":
        return f"has dtype {a.dtype}; importances are floating-point"
    finite = np.isfinite(a)
    if not finite.all():
        return f"has {a.size - int(finite.sum())} non-finite entries of {a.size}"
    if a.size and a.min() < 0:
        return (
            f"has {int((a < 0).sum())} negative entries (min {float(a.min()):.3g}); "
            "importances must be >= 0"
        )
    return None


def _some(names, limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return (
        shown + f" and {len(names) - limit} more" if len(names) > limit else shown
    ) or "no entries"
