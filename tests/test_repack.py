"""repack: a compressed pair written again with short names, its decoded weights bit-identical."""

from pathlib import Path

import numpy as np
import pytest

from onnxhq.cli import main
from onnxhq.decode import load
from onnxhq.errors import ConfigError
from onnxhq.pipeline import compress
from onnxhq.repack import repack, repack_file
from onnxhq.runtime import make_session

LENET = Path(__file__).resolve().parents[1] / "models" / "lenet5_mnist.onnx"


@pytest.fixture(scope="module")
def long_names(tmp_path_factory):
    """LeNet-5 compressed with its exporter's names kept (as before the graph clean-up): 3-bit
    per-layer codebooks, so the indices are packed two per byte and every codebook is derived
    from its weight's name."""
    folder = tmp_path_factory.mktemp("long")
    result = compress(LENET, method="uniform", bits=3, scope="layer", hessian="none",
                      include_biases=True, compact_names=False)  # fmt: skip
    result.save(folder)
    return folder / "lenet5_mnist.onnx"


def _initializers(model):
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_repack_keeps_every_decoded_weight_and_output_bit_for_bit(long_names, tmp_path):
    result, paths = repack_file(long_names, tmp_path / "new")
    assert [p.name for p in paths] == ["lenet5_mnist.onnx", "lenet5_mnist.onnxhq"]
    assert all(p.is_file() for p in paths)
    old, new = load(long_names, dequantize=True), load(paths[0], dequantize=True)
    before, after = _initializers(old), _initializers(new)
    assert len(result.names) == 8 and all(len(v) <= 2 for v in result.names.values())
    for weight, renamed in result.names.items():
        assert after[renamed].dtype == before[weight].dtype, weight
        np.testing.assert_array_equal(after[renamed], before[weight], err_msg=weight)
    assert len(after) == len(before)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    outputs = [make_session(load(p)).run(None, {"input": x})[0] for p in (long_names, paths[0])]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert sum(result.after.values()) < sum(result.before.values())
    assert result.before["lenet5_mnist.onnx"] == long_names.stat().st_size
    assert result.after == {p.name: p.stat().st_size for p in paths}


def test_repacking_a_repacked_pair_changes_nothing(long_names, tmp_path):
    _, paths = repack_file(long_names, tmp_path / "once")
    again = repack(paths[0])
    assert again.artifacts.graph_bytes == paths[0].read_bytes()
    assert again.artifacts.sidecar() == paths[1].read_bytes()
    assert set(again.names) == set(again.names.values())  # short names stay as they are


def test_repack_refuses_to_write_over_the_pair_it_reads(long_names):
    sizes = {p: p.stat().st_size for p in long_names.parent.iterdir()}
    with pytest.raises(ConfigError, match="overwrite an input"):
        repack_file(long_names, long_names.parent)
    assert {p: p.stat().st_size for p in long_names.parent.iterdir()} == sizes


def test_cli_repack_reports_the_sizes_and_errors_in_one_line(long_names, tmp_path, capsys):
    assert main(["repack", str(long_names), "-o", str(tmp_path / "cli"), "--name", "small"]) == 0
    out = capsys.readouterr().out
    assert "small.onnx" in out and "decoded weights unchanged" in out
    assert (tmp_path / "cli" / "small.onnxhq").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "lenet5_mnist.onnx").write_bytes(long_names.read_bytes())
    (broken / "lenet5_mnist.onnxhq").write_bytes(b"not a sidecar")
    assert main(["repack", str(broken / "lenet5_mnist.onnx"), "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxhq: error:") and err.count("\n") == 1
