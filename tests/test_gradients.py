"""The gradient engine: gradients equal central finite differences; Adam trains; BN is handled."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhq.errors import ModelError
from onnxhq.gradients import GradientEngine, adam_init, adam_step, frozen_batchnorm_as_affine, train
from onnxhq.runtime import make_session

from conftest import small_convnet


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
    loss, grads = engine.loss_and_gradients({"input": x}, y)
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
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
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


def test_unknown_output_is_a_model_error(convnet):
    with pytest.raises(ModelError, match="no output 'nope'"):
        GradientEngine(convnet, output="nope")


def test_adam_training_lowers_the_loss(convnet, convnet_inputs):
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    before, _ = engine.loss_and_gradients({"input": x}, y)
    params, state = train(engine, {"input": x}, y, epochs=60, batch_size=8, lr=0.02)
    after, _ = engine.loss_and_gradients({"input": x}, y, params)
    assert after < 0.5 * before
    assert state.step == 60
    v = state.second_moment()
    assert all(np.all(v[k] >= 0) and v[k].shape == params[k].shape for k in params)


def test_adam_masks_hold_pruned_weights_at_zero(convnet):
    params = {"w": np.ones((3, 3), np.float32)}
    mask = {"w": np.eye(3, dtype=bool)}
    new, _ = adam_step(params, {"w": np.ones((3, 3), np.float32)}, adam_init(params), lr=0.1, masks=mask)
    assert np.all(new["w"][~mask["w"]] == 0) and np.all(new["w"][mask["w"]] != 0)
    assert np.all(params["w"] == 1)  # inputs are not mutated


def test_inference_batchnorm_becomes_differentiable_affine():
    rng = np.random.default_rng(0)
    c = 3
    bn = {n: rng.uniform(0.5, 1.5, c).astype(np.float32) for n in ("scale", "bias", "mean", "var")}
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], epsilon=1e-3),
             helper.make_node("GlobalAveragePool", ["b"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    inits = [numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(v, k) for k, v in bn.items()]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(4, 1, 6, 6)).astype(np.float32)
    reference = make_session(model).run(None, {"input": x})[0]
    affine = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    affine.ir_version = 8
    assert frozen_batchnorm_as_affine(affine) == 1
    np.testing.assert_allclose(make_session(affine).run(None, {"input": x})[0], reference, rtol=1e-5, atol=1e-6)
    engine = GradientEngine(model)
    assert engine.params == ["w"]
    _, grads = engine.loss_and_gradients({"input": x}, np.array([0, 1, 2, 0]))
    assert grads["w"].shape == (c, 1, 3, 3) and np.abs(grads["w"]).sum() > 0


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
    with pytest.raises(ModelError, match="FLOAT16.*float32.*--method kmeans"):
        GradientEngine(model, params=["conv.weight"])


def test_an_output_without_recorded_shape_can_hold_the_scores(convnet, convnet_inputs):
    from onnxhq.gradients import class_score_output

    model = small_convnet()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    assert class_score_output(model) == ("logits", False)
    x, y = convnet_inputs
    loss, _ = GradientEngine(model).loss_and_gradients({"input": x}, y)
    assert loss == pytest.approx(GradientEngine(convnet).loss_and_gradients({"input": x}, y)[0], rel=1e-6)
