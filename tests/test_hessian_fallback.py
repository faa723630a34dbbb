"""compress's default Hessian on any model: gradients through rewritten ops, the forward-only
``activations`` Hessian, the fallback to it (one warning), errors naming the op, and embedding
tables compressed by default."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from training_support import needs_training, without_training

from onnxhq import importances
from onnxhq.data import Dataset
from onnxhq.errors import ModelError
from onnxhq.importances import estimate_hessian, estimate_importances, quantized_names
from onnxhq.model import load_model
from onnxhq.options import CompressOptions, HessianSource
from onnxhq.outputs import resolve_output
from onnxhq.training.graph import gradient_build_error
from onnxhq.training.output_engine import OutputEngine


def two_layers(act: str) -> tuple[onnx.ModelProto, Dataset]:
    """x (N, 4) -> MatMul w1 (4, 6) -> ``act`` -> MatMul w2 (6, 3) -> y (N, 3), real-valued."""
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) {{
      h = MatMul(x, w1)
      a = {act}(h)
      y = MatMul(a, w2)
    }}""")
    model.graph.node[1].name = "act"
    rng = np.random.default_rng(0)
    for name, shape in (("w1", (4, 6)), ("w2", (6, 3))):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        )
    return model, Dataset({"x": rng.normal(size=(32, 4)).astype(np.float32)})


def test_an_op_without_gradient_is_rewritten_inside_the_gradient_view():
    model, data = two_layers("HardSigmoid")
    engine = OutputEngine(model, ["w1", "w2"], output="y:real")
    x = data.inputs["x"][:4]
    r = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    grads = engine.projected_gradients({"x": x}, r)
    w1 = engine.values["w1"].astype(np.float64)
    w2 = engine.values["w2"].astype(np.float64)
    h = x.astype(np.float64) @ w1
    slope = np.where((h * 0.2 + 0.5 > 0) & (h * 0.2 + 0.5 < 1), 0.2, 0.0)
    want = x.T.astype(np.float64) @ ((r @ w2.T) * slope)
    np.testing.assert_allclose(grads["w1"], want, rtol=1e-4, atol=1e-6)


@needs_training
def test_the_default_falls_back_to_activations_with_one_warning(caplog):
    model, data = two_layers("Atan")
    with caplog.at_level(logging.WARNING):
        diag = estimate_importances(model, data, CompressOptions())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "no gradient for Atan (node 'act')" in message
    assert "using the 'activations' Hessian" in message
    assert diag is not None and set(diag) == {"w1", "w2"}
    for v in diag.values():
        assert np.isfinite(v).all() and (v > 0).all()
    direct = estimate_hessian(model, data, method="activations")
    for name in diag:
        np.testing.assert_array_equal(diag[name], direct[name])


@without_training
def test_the_default_falls_back_when_onnxruntime_training_is_missing(caplog, monkeypatch):
    monkeypatch.setattr(importances, "training_available", lambda: False)
    model, data = two_layers("Tanh")
    with caplog.at_level(logging.WARNING):
        diag = estimate_importances(model, data, CompressOptions())
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "needs onnxruntime-training, which is not installed" in warning.getMessage()
    assert diag is not None and all(np.isfinite(v).all() for v in diag.values())


def test_a_gradient_hessian_asked_for_fails_naming_the_op_and_node():
    model, data = two_layers("Atan")
    options = CompressOptions(hessian="fisher")
    assert options.hessian == HessianSource("fisher") and not options.hessian.fallback
    with pytest.raises(ModelError) as caught:
        estimate_importances(model, data, options)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "onnxruntime-training has no gradient for Atan (node 'act'), and onnxhq has no rewrite "
        "for it; use --hessian activations (forward passes only) or --hessian none"
    )


def test_a_long_builder_message_keeps_its_cause():
    cause = "The gradient builder failed: Cause at the end"
    text = "/onnxruntime_src/x.cc:29 " + "GetGradientForOp(const std::string&) " * 30 + cause
    message = str(gradient_build_error(text))
    assert cause in message and "--hessian activations" in message


@without_training
def test_the_activations_hessian_needs_no_labels_and_no_gradients():
    model, data = two_layers("Atan")
    diag = estimate_hessian(model, data, method="activations", samples=16, batch_size=8)
    assert {k: v.shape for k, v in diag.items()} == {"w1": (4, 6), "w2": (6, 3)}
    assert all(np.isfinite(v).all() and (v > 0).all() for v in diag.values())


def embedding(rows: int, dim: int) -> onnx.ModelProto:
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (int64[N, 5] ids) => (float[N, 5, 3] y) {
      e = Gather(table, ids)
      y = MatMul(e, w)
    }""")
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.normal(size=(rows, dim)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.normal(size=(dim, 3)).astype(np.float32), "w"),
        ]
    )
    return model


def test_large_embedding_tables_are_compressed_by_default_and_small_ones_on_request():
    assert quantized_names(embedding(1024, 8)) == ["table", "w"]  # 8192 >= 4096 elements
    assert quantized_names(embedding(100, 8)) == ["w"]
    assert quantized_names(embedding(100, 8), extra_ops=("Gather",)) == ["table", "w"]


def test_the_default_fisher_of_an_embedding_model_reads_the_table():
    model = embedding(1024, 8)
    ids = np.random.default_rng(1).integers(0, 1024, (16, 5))
    diag = estimate_hessian(model, Dataset({"ids": ids}), samples=16)
    rows_read = np.unique(ids)
    assert diag["table"][rows_read].min() > diag["table"].min()  # unread rows sit at the floor


# --- the real models (slow; skipped without ../shared) --------------------------------------

SHARED = Path(os.environ.get("ONNXHQ_SHARED", Path(__file__).parents[2] / "shared"))
REAL_MODELS = {  # file -> (input sample shape, output kind the default detects)
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ((3, 48, 192), "classes"),
    "ch_PP-OCRv4_det_infer.onnx": ((3, 64, 96), "bernoulli"),
    "ch_PP-OCRv4_rec_infer.onnx": ((3, 48, 160), "classes"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_the_default_hessian_of_the_real_models_is_a_finite_fisher(name, caplog):
    path = SHARED / "models" / "real" / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    shape, kind = REAL_MODELS[name]
    model = load_model(path)
    assert resolve_output(model).kind == kind
    x = np.random.default_rng(0).uniform(-1, 1, (8, *shape)).astype(np.float32)
    options = CompressOptions.from_keywords(hessian_samples=8)
    with caplog.at_level(logging.WARNING):
        diag = estimate_importances(model, Dataset({"x": x}), options)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no fallback
    assert diag is not None and set(diag) == set(quantized_names(model))
    assert all(np.isfinite(v).all() and (v > 0).all() for v in diag.values())
