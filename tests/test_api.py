"""The public Python API: what `import onnxhq` offers, and that its pieces fit together."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from training_support import needs_training

import onnxhq
from onnxhq import hessian as hessian_mod


def test_every_public_name_resolves_and_is_documented():
    for name in onnxhq.__all__:
        value = getattr(onnxhq, name)
        if callable(value):
            assert value.__doc__, name
    assert {
        "compress",
        "load",
        "InferenceSession",
        "report",
        "sweep",
        "Result",
        "Report",
        "Sweep",
    } <= set(onnxhq.__all__)


def test_import_is_light_and_report_and_sweep_stay_functions():
    code = (
        "import sys, onnxhq; heavy = [m for m in ('numpy', 'onnx', 'onnxruntime', 'scipy') "
        "if m in sys.modules]; "
        "assert not heavy, heavy; import onnxhq.pipeline, onnxhq.plot; "
        "assert callable(onnxhq.report) and callable(onnxhq.sweep); "
        "from onnxhq.report import Report; from onnxhq.sweep import Sweep"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compress_save_report_load_and_run(convnet_file, convnet_data, tmp_path):
    result = onnxhq.compress(
        convnet_file, convnet_data, k=4, hessian_samples=32, eval_data=convnet_data,
        compact_names=False,  # the files keep the weights' names (tests/test_compact.py: short)
    )  # fmt: skip
    assert isinstance(result, onnxhq.Result) and result.report.accuracy_compressed is not None
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["convnet.onnx", "convnet.onnxhq"]

    rebuilt = onnxhq.report(paths[0])
    assert rebuilt.layers == result.report.layers
    assert rebuilt.compressed_bytes == result.report.compressed_bytes

    model = onnxhq.load(paths[0])
    assert isinstance(model, onnx.ModelProto) and not [
        i for i in model.graph.input if i.name != "input"
    ]
    session = onnxhq.InferenceSession(paths[0])
    (logits,) = session.run(None, {"input": convnet_data.inputs["input"][:5]})
    assert logits.shape == (5, 4)


def test_a_precomputed_hessian_equals_estimating_it_inside_compress(convnet_file, convnet_data):
    diag = onnxhq.estimate_hessian(convnet_file, convnet_data, samples=32, seed=5)
    assert set(diag) == {"conv.weight", "fc.weight"}
    given = onnxhq.compress(convnet_file, convnet_data, k=4, hessian=diag, seed=5)
    inside = onnxhq.compress(
        convnet_file, convnet_data, k=4, hessian="fisher", hessian_samples=32, seed=5
    )
    assert given.artifacts.sidecar_bytes == inside.artifacts.sidecar_bytes
    assert given.report.layers == inside.report.layers


def test_estimate_hessian_refuses_none_and_unknown_methods(convnet_file, convnet_data):
    with pytest.raises(onnxhq.ConfigError, match="unweighted"):
        onnxhq.estimate_hessian(convnet_file, convnet_data, method="none")
    with pytest.raises(onnxhq.ConfigError, match="fischer"):
        onnxhq.estimate_hessian(convnet_file, convnet_data, method="fischer")


@needs_training
def test_sweep_estimates_once_and_orders_points_as_given(convnet_file, convnet_data, monkeypatch):
    calls = []
    real = hessian_mod.estimate
    monkeypatch.setattr(
        hessian_mod, "estimate", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw)
    )
    result = onnxhq.sweep(
        convnet_file, convnet_data, eval_data=convnet_data, k=[8, 2, 4], hessian_samples=32
    )
    assert calls == ["fisher"]
    assert [p.value for p in result.points] == [8, 2, 4]
    bits = {p.value: p.report.bits_per_weight for p in result.points}
    assert bits[2] < bits[4] < bits[8]
    assert all(p.report.accuracy_original == result.accuracy_original for p in result.points)
    table = result.to_text()
    assert "k=2" in table and "bits/w" in table
    assert result.to_dict()["points"][0]["report"]["layers"]


def test_compensate_reads_the_data_once_and_a_sweep_gathers_the_layers_once(
    convnet_file, convnet_data, tmp_path, monkeypatch
):
    from onnxhq import data as data_mod
    from onnxhq import layer_inputs

    path = tmp_path / "data.npz"
    np.savez(path, input=convnet_data.inputs["input"], labels=convnet_data.labels)
    reads, gathers = [], []
    read, gather = data_mod._dataset, layer_inputs.layer_hessians
    monkeypatch.setattr(data_mod, "_dataset", lambda *a: reads.append(a[0]) or read(*a))
    monkeypatch.setattr(
        layer_inputs, "layer_hessians", lambda *a, **kw: gathers.append(1) or gather(*a, **kw)
    )
    weighted = dict(hessian="activations", hessian_samples=16, compensate=True)
    onnxhq.compress(convnet_file, path, **weighted)  # the Hessian and the layers read the file
    assert (reads, len(gathers)) == ([str(path)], 1)
    result = onnxhq.sweep(
        convnet_file, path, eval_data=convnet_data, target_bits=[2, 4], **weighted
    )
    assert (reads, len(gathers)) == ([str(path)] * 2, 2)
    assert [p.report.settings["compensate"] for p in result.points] == [True, True]


def test_sweep_with_plain_kmeans_needs_no_data_and_no_hessian(
    convnet_file, convnet_data, monkeypatch
):
    monkeypatch.setattr(
        hessian_mod, "estimate", lambda *a, **kw: pytest.fail("no Hessian for plain k-means")
    )
    result = onnxhq.sweep(convnet_file, None, eval_data=convnet_data, k=[2, 4], method="kmeans")
    assert len(result.points) == 2


@pytest.mark.parametrize(
    "rates, match",
    [
        (dict(), "exactly one rate"),
        (dict(k=[4], lam=[0.1]), "exactly one rate"),
        (dict(k=[4, 4]), "repeat"),
    ],
)
def test_sweep_wants_one_list_of_distinct_rates(convnet_file, convnet_data, rates, match):
    with pytest.raises(onnxhq.ConfigError, match=match):
        onnxhq.sweep(convnet_file, convnet_data, eval_data=convnet_data, **rates)


def test_sweep_plot_is_a_png(convnet_file, convnet_data):
    pytest.importorskip("matplotlib")
    from onnxhq.plot import sweep_figure_png

    result = onnxhq.sweep(convnet_file, None, eval_data=convnet_data, k=[2, 4], method="kmeans")
    assert sweep_figure_png(result)[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    from onnxhq.plot import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(onnxhq.ConfigError, match=r"pip install 'onnxhq\[plot\]'"):
        require_matplotlib()
