"""The README's promises against hostile files (issue 16): every case exits 1 or 2 with the one
line expected, leaves no output and changes no input byte, or it works.

The files are built by tests/hostile/make_hostile.py into a fresh folder per test; the CLI runs
in that folder (so messages name paths as the user typed them), in process, except where a
native crash could take the process down (subprocess).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxhq.cli import main
from onnxhq.graphfile import all_tensors
from onnxhq.model import runtime_limits

sys.path.insert(0, str(Path(__file__).parent / "hostile"))
import make_hostile

E = "onnxhq: error: "


@pytest.fixture
def files(tmp_path, monkeypatch) -> Path:
    """The hostile files in ``tmp_path/models``, which is made the working folder."""
    make_hostile.build_all(tmp_path)
    monkeypatch.chdir(tmp_path / "models")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (sparse files: of their size); every
    folder -> "folder" (an output folder left empty is an output left)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            out[str(p.relative_to(root))] = "folder"
        elif p.is_file():
            big = p.stat().st_size > 2**30
            data = str(p.stat().st_size).encode() if big else p.read_bytes()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def run(argv: str, capsys) -> tuple[int, list[str]]:
    """``onnxhq --quiet ARGV`` (split on spaces) in process: exit code and stderr lines."""
    code = main(["--quiet", *argv.split()])
    return code, capsys.readouterr().err.strip().splitlines()


#: (id, argv, exit code, the whole stderr line; {m} is the models folder's absolute path)
REFUSED = [
    (
        "labels near 2**40, prune",
        "prune plain.onnx --data labels_huge.npz --sparsity 0.5 -o p.onnx",
        1,
        "labels_huge.npz: label 1099511627777 is not a class of the model, which scores 3 "
        "classes (labels 0..2); check the labels match this model",
    ),
    (
        "labels near 2**40, fine-tuning",
        "compress plain.onnx --hessian none --method kmeans --k 4 --finetune-epochs 1 "
        "--train labels_huge.npz -o out",
        1,
        "labels_huge.npz: label 1099511627777 is not a class of the model, which scores 3 "
        "classes (labels 0..2); check the labels match this model",
    ),
    (
        "label out of range, prune",
        "prune plain.onnx --data labels_range.npz --sparsity 0.5 -o p.onnx",
        1,
        "labels_range.npz: label 7 is not a class of the model, which scores 3 classes "
        "(labels 0..2); check the labels match this model",
    ),
    (
        "uint64 labels past int64",
        "eval plain.onnx --data labels_uint64.npz",
        1,
        "labels_uint64.npz: 'labels' has label 9223372036854775809, past int64; class labels "
        "are 0..classes-1",
    ),
    (
        "Constant's external data escapes the folder",
        "compress constant_escaping.onnx --hessian none -o out",
        1,
        "constant_escaping.onnx: cannot read its external data files (Data of TensorProto ( "
        "tensor name: shift) should be file inside '.', but '../secret.bin' points outside the "
        "directory.); keep them beside the model, inside its folder",
    ),
    (
        "negative dims",
        "compress negative_dims.onnx --hessian none -o out",
        1,
        "negative_dims.onnx: tensor 'W' has negative dims [-1, 3]; the file is broken",
    ),
    (
        "impossible dims",
        "compress huge_dims.onnx --hessian none -o out",
        1,
        "huge_dims.onnx: tensor 'W' declares dims [1000000000000, 3] (3,000,000,000,000 "
        "elements) but holds 48 bytes (12,000,000,000,000 expected); the file is broken or "
        "truncated",
    ),
    (
        "duplicate outputs",
        "compress duplicate_outputs.onnx --hessian none -o out",
        1,
        "duplicate_outputs.onnx: value 'logits' is defined twice (graph 'hostile'); ONNX values "
        "are assigned once, re-export the model",
    ),
    (
        "an output listed twice",
        "compress output_twice.onnx --hessian none -o out",
        1,
        "output_twice.onnx: output 'logits' is listed twice in graph 'hostile'; each graph "
        "output must be named once",
    ),
    (
        "NaN weight",
        "compress nan_weight.onnx --data data.npz -o out",
        1,
        "nan_weight.onnx: tensor 'W' holds 1 NaN values; fix or re-export the model",
    ),
    (
        "protobuf over 2 GiB",
        "inspect over_2gb.onnx",
        1,
        "over_2gb.onnx is 2.0 GiB in one file; protobuf reads at most 2 GiB: save it with "
        "external data (onnx.save_model(..., save_as_external_data=True))",
    ),
    (
        "declared shape of terabytes",
        "eval plain.onnx --data terabyte.npz",
        1,
        "data file terabyte.npz: 'x' declares shape (1099511627776, 4) float32 (16.0 TiB) but "
        "stores 0 bytes; the file is broken, re-save it with numpy.savez",
    ),
    (
        "prune -o the input's external data",
        "prune weights_external.onnx --data data.npz --sparsity 0.5 -o weights_external.onnx.data",
        1,
        "output weights_external.onnx.data would overwrite an input file; choose another "
        "output path",
    ),
    (
        "hessian -o the input's external data",
        "hessian weights_external.onnx --data data.npz -o weights_external.onnx.data",
        1,
        "output weights_external.onnx.data would overwrite an input file; choose another "
        "output path",
    ),
    (
        "--report-json onto the input's external data",
        "compress weights_external.onnx --hessian none -o out "
        "--report-json weights_external.onnx.data",
        1,
        "output weights_external.onnx.data would overwrite an input file; choose another "
        "output path",
    ),
    (
        "--report-json in a folder nothing can be written to, found before the work",
        "compress plain.onnx --hessian none -o out --report-json /proc/report.json",
        1,
        "output /proc/report.json: cannot write in folder /proc (No such file or directory); "
        "choose another output path",
    ),
    (
        "--report-json under a file",
        "compress plain.onnx --hessian none -o out --report-json plain.onnx/report.json",
        1,
        "output plain.onnx/report.json: plain.onnx is not a folder; choose another output path",
    ),
]


@pytest.mark.parametrize(
    ("argv", "code", "line"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_hostile_input_is_refused_in_one_line_leaving_everything_as_it_was(
    files, capsys, argv, code, line
):
    before = snapshot(files)
    got, err = run(argv, capsys)
    assert (got, err) == (code, [E + line.format(m=files / "models")])
    assert snapshot(files) == before  # no input changed, no output left


@pytest.mark.parametrize("argv", ["--bits nan", "--seed -1", "--k 0"])
def test_invalid_option_values_are_usage_errors(files, capsys, argv):
    before = snapshot(files)
    got, err = run(f"compress plain.onnx --hessian none -o out {argv}", capsys)
    assert got == 2 and len(err) == 1
    assert re.fullmatch(re.escape(E + argv.split()[0]) + r" .+", err[0])
    assert snapshot(files) == before


def test_decode_refuses_to_overwrite_the_sidecar_it_reads(files, capsys):
    assert run("compress plain.onnx --hessian none --method kmeans --k 4 -o out", capsys)[0] == 0
    before = snapshot(files)
    got, err = run("decode out/plain.onnx -o out/plain.onnxhq", capsys)
    assert (got, err) == (
        1,
        [E + "output out/plain.onnxhq would overwrite an input file; choose another output path"],
    )
    assert snapshot(files) == before


@pytest.mark.parametrize("command", ["hessian", "prune"])
def test_a_gradient_builder_abort_is_one_line_not_a_dead_process(files, command):
    """An If node aborts onnxruntime-training's gradient builder: the worker process dies, the
    CLI says so in one line (exit 1) and writes nothing."""
    before = snapshot(files)
    extra = ["--sparsity", "0.5"] if command == "prune" else []
    proc = subprocess.run(
        [sys.executable, "-m", "onnxhq", "-q", command, "if_node.onnx", "--data", "data.npz",
         *extra, "-o", "out.onnx"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(
        E + "onnxruntime could not build a gradient graph for this model"
    ), proc.stderr
    assert snapshot(files) == before


def test_compress_of_an_if_model_falls_back_to_forward_passes(files):
    proc = subprocess.run(
        [sys.executable, "-m", "onnxhq", "-q", "compress", "if_node.onnx", "--data", "data.npz",
         "-o", "out"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (files / "models/out").iterdir()) == [
        "if_node.onnx",
        "if_node.onnxhq",
    ]


@pytest.mark.parametrize("name", ["constant_external", "subgraph_external", "weights_external"])
def test_external_data_is_read_from_the_models_folder_and_not_kept(
    files, capsys, monkeypatch, name
):
    """Run from another folder: Constant values and If-body initializers in external files are
    found beside the model, and nothing of the output points back into the user's folder."""
    monkeypatch.chdir(files)
    model = f"models/{name}.onnx"
    compress = f"compress {model} --hessian none --method kmeans --k 2 --keep-names -o out"
    assert run(compress, capsys)[0] == 0  # --keep-names: W is read back by its name
    assert run(f"decode out/{name}.onnx -o decoded.onnx", capsys)[0] == 0
    for path in (f"out/{name}.onnx", "decoded.onnx"):
        loaded = onnx.load(path, load_external_data=False)
        assert not [t.name for t in all_tensors(loaded) if t.data_location == 1]
    import onnxruntime as ort

    from onnxhq.decode import load
    from onnxhq.model import read_initializers

    w = read_initializers(load(f"out/{name}.onnx", dequantize=True), ["W"])["W"]
    session = ort.InferenceSession("decoded.onnx", providers=["CPUExecutionProvider"])
    scores = session.run(None, {"x": np.eye(4, dtype=np.float32)})[0]
    np.testing.assert_allclose(scores, w + (0.0 if name == "weights_external" else 0.5))


def test_opset_23_ir_11_artifacts_load_in_the_installed_onnxruntime(files, capsys):
    import onnxruntime as ort

    assert run("compress opset23.onnx --hessian none -o out", capsys)[0] == 0
    assert run("decode out/opset23.onnx -o decoded.onnx", capsys)[0] == 0
    decoded = onnx.load("decoded.onnx")
    max_opset, max_ir = runtime_limits()
    assert decoded.opset_import[0].version <= max_opset and decoded.ir_version <= max_ir
    session = ort.InferenceSession("decoded.onnx", providers=["CPUExecutionProvider"])
    x = np.ones((2, 4), np.float32)
    assert session.run(None, {"x": x})[0].shape == (2, 3)
