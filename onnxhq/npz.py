"""``.npz`` archives read member by member, never through pickle, and only as far as needed.

`open_npz` parses each member's ``.npy`` header first and refuses objects, a declared shape that
disagrees with the stored size, or more than the memory available, before allocating anything.
Of a member it reads all samples, the first ``max_rows``, or the samples at chosen indices
(``rows``), inflating nothing past the last one wanted.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from .errors import DataError


def read_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive (see `open_npz`); ``what`` names the file in errors."""
    with open_npz(path, what) as arrays:
        return {k: arrays[k] for k in arrays}


@contextmanager
def open_npz(
    path: str | os.PathLike, what: str = "data file", *, max_rows: int | None = None
) -> Iterator[NpzMembers]:
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
        yield NpzMembers(archive, members, what, path, max_rows)


class NpzMembers(Mapping[str, np.ndarray]):
    """Read-only view of an open ``.npz`` zip; each access streams (and checks) one member.

    ``rows`` (sorted unique sample indices), when set, keeps only those samples of each member
    read; ``max_rows`` only the first ones.
    """

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
        self.rows: np.ndarray | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        return self._open(key, lambda f, stored: _read_npy(f, stored, key, self._take, self._where))

    def shape(self, key: str) -> tuple[int, ...]:
        """The declared shape of member ``key``, from its header alone (checked like a read)."""
        return self._open(key, lambda f, stored: _header(f, stored, key, self._where)[0])

    def _open(self, key: str, read):
        info = self._members[key]
        try:
            with self._archive.open(info) as f:
                return read(f, info.file_size)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise _npz_error(self._what, self._path, exc) from None

    @property
    def _take(self) -> int | np.ndarray | None:
        return self.rows if self.rows is not None else self._max_rows

    @property
    def _where(self) -> str:
        return f"{self._what} {self._path}"

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)


#: Bytes inflated at a time when only some rows of a member are kept.
_CHUNK = 16 * 2**20


def _header(
    f: IO[bytes], stored: int, key: str, where: str
) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran, dtype) of the ``.npy`` stream ``f`` of ``stored`` bytes, checked: plain
    numbers, and a body of exactly the declared size."""
    version = np.lib.format.read_magic(f)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise DataError(f"{where} holds pickled objects; onnxhq reads plain numeric arrays only")
    nbytes = math.prod(shape) * dtype.itemsize  # exact ints: a shape of terabytes stays a number
    body = stored - f.tell()
    if body != nbytes:
        raise DataError(
            f"{where}: {key!r} declares shape {tuple(shape)} {dtype} ({_size(nbytes)}) but stores "
            f"{_size(max(body, 0))}; the file is broken, re-save it with numpy.savez"
        )
    return tuple(shape), fortran, dtype


def _read_npy(
    f: IO[bytes], stored: int, key: str, take: int | np.ndarray | None, where: str
) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` (``stored`` bytes): whole, its first ``take``
    samples (an int), or the samples at the sorted indices ``take`` (an array)."""
    shape, fortran, dtype = _header(f, stored, key, where)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    chosen = isinstance(take, np.ndarray) and bool(shape)
    if chosen and not fortran:
        assert isinstance(take, np.ndarray)
        _check_fits(where, key, shape, dtype, len(take) * row_bytes)
        return _read_rows(f, take, shape, dtype)
    # the first rows are contiguous in C order; a Fortran-order array or a scalar is read whole
    first = take is not None and not isinstance(take, np.ndarray) and bool(shape) and not fortran
    count = min(shape[0], int(take)) if first else (shape[0] if shape else 1)  # type: ignore[arg-type]
    _check_fits(where, key, shape, dtype, count * row_bytes)
    buffer = bytearray(count * row_bytes)
    _read_into(f, memoryview(buffer))
    out_shape = (count, *shape[1:]) if shape else ()
    array = np.frombuffer(buffer, dtype=dtype).reshape(out_shape, order="F" if fortran else "C")
    return array[take] if chosen else array


def _read_rows(
    f: IO[bytes], take: np.ndarray, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Rows ``take`` (sorted, unique) of a C-order member, inflating ``_CHUNK`` bytes at a time
    and nothing past the last row wanted."""
    out = np.empty((len(take), *shape[1:]), dtype)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if not len(take) or not row_bytes:
        return out
    step = max(1, _CHUNK // row_bytes)
    buffer = bytearray(step * row_bytes)
    done = 0
    last = int(take[-1]) + 1
    for start in range(0, last, step):
        stop = min(start + step, last)
        _read_into(f, memoryview(buffer)[: (stop - start) * row_bytes])
        chunk = np.frombuffer(buffer, dtype, count=(stop - start) * (row_bytes // dtype.itemsize))
        chunk = chunk.reshape(stop - start, *shape[1:])
        end = done + int(np.searchsorted(take[done:], stop))
        out[done:end] = chunk[take[done:end] - start]
        done = end
    return out


def _read_into(f: IO[bytes], view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise EOFError
        done += got


def _check_fits(where: str, key: str, shape: tuple[int, ...], dtype: np.dtype, want: int) -> None:
    if want > available_memory():
        raise DataError(
            f"{where}: {key!r} has shape {tuple(shape)} {dtype}: {_size(want)} to read, more than "
            f"the {_size(available_memory())} of memory available; pass fewer samples"
        )


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
