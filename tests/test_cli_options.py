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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsity", "1.5"], "--sparsity 1.5 is outside [0, 1); it is the fraction of the "
         "weights set to zero"),
        (["--sparsity", "nan"], "--sparsity nan is outside [0, 1); it is the fraction of the "
         "weights set to zero"),
        (["--sparsity", "0.5", "--steps", "0"], "--steps 0 must be an integer >= 1"),
        (["--sparsity", "0.5", "--retrain-epochs", "-1"], "--retrain-epochs -1.0 must be a "
         "number >= 0 (0: no retraining)"),
        (["--sparsity", "0.5", "--lr", "0"], "--lr 0.0 must be a positive number (e.g. 3e-4)"),
        (["--sparsity", "0.5", "--batch-size", "0"], "--batch-size 0 must be an integer >= 1"),
        (["--sparsity", "0.5", "--samples", "0"], "--samples 0 must be an integer >= 1"),
        (["--sparsity", "0.5", "--seed", "-1"], "--seed -1 must be an integer >= 0"),
    ],
)  # fmt: skip
def test_a_bad_prune_option_is_a_usage_error_before_anything_is_read(
    flags, message, bundled_model, tmp_path
):
    """Exit 2 and the exact line, although the data file does not even exist."""
    out = tmp_path / "pruned.onnx"
    command = [sys.executable, "-m", "onnxhq", "prune", str(bundled_model), "--data",
               str(tmp_path / "missing.npz"), *flags, "-o", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"onnxhq: error: {message}"]
    assert proc.stdout == "" and not out.exists()
