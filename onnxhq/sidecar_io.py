"""Sidecar files a stream at a time: the head for a writer that appends the streams' bytes
itself (`encode.SidecarWriter`), and readers of the header alone or of one stream after another
(`decode.decode_streamed`). The format and its checks are `onnxhq.sidecar`'s; memory holds one
stream, not the file.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping, Sequence

from .coding import unpack
from .coding.layout import Entry
from .errors import SidecarError
from .sidecar import (
    MAGIC,
    MAX_HEADER,
    METADATA_KEY,
    PREFIX,
    SIDECAR_FORMAT_VERSION,
    IndexStream,
    check_prefix,
    check_streams,
    header_shares,
    pack_header,
    unpack_header,
)


def sidecar_head(
    entries: Sequence[tuple[str, Entry]], *, metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """The prefix and compressed header of a sidecar whose streams' entries (`layout.encode_stream`
    plus ``data_offsets`` and ``crc32``) are given in name order, for a writer that puts the
    streams' bytes after it itself; and each stream's share of those bytes, as
    `describe_sidecar` counts it. `encode_sidecar` of the same streams starts with these bytes."""
    header: dict[str, object] = {METADATA_KEY: dict(metadata)} if metadata else {}
    header.update(entries)
    prefix_and_header, _ = pack_header(header)
    return prefix_and_header, header_shares(entries, len(prefix_and_header))


def iter_sidecar_file(
    path: str | os.PathLike, *, crc32: int | None = None
) -> Iterator[IndexStream]:
    """The streams of the sidecar file at ``path`` one at a time, in file order, each read and
    decoded on its own (memory: one stream). Checks as `read_sidecar`; the file's CRC-32 against
    ``crc32`` is checked after the last stream, so a caller writes nothing final before the end."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = _read_head(f)
            running = zlib.crc32(head)
            parsed = _parse_head(head, size)
            for name, entry in parsed:
                begin, end = entry["data_offsets"]
                blob = f.read(end - begin)
                running = zlib.crc32(blob, running)
                if zlib.crc32(blob) != entry["crc32"]:
                    raise SidecarError(f"stream {name!r}: CRC32 mismatch")
                local = dict(entry, data_offsets=[0, len(blob)])
                (part,) = unpack.decode_streams([(name, local)], blob)
                yield IndexStream(name, part.shape, entry["alphabet_size"], part)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {where!r}: {exc}") from None
    except OSError as exc:
        raise SidecarError(f"cannot read sidecar {where!r}: {exc.strerror or exc}") from None
    if crc32 is not None and running != crc32:
        raise SidecarError(
            f"sidecar {where!r} is valid, but not this graph's sidecar: its CRC-32 is "
            f"{running:08x}, the graph records {crc32:08x}; use the .onnxhq file that "
            "'onnxhq compress' wrote with the graph"
        )


def sidecar_entries(path: str | os.PathLike) -> dict[str, Entry]:
    """The checked header entries of the sidecar file at ``path``, by stream name, in file order,
    from its prefix and header alone (the streams' bytes are not read)."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return dict(_parse_head(_read_head(f), os.fstat(f.fileno()).st_size))
    except SidecarError as exc:
        raise SidecarError(f"sidecar {where!r}: {exc}") from None
    except OSError as exc:
        raise SidecarError(f"cannot read sidecar {where!r}: {exc.strerror or exc}") from None


def _read_head(f) -> bytes:
    """The prefix and stored header at the start of open sidecar file ``f``."""
    first = f.read(PREFIX.size)
    if len(first) < PREFIX.size:
        raise SidecarError(f"sidecar of {len(first)} bytes is shorter than its prefix")
    return first + f.read(min(PREFIX.unpack_from(first)[3], MAX_HEADER + 1))


def _parse_head(head: bytes, size: int) -> list[tuple[str, Entry]]:
    """The checked entries, in buffer order, of a ``size``-byte sidecar whose prefix and header
    are ``head``; the streams' offsets must tile the rest of the file (their CRCs are the
    reader's)."""
    magic, version, crc, stored = PREFIX.unpack_from(head)
    if magic != MAGIC or version != SIDECAR_FORMAT_VERSION or stored > MAX_HEADER:
        check_prefix(head)  # raises the message of the first problem
    if PREFIX.size + stored > len(head):
        raise SidecarError(f"header length {stored} exceeds {MAX_HEADER} or the {size}-byte file")
    header = unpack_header(head[PREFIX.size :], crc)
    header.pop(METADATA_KEY, None)
    return check_streams(header, size - len(head))
