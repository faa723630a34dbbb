"""A misconfigured ``onnxhq compress`` of a real model fails from the shell at once: exit 2, one
line on stderr naming the flags, nothing written, before the model or any data is read."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

#: Loose bound on the whole process (interpreter start included) for what takes ~0.2 s on a
#: shared 2-core machine: the checks run before the pipeline, onnx or the model are loaded.
SECONDS = 5.0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--method", "ecsq", "--k", "8"], ["--method 'ecsq'", "--k 8", "--lambda"]),
        (["--bits", "2.5", "--method", "kmeans"], ["--bits 2.5", "--target-bits"]),
        (["--scope", "channel-group"], ["--scope 'channel-group'", "--group-size"]),
        (["--lambda", "0.1", "--method", "uniform"], ["--lambda 0.1", "--method 'uniform'"]),
        (["--adam-state", "a.npz", "--method", "kmeans"], ["--adam-state", "--method 'kmeans'"]),
    ],
)
def test_a_misconfigured_compress_fails_in_one_line_with_exit_2_at_once(
    flags, words, bundled_model, tmp_path
):
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "onnxhq", "compress", str(bundled_model), *flags]
    start = time.perf_counter()
    proc = subprocess.run([*command, "-o", str(outdir)], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("onnxhq: error: "), line
    for word in words:
        assert word in line, (word, line)
    assert elapsed < SECONDS, f"{elapsed:.2f} s: {line}"
    assert not outdir.exists()
