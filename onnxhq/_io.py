"""File writing that never leaves a half-written file and never overwrites an input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    Either the whole file appears or nothing does. Returns the number of bytes written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return len(data)


def refuse_overwriting_inputs(
    outputs: list[str | os.PathLike], inputs: list[str | os.PathLike]
) -> None:
    """Raise ConfigError when an output path is one of the input files."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for out in outputs:
        if Path(out).resolve() in resolved_inputs:
            raise ConfigError(
                f"output {out} would overwrite an input file; choose another output path"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
