"""Fidelity of one model to another on tiny models of each output kind, against numpy.

`onnxhq.evaluate.reference_outputs` runs the original once and detects each output's kind;
`onnxhq.evaluate.fidelity` compares another model with it. The expected values here are computed
from the two models' forward passes written in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhq.data import Dataset
from onnxhq.evaluate import OutputKind, fidelity, reference_outputs
from onnxhq.fidelity import ctc_greedy

RNG = np.random.default_rng(0)


def one_layer(w: np.ndarray, head: str | None, shape_in, shape_out, **attrs) -> onnx.ModelProto:
    """``x @ w`` (MatMul), then ``head`` (Softmax, Sigmoid, Tanh or None) as output ``y``."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z" if head else "y"])]
    if head:
        nodes.append(helper.make_node(head, ["z"], ["y"], **attrs))
    graph = helper.make_graph(
        nodes,
        "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def pair(head, shape_in, shape_out, w_shape, noise):
    w = RNG.normal(size=w_shape)
    v = w + noise * RNG.normal(size=w_shape)
    return one_layer(w, head, shape_in, shape_out), one_layer(v, head, shape_in, shape_out), w, v


def compared(head, x_shape, w_shape, noise, labels=None):
    """A `pair` on inputs ``x`` of ``x_shape``: the original's `reference_outputs`, the other's
    `fidelity` to it, and both models' pre-activations ``x @ w`` and ``x @ v`` in float64."""
    x = RNG.normal(size=x_shape).astype(np.float32)
    shape_in, shape_out = ["N", *x_shape[1:]], ["N", *x_shape[1:-1], w_shape[1]]
    original, other, w, v = pair(head, shape_in, shape_out, w_shape, noise)
    data = Dataset({"x": x}, labels)
    ref = reference_outputs(original, data)
    x64 = x.astype(np.float64)
    return ref, fidelity(ref, other, data)["y"], x64 @ w, x64 @ v


def test_sequence_probabilities_per_position_agreement_kl_and_decoded_strings():
    ref, got, za, zb = compared("Softmax", (40, 6, 5), (5, 4), 0.4)
    assert ref.kinds == {"y": OutputKind("classes", -1)}
    p, q = softmax(za), softmax(zb)
    assert set(got) == {"agreement", "kl", "sequence"}
    assert got["agreement"] == np.mean(p.argmax(-1) == q.argmax(-1))
    assert got["kl"] == pytest.approx(np.mean((p * np.log(p / q)).sum(-1)), rel=1e-4)
    same = [a == b for a, b in zip(ctc_greedy(p), ctc_greedy(q))]
    assert got["sequence"] == np.mean(same) and 0 < got["sequence"] < got["agreement"] < 1


def test_bernoulli_map_iou_at_one_half_and_max_abs_error():
    ref, got, za, zb = compared("Sigmoid", (30, 3, 8), (8, 8), 0.3)
    assert ref.kinds["y"].kind == "bernoulli"
    p, q = sigmoid(za), sigmoid(zb)
    on_p, on_q = (p > 0.5).reshape(30, -1), (q > 0.5).reshape(30, -1)
    iou = (on_p & on_q).sum(1) / (on_p | on_q).sum(1)
    assert set(got) == {"iou", "max_abs_error"}
    assert got["iou"] == pytest.approx(iou.mean(), rel=1e-9)
    assert got["max_abs_error"] == pytest.approx(np.abs(p - q).max(), rel=1e-4)


def test_real_outputs_cosine_mean_min_and_sqnr():
    ref, got, za, zb = compared("Tanh", (25, 2, 6), (6, 3), 0.1)
    assert ref.kinds["y"].kind == "real"
    a, b = np.tanh(za), np.tanh(zb)
    fa, fb = a.reshape(25, -1), b.reshape(25, -1)
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    sqnr = 10 * math.log10((a**2).sum() / ((a - b) ** 2).sum())
    assert set(got) == {"cosine", "cosine_min", "sqnr_db"}
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-6)
    assert got["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
    assert got["sqnr_db"] == pytest.approx(sqnr, rel=1e-4)


def test_rank2_logits_are_classes_with_accuracy_where_labels_fit():
    labels = RNG.integers(0, 3, 50)
    ref, got, za, zb = compared(None, (50, 7), (7, 3), 0.5, labels)
    assert ref.kinds["y"] == OutputKind("classes", -1)
    assert got["accuracy"] == np.mean(zb.argmax(1) == labels)
    assert ref.accuracy("y") == np.mean(za.argmax(1) == labels)
    assert got["agreement"] == np.mean(za.argmax(1) == zb.argmax(1))


def test_a_named_kind_overrides_the_detection():
    x = RNG.normal(size=(10, 7)).astype(np.float32)
    original, other, _, _ = pair(None, ["N", 7], ["N", 3], (7, 3), 0.5)
    ref = reference_outputs(original, Dataset({"x": x}), output="y:real")
    assert ref.kinds["y"].kind == "real"
    assert set(fidelity(ref, other, Dataset({"x": x}))["y"]) == {"cosine", "cosine_min", "sqnr_db"}


def test_the_same_model_is_perfectly_faithful():
    x = RNG.normal(size=(10, 6, 5)).astype(np.float32)
    original, _, _, _ = pair("Softmax", ["N", 6, 5], ["N", 6, 4], (5, 4), 0.0)
    ref = reference_outputs(original, Dataset({"x": x}))
    got = fidelity(ref, original, Dataset({"x": x}))["y"]
    assert got == {"agreement": 1.0, "kl": 0.0, "sequence": 1.0}


def test_the_options_know_every_metric_measure_returns():
    from onnxhq.fidelity import METRICS
    from onnxhq.options.target import FIDELITY_METRICS, LOWER_IS_BETTER

    assert set(FIDELITY_METRICS) == {m for names in METRICS.values() for m in names}
    assert set(FIDELITY_METRICS) >= LOWER_IS_BETTER
