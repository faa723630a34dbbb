"""The CLI as a user runs it: a subprocess on the bundled model, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def onnxhq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxhq", "--quiet", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxhq: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, bundled_model, bundled_sample):
    out = tmp_path_factory.mktemp("compressed")
    proc = onnxhq("compress", bundled_model, "--data", bundled_sample, "--eval", bundled_sample, "--samples", "256",
                  "-o", out, "--report-json", out / "report.json")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_compress_writes_graph_sidecar_and_report(compressed):
    out, proc = compressed
    report = json.loads((out / "report.json").read_text())
    files = [Path(f) for f in report["files"]]
    assert {f.name for f in files} == {"lenet5_mnist.onnx", "lenet5_mnist.onnxhq"}
    assert all(f.is_absolute() and f.is_file() for f in files)
    assert report["compressed_bytes"] == sum(f.stat().st_size for f in files)
    assert report["compression_ratio"] == pytest.approx(report["original_bytes"] / report["compressed_bytes"])
    assert report["compression_ratio"] > 6
    assert 0.97 < report["accuracy"]["original"] <= 1 and abs(report["accuracy"]["compressed"] - report["accuracy"]["original"]) < 0.01
    assert "compression ratio" in proc.stdout and "fc1.weight" in proc.stdout


def test_decode_then_eval_gives_the_reported_accuracy(compressed, bundled_sample, tmp_path):
    out, _ = compressed
    decoded = tmp_path / "decoded.onnx"
    proc = onnxhq("decode", out / "lenet5_mnist.onnx", "-o", decoded)
    assert proc.returncode == 0, proc.stderr
    proc = onnxhq("eval", decoded, "--data", bundled_sample)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert f"{report['accuracy']['compressed']:.4%}" in proc.stdout


def test_eval_reads_compressed_graph_directly(compressed, bundled_sample):
    out, _ = compressed
    proc = onnxhq("eval", out / "lenet5_mnist.onnx", "--data", bundled_sample)
    assert proc.returncode == 0 and "accuracy" in proc.stdout, proc.stderr


def test_not_an_onnx_file(tmp_path, bundled_sample):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    proc = onnxhq("compress", bad, "--data", bundled_sample, "-o", tmp_path / "out")
    assert_one_line_error(proc, "bad.onnx", "not an ONNX model")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_data_keys(tmp_path, bundled_model):
    data = tmp_path / "d.npz"
    np.savez(data, pixels=np.zeros((2, 1, 28, 28), np.float32))
    proc = onnxhq("compress", bundled_model, "--data", data, "-o", tmp_path / "out")
    assert_one_line_error(proc, "'input'", "pixels")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_sidecar(compressed, tmp_path):
    out, _ = compressed
    for name in ("lenet5_mnist.onnx", "lenet5_mnist.onnxhq"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    sidecar = tmp_path / "lenet5_mnist.onnxhq"
    sidecar.write_bytes(sidecar.read_bytes()[:-100])
    proc = onnxhq("decode", tmp_path / "lenet5_mnist.onnx", "-o", tmp_path / "decoded.onnx")
    assert_one_line_error(proc)
    assert not (tmp_path / "decoded.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_missing_sidecar(compressed, tmp_path):
    out, _ = compressed
    (tmp_path / "lenet5_mnist.onnx").write_bytes((out / "lenet5_mnist.onnx").read_bytes())
    proc = onnxhq("decode", tmp_path / "lenet5_mnist.onnx", "-o", tmp_path / "decoded.onnx")
    assert_one_line_error(proc, "lenet5_mnist.onnxhq")


def test_weighted_method_without_data_says_what_to_do(bundled_model, tmp_path):
    proc = onnxhq("compress", bundled_model, "-o", tmp_path)
    assert_one_line_error(proc, "--data")


def test_output_never_overwrites_the_input(bundled_model, tmp_path):
    model = tmp_path / "lenet5_mnist.onnx"
    model.write_bytes(bundled_model.read_bytes())
    proc = onnxhq("compress", model, "--method", "kmeans", "-o", tmp_path)
    assert_one_line_error(proc, "overwrite")
    assert model.read_bytes() == bundled_model.read_bytes()


def test_usage_errors_exit_2(tmp_path):
    assert onnxhq("compress").returncode == 2
    assert onnxhq("frobnicate").returncode == 2
