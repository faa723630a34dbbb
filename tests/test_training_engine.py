"""The gradient engine: gradients equal central finite differences, the loss is the mean
cross-entropy, sampled labels follow the softmax, and parameter values can be overridden."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_convnet
from onnx import helper

from onnxhq.errors import ModelError
from onnxhq.training.engine import GradientEngine


def finite_difference(engine, x, y, name, index, eps=1e-2):
    values = {k: v.astype(np.float32) for k, v in engine.values.items()}
    plus, minus = values[name].copy(), values[name].copy()
    plus[index] += eps
    minus[index] -= eps
    lp, _ = engine.loss_and_gradients({"input": x}, y, {name: plus})
    lm, _ = engine.loss_and_gradients({"input": x}, y, {name: minus})
    return (lp - lm) / (2 * eps)


def test_gradients_equal_central_finite_differences(convnet, convnet_inputs):
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    _, grads = engine.loss_and_gradients({"input": x}, y)
    assert set(grads) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    rng = np.random.default_rng(0)
    for name, g in grads.items():
        assert g.shape == engine.values[name].shape
        for flat in rng.choice(g.size, size=min(4, g.size), replace=False):
            index = np.unravel_index(flat, g.shape)
            fd = finite_difference(engine, x, y, name, index)
            assert g[index] == pytest.approx(fd, rel=2e-2, abs=2e-4), (name, index)


def test_loss_is_mean_cross_entropy(convnet, convnet_inputs):
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    z = engine.logits({"input": x}).astype(np.float64)
    top = z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z - top).sum(1, keepdims=True)) - top
    loss, _ = engine.loss_and_gradients({"input": x}, y)
    assert loss == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)


def test_sampled_labels_follow_the_softmax(convnet):
    engine = GradientEngine(convnet)
    x = np.zeros((20000, 1, 6, 6), np.float32)  # one input repeated: one distribution
    labels = engine.sample_labels({"input": x}, np.random.default_rng(0))
    z = engine.logits({"input": x[:1]})[0].astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.bincount(labels, minlength=len(p)) / len(labels)
    assert np.abs(freq - p).max() < 0.015


def test_probability_output_uses_softmax_input(convnet, convnet_inputs):
    prob = small_convnet()
    prob.graph.node[-1].output[0] = "scores"
    prob.graph.node.append(helper.make_node("Softmax", ["scores"], ["logits"], axis=1))
    x, y = convnet_inputs
    l1, g1 = GradientEngine(convnet).loss_and_gradients({"input": x}, y)
    l2, g2 = GradientEngine(prob).loss_and_gradients({"input": x}, y)
    assert l1 == pytest.approx(l2, rel=1e-6)
    np.testing.assert_allclose(g1["fc.weight"], g2["fc.weight"], rtol=1e-5, atol=1e-7)


def test_an_output_without_recorded_shape_gives_the_same_loss(convnet, convnet_inputs):
    model = small_convnet()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    x, y = convnet_inputs
    loss, _ = GradientEngine(model).loss_and_gradients({"input": x}, y)
    want = GradientEngine(convnet).loss_and_gradients({"input": x}, y)[0]
    assert loss == pytest.approx(want, rel=1e-6)


def test_unknown_output_is_a_model_error(convnet):
    with pytest.raises(ModelError, match="no output 'nope'"):
        GradientEngine(convnet, output="nope")


def test_logits_follow_the_current_parameter_values(convnet, convnet_inputs):
    x, _ = convnet_inputs
    engine = GradientEngine(convnet)
    before = engine.logits({"input": x})
    engine.with_values({"fc.bias": engine.values["fc.bias"] + 1.0})
    np.testing.assert_allclose(engine.logits({"input": x}), before + 1.0, rtol=1e-5, atol=1e-5)


def test_fp16_weights_are_refused_with_a_way_out():
    from onnx import numpy_helper as nh

    model = small_convnet()
    for t in model.graph.initializer:
        t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    with pytest.raises(ModelError, match=r"FLOAT16.*float32.*--method kmeans"):
        GradientEngine(model, params=["conv.weight"])
