"""File writing that never leaves a half-written file, never overwrites an input, and writes a set
of files (a compressed graph and its sidecar) as one.

Every write into a folder happens under an exclusive ``flock`` of that folder (its directory file
descriptor, so no lock file is left behind); readers of a pair take it shared (`reading`). Files
are written to temporary names (``.<name>.<random>.tmp``) in the target folder and fsynced. One
file is then renamed into place. Several are committed through a journal
(``.<first name>.onnxhq-commit``, itself written atomically) listing the renames: once it exists
the write counts as done, and whoever next locks the folder (writer or reader) finishes the
renames a killed process left undone. Temporary files of the names being written that are found
under the lock are leftovers of a killed writer and are removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

#: Suffix of the journal of a multi-file write.
JOURNAL_SUFFIX = ".onnxhq-commit"
#: What a file's content is: its bytes, or a function that writes them to an open binary file.
Content = bytes | Callable[[BinaryIO], None]

#: Files this process was told are inputs (`refuse_overwriting_inputs`): never replaced.
_PROTECTED: set[tuple[int, int]] = set()


def atomic_write_bytes(path: str | os.PathLike, data: Content) -> int:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    Either the whole file appears or nothing does. Returns the number of bytes written.
    """
    path = Path(path)
    return write_files(path.parent, [(path.name, data)])[0]


def write_files(folder: str | os.PathLike, files: Sequence[tuple[str, Content]]) -> list[int]:
    """Write ``files`` (plain names -> content) into ``folder`` as one: a reader that locks the
    folder (`reading`) sees all the old files or all the new ones, also after a ``kill -9``.

    Returns the bytes written, per file. An OSError names the file the user asked for, never a
    temporary one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in files]
    for name in names:
        if Path(name).name != name:
            raise ValueError(f"{name!r} is not a plain file name")
    with _locked(folder, shared=False):
        _recover(folder)
        _remove_stale(folder, names)
        for name in names:
            _check_target(folder / name)
        temps: list[Path] = []
        sizes: list[int] = []
        committed = False
        try:
            for name, content in files:
                tmp, size = _write_temp(folder / name, content)
                temps.append(tmp)
                sizes.append(size)
            if len(files) == 1:
                os.replace(temps[0], folder / names[0])
                _fsync_folder(folder)
            else:
                journal = folder / f".{names[0]}{JOURNAL_SUFFIX}"
                plan = [[t.name, n] for t, n in zip(temps, names)]
                tmp, _ = _write_temp(journal, json.dumps(plan).encode())
                os.replace(tmp, journal)
                _fsync_folder(folder)
                committed = True
                _finish(folder, journal, plan)  # renames, fsyncs the folder
        except BaseException:
            if not committed:  # a committed write is finished by whoever locks the folder next
                for tmp in temps:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            raise
    return sizes


@contextlib.contextmanager
def reading(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` locked shared while reading several files written by `write_files`;
    first finishes a multi-file write a killed process left committed but undone."""
    folder = Path(folder)
    with _locked(folder, shared=True) as fd:
        if fd is not None and _journals(folder):
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):  # a folder the reader may not write: the
                _recover(folder)  # graph's CRC of its sidecar then refuses a mixed pair
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield


def refuse_overwriting_inputs(
    outputs: Sequence[str | os.PathLike], inputs: Sequence[str | os.PathLike]
) -> None:
    """Raise ConfigError when an output path is one of the input files (the same file under
    another name too), or cannot be written: check it before the work.

    The inputs are remembered: `write_files` refuses to replace them later in this process.
    """
    ids = {}
    for p in inputs:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids[(st.st_dev, st.st_ino)] = p
    _PROTECTED.update(ids)
    resolved = {Path(p).resolve(): p for p in inputs}
    for out in outputs:
        path = Path(out)
        hit, what = resolved.get(path.resolve()), ""
        if hit is None:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                hit = ids.get((st.st_dev, st.st_ino))
                what = f" ({hit}, under another name)"
        if hit is not None:
            raise ConfigError(
                f"output {out} would overwrite an input file{what}; choose another output path"
            )
        check_writable(path)


def check_writable(path: str | os.PathLike) -> None:
    """ConfigError unless a file can be written at ``path``: not a folder, and its folder (or the
    nearest one that exists, for folders still to create) is a folder this process may write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output {path}: {parent} is not a folder; choose another output path")
    try:  # a real file, not os.access: root passes access() where nothing can be written
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output {path}: cannot write in folder {parent} ({exc.strerror or exc}); "
            "choose another output path"
        ) from None


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _locked(folder: Path, *, shared: bool) -> Iterator[int | None]:
    """``flock`` the folder's own descriptor (no lock file); None where it cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if not shared:
            raise
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _write_temp(final: Path, content: Content) -> tuple[Path, int]:
    """A fsynced temporary file beside ``final`` holding ``content``; OSErrors name ``final``."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(final)) from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from None
        raise
    return tmp, size


def _check_target(path: Path) -> None:
    """OSError if ``path`` is a folder (a rename would fail half-way) or a protected input."""
    if path.is_dir():
        raise OSError(errno.EISDIR, "is a folder, not a file", str(path))
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in _PROTECTED:
            raise ConfigError(f"output {path} would overwrite an input file; choose another path")


def _journals(folder: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in folder.iterdir() if p.name.endswith(JOURNAL_SUFFIX)]
    return []


def _recover(folder: Path) -> None:
    """Finish every committed write in ``folder`` (caller holds the exclusive lock)."""
    for journal in _journals(folder):
        try:
            plan = json.loads(journal.read_text())
        except (OSError, ValueError):
            plan = []
        _finish(folder, journal, plan)


def _finish(folder: Path, journal: Path, plan: list) -> None:
    for tmp, name in plan:
        if (folder / tmp).exists():
            os.replace(folder / tmp, folder / name)
    _fsync_folder(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)


def _remove_stale(folder: Path, names: Sequence[str]) -> None:
    """Delete temporary files of ``names`` a killed writer left (caller holds the lock)."""
    prefixes = [f".{n}." for n in names] + [f"..{names[0]}{JOURNAL_SUFFIX}."]
    for p in folder.iterdir():
        if p.name.endswith(".tmp") and any(p.name.startswith(x) for x in prefixes):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
