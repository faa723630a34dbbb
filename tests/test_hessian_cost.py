"""What an estimate records and how many samples it draws: the estimator that ran (the fallback
included) and the samples it used, in the estimate and in the report's settings; the default
sample count scaled by the model's cost, explicit counts winning."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from training_support import without_training

import onnxhq
from onnxhq import importances
from onnxhq.cli import main as cli_main
from onnxhq.data import Dataset
from onnxhq.hessian.cost import MAX_SAMPLES, MIN_SAMPLES, default_samples, multiply_adds
from onnxhq.importances import Estimate, estimate_hessian
from onnxhq.options import CompressOptions


def conv_then_dense(side: int) -> tuple[onnx.ModelProto, Dataset]:
    """x (N, 2, side, side) -> Conv w1 (4, 2, 3, 3), pads 1 -> Atan -> Flatten -> MatMul w2."""
    flat = 4 * side * side
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, {side}, {side}] x) => (float[N, 3] y) {{
      h = Conv <pads = [1, 1, 1, 1]> (x, w1)
      a = Atan(h)
      f = Flatten(a)
      y = MatMul(f, w2)
    }}""")
    model.graph.node[1].name = "act"
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (4, 2, 3, 3)), ("w2", (flat, 3))):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        )
    return model, Dataset({"x": rng.normal(size=(24, 2, side, side)).astype(np.float32)})


def test_the_multiply_adds_count_every_position_a_weight_is_applied_at():
    side = 6
    model, data = conv_then_dense(side)
    conv = (4 * 2 * 3 * 3) * side * side  # every output pixel (pads keep the size)
    dense = 4 * side * side * 3  # one row
    assert multiply_adds(model, ["w1", "w2"], data.inputs) == conv + dense


def test_the_default_sample_count_falls_with_the_cost_between_floor_and_cap():
    assert default_samples(1) == MAX_SAMPLES == 1000
    assert default_samples(10**15) == MIN_SAMPLES == 64
    counts = [default_samples(c) for c in (10**7, 10**8, 10**9, 10**10)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


@without_training
def test_a_costly_model_draws_fewer_samples_unless_told(monkeypatch, caplog):
    model, data = conv_then_dense(6)
    monkeypatch.setattr(importances, "default_samples", lambda cost: 10)
    with caplog.at_level(logging.INFO, logger="onnxhq.importances"):
        chosen = estimate_hessian(model, data, method="activations")
    assert chosen.source.samples == 10
    (line,) = [r.getMessage() for r in caplog.records if "draws" in r.getMessage()]
    assert "draws 10 samples" in line and "multiply-adds each" in line
    told = estimate_hessian(model, data, method="activations", samples=16)
    assert told.source.samples == 16  # an explicit count wins
    again = estimate_hessian(model, data, method="activations", samples=10)
    for name in chosen:
        np.testing.assert_array_equal(chosen[name], again[name])


@without_training
def test_the_samples_recorded_are_those_used():
    model, data = conv_then_dense(4)
    capped = estimate_hessian(model, data, method="activations", samples=500)
    assert isinstance(capped, Estimate)
    assert (capped.source.method, capped.source.samples, capped.distinct) == ("activations", 24, 24)


@without_training
def test_after_a_fallback_the_report_names_the_hessian_that_ran(monkeypatch, caplog):
    """No gradient graph (no onnxruntime-training here, or Atan without a gradient): the default
    falls back to `activations`, and the settings say so, so they rebuild the same artifacts."""
    monkeypatch.setattr(importances, "training_available", lambda: False)
    model, data = conv_then_dense(4)
    with caplog.at_level(logging.WARNING):
        result = onnxhq.compress(model, data, hessian_samples=16)
    assert any("using the 'activations' Hessian" in r.getMessage() for r in caplog.records)
    settings = result.report.settings
    assert (settings["hessian"], settings["hessian_samples"]) == ("activations", 16)
    assert result.report.to_dict()["settings"]["hessian"] == "activations"
    assert "hessian               activations (16 samples)" in result.report.to_text()
    again = onnxhq.compress(model, data, options=CompressOptions.from_dict(settings))
    assert again.artifacts.sidecar() == result.artifacts.sidecar()
    assert again.artifacts.graph_bytes == result.artifacts.graph_bytes


@without_training
def test_the_hessian_command_prints_the_samples_it_used(tmp_path, capsys):
    model, data = conv_then_dense(4)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=data.inputs["x"])
    out = tmp_path / "h.npz"
    argv = ["hessian", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz"),
            "--method", "activations", "--samples", "1000", "-o", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "activations diagonal of 2 weights from 24 samples" in printed
    assert "1000" not in printed


@pytest.mark.parametrize("samples", [None, 7])
def test_the_settings_keep_an_explicit_count_and_the_default_is_by_cost(samples):
    source = CompressOptions.from_keywords(hessian_samples=samples).hessian
    assert source is not None and source.by_cost == (samples is None)


def three_products() -> onnx.ModelProto:
    """x (1, 4) -> Gemm(x, w1^T) (1, 5) -> MatMul(w2, .) (3, 5) -> Gemm(w3^T, .) (7, 5): weights
    in each slot and orientation, as ``(outputs, inputs)`` matrices (5, 4), (3, 1) and (7, 3)."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[7, 5] y) {
      a = Gemm <transB = 1> (x, w1)
      b = MatMul(w2, a)
      y = Gemm <transA = 1> (w3, b)
    }""")
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (5, 4)), ("w2", (3, 1)), ("w3", (3, 7))):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    return model


def test_each_weights_matrix_is_the_product_its_node_computes():
    from onnxhq.hessian.cost import weight_matrix
    from onnxhq.hessian.uses import find_uses, weights_as_inputs

    model = three_products()
    graph_model, values = weights_as_inputs(model, ["w1", "w2", "w3"])
    found = {u.param: weight_matrix(u) for u in find_uses(graph_model, ["w1", "w2", "w3"], values)}
    assert found == {"w1": (5, 4, 1), "w2": (3, 1, 1), "w3": (7, 3, 1)}
    # one position's products: one row of x through w1, 5 columns of a through w2 and of b
    # through w3
    x = {"x": np.ones((1, 4), np.float32)}
    assert multiply_adds(model, ["w1", "w2", "w3"], x) == 5 * 4 + 3 * 1 * 5 + 7 * 3 * 5


@pytest.mark.parametrize(
    "op, shape, group, want",
    [
        ("Conv", (8, 3, 3, 3), 2, (8, 27, 2)),  # 8 outputs of C/G * 3 * 3 inputs
        ("Conv", (8, 1, 3, 3), 8, (8, 9, 8)),  # depthwise
        ("ConvTranspose", (6, 4, 3, 3), 2, (72, 3, 2)),  # 3 inputs per group to 4 * 9 each
        ("Gather", (50, 16), None, (16, 50, 1)),  # a lookup: a one-hot of 50 rows
    ],
)
def test_a_position_costs_the_weights_size(op, shape, group, want):
    from onnxhq.hessian.cost import weight_matrix
    from onnxhq.hessian.uses import Use

    attrs = {} if group is None else {"group": group}
    slot = 0 if op == "Gather" else 1
    use = Use("w", onnx.helper.make_node(op, ["a", "b"], ["y"], **attrs), slot, "x", shape)
    outputs, inputs, groups = weight_matrix(use)
    assert (outputs, inputs, groups) == want and outputs * inputs == np.prod(shape)
