"""onnxhq._io: files written whole, a pair written as one (under kill -9 and concurrent writers),
inputs never overwritten, output paths checked before the work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onnxhq import _io
from onnxhq._io import (
    JOURNAL_SUFFIX,
    atomic_write_bytes,
    check_writable,
    reading,
    refuse_overwriting_inputs,
    write_files,
)
from onnxhq.errors import ConfigError

PAIR = ("m.onnx", "m.onnxhq")


def pair(token: str, size: int = 1 << 16) -> list[tuple[str, bytes]]:
    """Graph and sidecar contents that both start with ``token``."""
    body = (token.encode() + b"|").ljust(size, b".")
    return [(PAIR[0], b"G" + body), (PAIR[1], b"S" + body)]


def read_pair(folder: Path) -> tuple[str, str]:
    with reading(folder):
        graph, sidecar = ((folder / n).read_bytes() for n in PAIR)
    return graph[1:].split(b"|")[0].decode(), sidecar[1:].split(b"|")[0].decode()


def test_a_pair_is_written_whole_and_leaves_no_temporary_file(tmp_path):
    assert write_files(tmp_path / "new", pair("one")) == [1 + (1 << 16)] * 2
    assert read_pair(tmp_path / "new") == ("one", "one")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(PAIR)


#: Runs in a child: writes pair "old", then pair "new" killing itself after step STEP.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from onnxhq import _io
    from test_io import pair
    folder, step = Path(sys.argv[1]), int(sys.argv[2])
    _io.write_files(folder, pair("old"))
    count = 0
    def after(fn):
        def wrapped(*args, **kwargs):
            global count
            out = fn(*args, **kwargs)
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped
    _io._write_temp = after(_io._write_temp)
    _io.os.replace = after(os.replace)
    _io.write_files(folder, pair("new"))
    """
)

#: write_files's steps: temp graph, temp sidecar, temp journal, journal renamed (the commit),
#: graph renamed, sidecar renamed.
STEPS = 6


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_kill_at_any_step_leaves_a_whole_pair_old_before_the_commit_new_after(tmp_path, step):
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path), str(step)],
        cwd=Path(__file__).parent,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    expected = "old" if step < 4 else "new"
    assert read_pair(tmp_path) == (expected, expected)
    write_files(tmp_path, pair("next"))  # cleans what the killed writer left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PAIR)
    assert read_pair(tmp_path) == ("next", "next")


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from onnxhq import _io
    from test_io import pair
    for i in range(int(sys.argv[3])):
        _io.write_files(Path(sys.argv[1]), pair(f"{sys.argv[2]}{i}", 1 << 18))
    """
)


def test_concurrent_writers_and_a_reader_always_see_one_pair(tmp_path):
    rounds = 25
    write_files(tmp_path, pair("start"))
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), name, str(rounds)],
            cwd=Path(__file__).parent,
        )
        for name in ("a", "b")
    ]
    seen = set()
    while any(w.poll() is None for w in writers):
        graph, sidecar = read_pair(tmp_path)
        assert graph == sidecar
        seen.add(graph)
    assert [w.wait() for w in writers] == [0, 0]
    graph, sidecar = read_pair(tmp_path)
    assert graph == sidecar and graph in {f"a{rounds - 1}", f"b{rounds - 1}"}
    assert len(seen) > 1  # the reader did see writes go by
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PAIR)


def test_a_full_disk_names_the_users_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def full(_file):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, full)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert target.read_bytes() == b"previous"


def test_an_input_is_never_replaced_under_any_name(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_PROTECTED", set())
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    os.link(model, tmp_path / "alias.onnx")
    with pytest.raises(ConfigError, match=r"output .*model.onnx would overwrite an input file;"):
        refuse_overwriting_inputs([tmp_path / "sub/../model.onnx"], [model])
    with pytest.raises(ConfigError, match=r"\(.*model.onnx, under another name\)"):
        refuse_overwriting_inputs([tmp_path / "alias.onnx"], [model])
    with pytest.raises(ConfigError, match="would overwrite an input file"):
        atomic_write_bytes(tmp_path / "alias.onnx", b"later, at write time")
    assert model.read_bytes() == b"weights"


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    check_writable(tmp_path / "new/sub/out.onnx")  # folders still to make are fine
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="is a folder; give a file path"):
        check_writable(tmp_path / "folder")
    with pytest.raises(ConfigError, match="file is not a folder"):
        check_writable(tmp_path / "file/out.json")


def test_a_reader_finishes_a_committed_write_before_reading(tmp_path):
    write_files(tmp_path, pair("old"))
    for name, content in pair("new"):
        (tmp_path / f".{name}.x.tmp").write_bytes(content)
    journal = tmp_path / f".{PAIR[0]}{JOURNAL_SUFFIX}"
    journal.write_text(f'[[".{PAIR[0]}.x.tmp", "{PAIR[0]}"], [".{PAIR[1]}.x.tmp", "{PAIR[1]}"]]')
    assert read_pair(tmp_path) == ("new", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PAIR)
