"""The CLI as a user runs it: a subprocess per subcommand on the bundled model, exit codes,
one-line errors.

The slow runs (Hessian, compress, sweep) happen once per module in fixtures and use few samples.
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper, numpy_helper
from training_support import needs_training

from onnxhq.cli import flag_spelling, main
from onnxhq.graphfile import runtime_limits
from onnxhq.progress import Progress
from onnxhq.sidecar import IndexStream, decode_sidecar, encode_sidecar

SAMPLES = "256"  # enough for k=32 to keep LeNet-5's accuracy; 4x fewer than the default


def onnxhq(
    *args, quiet: bool = True, tty_stderr: bool = False, pre: str = ""
) -> subprocess.CompletedProcess:
    """Run ``python -m onnxhq [--quiet] ARGS``; with ``tty_stderr`` stderr is a pseudo-terminal.

    ``pre`` is Python run before the CLI in the same process (to hide a module, say).
    """
    argv = (["--quiet"] if quiet else []) + [str(a) for a in args]
    cmd = (
        [
            sys.executable,
            "-c",
            f"import sys; {pre}; from onnxhq.cli import main; sys.exit(main(sys.argv[1:]))",
        ]
        if pre
        else [sys.executable, "-m", "onnxhq"]
    ) + argv
    if not tty_stderr:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    proc.stderr = b"".join(chunks).decode()
    return proc


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def assert_one_line_error(proc, *words, code: int = 1):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxhq: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_every_reader_refuses(graph: Path, sample: Path, *words: str) -> None:
    """decode, report and eval of ``graph`` each fail with one line holding ``words``, and decode
    writes nothing."""
    decoded = graph.parent / "decoded.onnx"
    for proc in (
        onnxhq("decode", graph, "-o", decoded),
        onnxhq("report", graph),
        onnxhq("eval", graph, "--data", sample),
    ):
        assert_one_line_error(proc, *words)
    assert not decoded.exists()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the runs the tests share ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hessian_file(tmp_path_factory, bundled_model, bundled_sample):
    """`onnxhq hessian`, stderr on a terminal (so progress shows) and no --quiet."""
    path = tmp_path_factory.mktemp("hessian") / "h.npz"
    proc = onnxhq(
        "hessian",
        bundled_model,
        "--data",
        bundled_sample,
        "--samples",
        SAMPLES,
        "-o",
        path,
        quiet=False,
        tty_stderr=True,
    )
    assert_ok(proc)
    return path, proc


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, bundled_model, bundled_sample, hessian_file):
    """`onnxhq compress` reusing the saved Hessian, with --eval and --report-json."""
    out = tmp_path_factory.mktemp("compressed")
    proc = onnxhq(
        "compress",
        bundled_model,
        "--hessian",
        hessian_file[0],
        "--method",
        "hkmeans",
        "--k",
        "32",
        "--eval",
        bundled_sample,
        "-o",
        out,
        "--report-json",
        out / "report.json",
        tty_stderr=True,
    )
    assert_ok(proc)
    return out, proc


@pytest.fixture
def copied(compressed, tmp_path):
    """A private copy of the compressed graph and sidecar, to damage."""
    out, _ = compressed
    for name in ("lenet5_mnist.onnx", "lenet5_mnist.onnxhq"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    return tmp_path / "lenet5_mnist.onnx", tmp_path / "lenet5_mnist.onnxhq"


@pytest.fixture(scope="module")
def no_weights_model(tmp_path_factory) -> Path:
    """A valid model with nothing to quantize: y = Relu(x)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("models") / "relu.onnx"
    onnx.save(model, str(path))
    return path


# --- every subcommand, on the bundled model -------------------------------------------------------


def test_inspect_lists_weights(bundled_model):
    proc = onnxhq("inspect", bundled_model, "--json")
    assert_ok(proc)
    info = json.loads(proc.stdout)
    assert [w["name"] for w in info["weights"]] == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    ]
    assert info["opset"] <= 21


def test_hessian_writes_a_diagonal_per_weight_and_shows_progress_on_a_terminal(
    hessian_file, bundled_model
):
    path, proc = hessian_file
    with np.load(path) as z:
        diag = {k: z[k] for k in z.files}
    weights = json.loads(onnxhq("inspect", bundled_model, "--json").stdout)["weights"]
    assert {n: v.shape for n, v in diag.items()} == {w["name"]: tuple(w["shape"]) for w in weights}
    assert all(v.dtype == np.float32 and v.min() > 0 for v in diag.values())
    assert f"fisher diagonal of 4 weights from {SAMPLES} samples" in proc.stdout
    assert "hessian" in proc.stderr and "100.0%" in proc.stderr  # the progress line, finished


def test_progress_is_silent_under_quiet_even_on_a_terminal(compressed):
    _, proc = compressed
    assert proc.stderr.strip() == ""


def test_progress_redraws_one_line_and_ends_it():
    stream = io.StringIO()
    progress = Progress(stream, enabled=True)
    progress("k=16 quantize and more", 0, 2)
    progress("hessian", 2, 2)  # a finished stage is always drawn
    long, short = stream.getvalue().split("\r")[1:]
    assert len(short.rstrip("\n")) >= len(long)  # padded: no leftovers of the longer line
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().endswith("\n")
    assert Progress(io.StringIO()).enabled is False  # not a terminal


def test_compress_writes_graph_sidecar_and_report(compressed, hessian_file):
    out, proc = compressed
    report = json.loads((out / "report.json").read_text())
    files = [Path(f) for f in report["files"]]
    assert {f.name for f in files} == {"lenet5_mnist.onnx", "lenet5_mnist.onnxhq"}
    assert all(f.is_absolute() and f.is_file() for f in files)
    assert report["compressed_bytes"] == sum(f.stat().st_size for f in files)
    assert report["compression_ratio"] == pytest.approx(
        report["original_bytes"] / report["compressed_bytes"]
    )
    assert report["compression_ratio"] > 6
    assert 0.97 < report["accuracy"]["original"] <= 1
    assert abs(report["accuracy"]["compressed"] - report["accuracy"]["original"]) < 0.01
    assert report["settings"]["hessian"] == str(hessian_file[0])  # the file, which re-runs it
    assert "compression ratio" in proc.stdout and "fc1.weight" in proc.stdout


def test_a_saved_hessian_gives_the_same_result_as_estimating_it(
    compressed, bundled_model, bundled_sample, tmp_path
):
    out, _ = compressed
    proc = onnxhq(
        "compress",
        bundled_model,
        "--data",
        bundled_sample,
        "--samples",
        SAMPLES,
        "--method",
        "hkmeans",
        "--k",
        "32",
        "-o",
        tmp_path,
        "--report-json",
        tmp_path / "report.json",
    )
    assert_ok(proc)
    again = json.loads((tmp_path / "report.json").read_text())
    saved = json.loads((out / "report.json").read_text())
    assert again["layers"] == saved["layers"]
    assert (tmp_path / "lenet5_mnist.onnxhq").read_bytes() == (
        out / "lenet5_mnist.onnxhq"
    ).read_bytes()


def test_report_rebuilds_the_compress_report_from_the_artifacts(compressed):
    out, _ = compressed
    proc = onnxhq("report", out / "lenet5_mnist.onnx", "--json")
    assert_ok(proc)
    rebuilt = json.loads(proc.stdout)
    saved = json.loads((out / "report.json").read_text())
    # compress names the layers as the model does; the files hold short names (--keep-names)
    unnamed = [[{**row, "name": ""} for row in r["layers"]] for r in (rebuilt, saved)]
    assert unnamed[0] == unnamed[1]
    for key in (
        "compressed_bytes",
        "graph_bytes",
        "sidecar_bytes",
        "codebook_bytes",
        "quantized_params",
        "unquantized_params",
        "files",
    ):
        assert rebuilt[key] == saved[key], key
    assert rebuilt["original_source"] == "input" and "accuracy" not in rebuilt
    assert rebuilt["original_bytes"] == saved["original_bytes"]  # recorded in the graph by compress
    (book,) = rebuilt["codebooks"]
    assert book["entries"] == 32 and 1 < book["used"] <= 32 and len(book["layers"]) == 4

    text = onnxhq("report", out / "lenet5_mnist.onnx")
    assert_ok(text)
    assert "codebook onnxhq.codebook.shared: 32 entries" in text.stdout and "bits/w" in text.stdout


def test_decode_then_eval_gives_the_reported_accuracy(compressed, bundled_sample, tmp_path):
    out, _ = compressed
    decoded = tmp_path / "decoded.onnx"
    assert_ok(onnxhq("decode", out / "lenet5_mnist.onnx", "-o", decoded))
    proc = onnxhq("eval", decoded, "--data", bundled_sample)
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    assert f"{report['accuracy']['compressed']:.4%}" in proc.stdout


def test_eval_reads_compressed_graph_directly(compressed, bundled_sample):
    out, _ = compressed
    proc = onnxhq("eval", out / "lenet5_mnist.onnx", "--data", bundled_sample)
    assert_ok(proc)
    assert "accuracy" in proc.stdout


def test_eval_against_the_original_prints_the_reported_fidelity(
    compressed, bundled_model, bundled_sample
):
    out, _ = compressed
    report = json.loads((out / "report.json").read_text())
    proc = onnxhq(
        "eval", out / "lenet5_mnist.onnx", "--data", bundled_sample, "--against", bundled_model
    )
    assert_ok(proc)
    fid = report["fidelity"]["logits"]
    assert set(fid) == {"agreement", "kl", "accuracy"}
    assert proc.stdout.startswith("fidelity to the original (eval inputs):\n  logits: agreement ")
    assert f"  logits: agreement {fid['agreement']:.4g}, kl {fid['kl']:.4g}" in proc.stdout
    assert report["errors"][0]["guard"] == "" and report["errors"][0]["sqnr_db"] > 10


def test_prune_zeroes_the_asked_fraction_quietly_when_stderr_is_a_pipe(
    bundled_model, bundled_sample, tmp_path
):
    out = tmp_path / "pruned.onnx"
    proc = onnxhq(
        "prune",
        bundled_model,
        "--data",
        bundled_sample,
        "--sparsity",
        "0.5",
        "--steps",
        "1",
        "--retrain-epochs",
        "0.1",
        "--eval",
        bundled_sample,
        "-o",
        out,
        quiet=False,
    )
    assert_ok(proc)
    assert proc.stderr == ""  # no progress lines: stderr is a pipe, not a terminal
    weights = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(out)).graph.initializer
        if t.name.endswith(".weight")
    }
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(
        w.size for w in weights.values()
    )
    assert zeros == pytest.approx(0.5, abs=1e-3)
    assert "50.00%" in proc.stdout and "accuracy" in proc.stdout


@needs_training
def test_sweep_estimates_the_hessian_once_and_writes_table_json_and_plot(
    bundled_model, bundled_sample, tmp_path
):
    proc = onnxhq(
        "-v",
        "sweep",
        bundled_model,
        "--data",
        bundled_sample,
        "--eval",
        bundled_sample,
        "--samples",
        "128",
        "--k",
        "8",
        "16",
        "-o",
        tmp_path,
    )
    assert_ok(proc)
    assert proc.stderr.count("fisher Hessian:") == 1  # the estimator logs each run once
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["value"] for p in result["points"]] == [8, 16]
    assert result["points"][0]["bits_per_weight"] < result["points"][1]["bits_per_weight"]
    assert all(0 <= p["accuracy"] <= 1 and p["compressed_bytes"] > 0 for p in result["points"])
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "k=8" in proc.stdout and "k=16" in proc.stdout and "bits/w" in proc.stdout


def test_python_dash_m_and_version():
    proc = subprocess.run(
        [sys.executable, "-m", "onnxhq", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("onnxhq ")


# --- errors: exit 1, one line naming the problem, nothing written ---------------------------------


def test_missing_files_are_named(bundled_model, tmp_path):
    assert_one_line_error(onnxhq("inspect", tmp_path / "nope.onnx"), "nope.onnx", "does not exist")
    proc = onnxhq(
        "hessian", bundled_model, "--data", tmp_path / "nope.npz", "-o", tmp_path / "h.npz"
    )
    assert_one_line_error(proc, "nope.npz", "does not exist")
    assert_one_line_error(onnxhq("report", tmp_path / "nope.onnx"), "nope.onnx")
    assert leftovers(tmp_path) == []


def test_not_an_onnx_file(tmp_path, bundled_sample):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    proc = onnxhq("compress", bad, "--data", bundled_sample, "-o", tmp_path / "out")
    assert_one_line_error(proc, "bad.onnx", "not an ONNX model")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("command", ["compress", "hessian", "prune"])
def test_wrong_data_keys_name_the_input_and_what_the_file_has(command, tmp_path, bundled_model):
    data = tmp_path / "d.npz"
    np.savez(data, pixels=np.zeros((2, 1, 28, 28), np.float32), labels=np.zeros(2, np.int64))
    output = {"compress": [], "hessian": ["--samples", "2"], "prune": ["--sparsity", "0.5"]}[
        command
    ]
    proc = onnxhq(command, bundled_model, "--data", data, *output, "-o", tmp_path / "out")
    assert_one_line_error(proc, "'input'", "pixels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


def test_a_model_with_no_quantizable_weights_is_refused(no_weights_model, tmp_path):
    proc = onnxhq("compress", no_weights_model, "--method", "kmeans", "-o", tmp_path / "out")
    assert_one_line_error(proc, "no quantizable weights")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((2, 4), np.float32))
    assert_one_line_error(
        onnxhq("hessian", no_weights_model, "--data", data, "-o", tmp_path / "h.npz"),
        "no quantizable weights",
    )
    assert leftovers(tmp_path) == ["x.npz"]


def test_an_opset_too_new_to_convert_is_refused(tmp_path):
    model = small_convnet()
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, str(path))
    proc = onnxhq("compress", path, "--method", "kmeans", "-o", tmp_path / "out")
    assert_one_line_error(proc, "opset 99", str(runtime_limits()[0]))


def test_a_hessian_file_of_another_model_is_refused(bundled_model, tmp_path):
    bad = tmp_path / "h.npz"
    np.savez(bad, **{"conv1.weight": np.ones((2, 2), np.float32)})
    proc = onnxhq("compress", bundled_model, "--hessian", bad, "-o", tmp_path / "out")
    assert_one_line_error(proc, "h.npz", "'conv1.weight'", "(2, 2)", "(20, 1, 5, 5)")
    assert_one_line_error(
        onnxhq("compress", bundled_model, "--hessian", "fischer", "-o", tmp_path / "out"),
        "--hessian 'fischer'",
        "fisher",
        code=2,
    )
    assert leftovers(tmp_path) == ["h.npz"]


def test_corrupt_sidecar_is_named_by_decode_report_and_eval(copied, bundled_sample):
    graph, sidecar = copied
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sidecar.write_bytes(bytes(data))
    assert_every_reader_refuses(graph, bundled_sample, "lenet5_mnist.onnxhq", "CRC32")


def test_truncated_sidecar(copied):
    graph, sidecar = copied
    sidecar.write_bytes(sidecar.read_bytes()[:-100])
    proc = onnxhq("decode", graph, "-o", graph.parent / "decoded.onnx")
    assert_one_line_error(proc, "lenet5_mnist.onnxhq")
    assert sorted(p.name for p in graph.parent.iterdir()) == [
        "lenet5_mnist.onnx",
        "lenet5_mnist.onnxhq",
    ]


def test_missing_sidecar(copied):
    graph, sidecar = copied
    sidecar.unlink()
    assert_one_line_error(
        onnxhq("decode", graph, "-o", graph.parent / "decoded.onnx"), "lenet5_mnist.onnxhq"
    )
    assert_one_line_error(onnxhq("report", graph), "lenet5_mnist.onnxhq")


def test_report_of_a_plain_model_says_what_to_pass(bundled_model):
    assert_one_line_error(
        onnxhq("report", bundled_model), "not a graph written by 'onnxhq compress'"
    )


def test_weighted_method_without_data_says_what_to_do(bundled_model, tmp_path):
    assert_one_line_error(onnxhq("compress", bundled_model, "-o", tmp_path), "--data", code=2)


def test_outputs_never_overwrite_inputs(bundled_model, bundled_sample, tmp_path):
    model = tmp_path / "lenet5_mnist.onnx"
    model.write_bytes(bundled_model.read_bytes())
    assert_one_line_error(
        onnxhq("compress", model, "--method", "kmeans", "-o", tmp_path), "overwrite"
    )
    assert_one_line_error(
        onnxhq("hessian", model, "--data", bundled_sample, "-o", model), "overwrite"
    )
    assert_one_line_error(
        onnxhq("prune", model, "--data", bundled_sample, "--sparsity", "0.5", "-o", model),
        "overwrite",
    )
    assert model.read_bytes() == bundled_model.read_bytes()


def test_sweep_without_matplotlib_says_how_to_install_it_before_any_work(
    bundled_model, bundled_sample, tmp_path
):
    proc = onnxhq(
        "sweep",
        bundled_model,
        "--data",
        bundled_sample,
        "--eval",
        bundled_sample,
        "--k",
        "8",
        "-o",
        tmp_path / "out",
        pre="sys.modules['matplotlib'] = None",
    )
    assert_one_line_error(proc, "matplotlib", "pip install 'onnxhq[plot]'", "--no-plot")
    assert leftovers(tmp_path) == []


def test_unwritable_output_is_one_line(bundled_model, bundled_sample, tmp_path):
    (tmp_path / "file").write_text("")
    proc = onnxhq(
        "hessian",
        bundled_model,
        "--data",
        bundled_sample,
        "--samples",
        "2",
        "-o",
        tmp_path / "file" / "h.npz",
    )
    assert_one_line_error(proc, "file")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["compress"],
        ["hessian", "m.onnx", "--method", "bogus", "-o", "h.npz"],
        ["prune", "m.onnx", "--data", "d.npz", "-o", "p.onnx"],
        ["sweep", "m.onnx", "--eval", "e.npz", "-o", "out"],
        ["sweep", "m.onnx", "--eval", "e.npz", "--k", "8", "--lambda", "0.1", "-o", "out"],
        ["compress", "m.onnx", "--k", "eight", "-o", "out"],
    ],
)
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_usage_errors_exit_2_from_the_shell_too():
    proc = onnxhq("frobnicate")
    assert (
        proc.returncode == 2
        and "invalid choice: 'frobnicate'" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_compress_fine_tunes_the_codebook_on_request(bundled_model, bundled_sample, tmp_path):
    proc = onnxhq(
        "compress",
        bundled_model,
        "--method",
        "kmeans",
        "--k",
        "8",
        "--finetune-epochs",
        "0.2",
        "--train",
        bundled_sample,
        "-o",
        tmp_path,
        "--report-json",
        tmp_path / "r.json",
    )
    assert_ok(proc)
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["finetune_epochs"] == 0.2
    assert_one_line_error(
        onnxhq(
            "compress",
            bundled_model,
            "--method",
            "kmeans",
            "--finetune-epochs",
            "1",
            "-o",
            tmp_path / "x",
        ),
        "--train",
        code=2,
    )


def test_a_valid_sidecar_of_another_graph_is_refused_by_decode_report_and_eval(
    copied, bundled_sample
):
    graph, sidecar = copied
    streams, metadata = decode_sidecar(sidecar.read_bytes())
    first = streams[0]
    other = first.indices.copy()
    # same names and shapes, other indices
    other.flat[0] = (other.flat[0] + 1) % first.alphabet_size
    streams[0] = IndexStream(first.name, first.shape, first.alphabet_size, other)
    sidecar.write_bytes(encode_sidecar(streams, metadata=metadata))
    assert_every_reader_refuses(graph, bundled_sample, "lenet5_mnist.onnxhq", "not this graph's")


# --- option errors: exit 2, one line naming the flags, before the model is read -------------------


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--method", "ecsq", "--k", "8"], ["--k 8", "--lambda", "--target-bits"]),
        (["--bits", "2.5"], ["--bits 2.5", "--target-bits"]),
        (["--scope", "channel-group"], ["--scope 'channel-group'", "--group-size"]),
        (["--scope", "layer", "--group-size", "4"], ["--group-size 4", "--scope 'channel-group'"]),
        (["--lambda", "0.1"], ["--lambda 0.1", "ECSQ"]),
        (
            ["--method", "kmeans", "--hessian", "fisher"],
            ["--method 'kmeans'", "--hessian 'fisher'"],
        ),
        (["--method", "kmeans", "--adam-state", "a.npz"], ["--adam-state"]),
        (["--hessian", "none", "--samples", "10"], ["--samples 10", "--hessian 'none'"]),
        (["--seed", "-1"], ["--seed -1"]),
        (["--target-bits", "nan"], ["--target-bits nan"]),
        (["--train", "t.npz"], ["--train", "--finetune-epochs"]),
    ],
)
def test_option_errors_name_the_flags_and_exit_2_before_the_model_is_read(
    flags, words, tmp_path, capsys
):
    assert (
        main(["compress", str(tmp_path / "missing.onnx"), *flags, "-o", str(tmp_path / "out")]) == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("onnxhq: error:") and "missing.onnx" not in line, line
    for word in words:
        assert word in line, (word, line)
    assert "_" not in line.split("error:", 1)[1].replace("target_bits", ""), (
        line
    )  # no Python keywords
    assert leftovers(tmp_path) == []


def test_sweep_options_are_checked_like_compress(tmp_path, capsys):
    args = [
        "sweep",
        str(tmp_path / "missing.onnx"),
        "--eval",
        "e.npz",
        "--method",
        "ecsq",
        "--k",
        "4",
        "8",
        "--no-plot",
        "-o",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    assert "--k 4" in capsys.readouterr().err


def test_flag_spelling_rewrites_only_the_named_fields():
    message = "target_bits=3.0 and bits=4 conflict; see group_size (bits of the rate)"
    assert (
        flag_spelling(message, ("target_bits", "group_size"))
        == "--target-bits 3.0 and bits=4 conflict; see --group-size (bits of the rate)"
    )
