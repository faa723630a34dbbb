"""Folding inference BatchNormalization into the layer before it: same outputs, fewer tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxhq
from onnxhq.fold import batchnorm_affine, fold_batchnorms
from onnxhq.options import CompressOptions, OptionError

RNG = np.random.default_rng(0)


def _bn_inits(prefix: str, c: int) -> list[onnx.TensorProto]:
    values = {
        "scale": RNG.uniform(0.5, 2.0, c),
        "bias": RNG.standard_normal(c),
        "mean": RNG.standard_normal(c),
        "var": RNG.uniform(0.1, 3.0, c),
    }
    return [
        numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()
    ]


def _bn(x: str, y: str, prefix: str, **attrs) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], epsilon=1e-3, **attrs)


def _model(nodes, inits, x_shape, outputs=("y",), extra_inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape), *extra_inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, fold_batchnorms(out)


def _assert_same_outputs(model, folded, x_shape):
    x = RNG.standard_normal(x_shape).astype(np.float32)
    for want, got in zip(_run(model, x), _run(folded, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_bn(*, bias: bool, group: int = 1, cin: int = 4, cout: int = 6) -> onnx.ModelProto:
    inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [_w("W", cout, cin // group, 3, 3), *_bn_inits("bn", cout)]
    inits += [_w("B", cout)] if bias else []
    nodes = [
        helper.make_node("Conv", inputs, ["c"], group=group, pads=[1, 1, 1, 1]),
        _bn("c", "y", "bn"),
    ]
    return _model(nodes, inits, [2, cin, 5, 5])


@pytest.mark.parametrize(
    ("bias", "group", "cin", "cout"),
    [(False, 1, 4, 6), (True, 1, 4, 6), (False, 2, 4, 6), (True, 4, 4, 4)],
    ids=["conv", "conv-bias", "grouped", "depthwise"],
)
def test_conv_then_batchnorm_becomes_one_conv_with_the_same_outputs(bias, group, cin, cout):
    model = conv_bn(bias=bias, group=group, cin=cin, cout=cout)
    folded, count = _folded(model)
    assert count == 1 and _ops(folded) == ["Conv"]
    (conv,) = folded.graph.node
    assert len(conv.input) == 3 and conv.output[0] == "y"  # a bias, and the BN's output name
    assert {t.name for t in folded.graph.initializer} == {"W", conv.input[2]}  # BN tensors gone
    _assert_same_outputs(model, folded, [2, cin, 5, 5])


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_scales_its_weight_along_the_output_channels_of_each_group(group):
    # ConvTranspose weights are C_in x C_out/group x kH x kW: the output channel is axis 1 within
    # each group of input channels, not axis 0 as for Conv.
    cin, cout = 4, 6
    inits = [_w("W", cin, cout // group, 2, 2), *_bn_inits("bn", cout)]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=group, strides=[2, 2]),
        _bn("c", "y", "bn"),
    ]
    model = _model(nodes, inits, [2, cin, 3, 3])
    folded, count = _folded(model)
    assert count == 1 and _ops(folded) == ["ConvTranspose"]
    _assert_same_outputs(model, folded, [2, cin, 3, 3])


@pytest.mark.parametrize(("trans_b", "bias"), [(0, False), (1, True), (1, False)])
def test_gemm_then_batchnorm_folds_into_the_gemm(trans_b, bias):
    k, m = 5, 3
    w = _w("W", m, k) if trans_b else _w("W", k, m)
    inits = [w, *_bn_inits("bn", m)] + ([_w("C", m)] if bias else [])
    gemm = helper.make_node(
        "Gemm", ["x", "W"] + (["C"] if bias else []), ["g"], transB=trans_b, alpha=0.7, beta=1.3
    )
    model = _model([gemm, _bn("g", "y", "bn")], inits, [4, k])
    folded, count = _folded(model)
    assert count == 1 and _ops(folded) == ["Gemm"]
    _assert_same_outputs(model, folded, [4, k])


def test_batchnorm_affine_is_the_inference_formula():
    scale, bias, mean, var = (np.array([2.0, 0.5]), np.array([1.0, -1.0]),
                              np.array([0.5, 3.0]), np.array([4.0, 0.25]))  # fmt: skip
    s, t = batchnorm_affine(scale, bias, mean, var, 0.0)
    x = np.array([1.5, -2.0])
    np.testing.assert_allclose(s * x + t, scale * (x - mean) / np.sqrt(var) + bias)


def _left_alone(model: onnx.ModelProto) -> None:
    folded, count = _folded(model)
    assert count == 0 and folded == model


def test_a_conv_output_read_elsewhere_is_left_alone():
    model = conv_bn(bias=False)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    _left_alone(model)


def test_a_conv_output_that_is_a_graph_output_is_left_alone():
    model = conv_bn(bias=False)
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    _left_alone(model)


def test_a_weight_shared_by_two_layers_is_left_alone():
    model = conv_bn(bias=False)
    model.graph.node.append(helper.make_node("Conv", ["x", "W"], ["c2"], pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    _left_alone(model)


def test_batchnorm_parameters_fed_at_run_time_or_in_training_mode_are_left_alone():
    fed = conv_bn(bias=False)
    (mean,) = [t for t in fed.graph.initializer if t.name == "bn_mean"]
    fed.graph.initializer.remove(mean)
    fed.graph.input.append(helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, [6]))
    _left_alone(fed)
    training = conv_bn(bias=False)
    training.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    _left_alone(training)


def test_a_batchnorm_after_another_op_is_left_alone():
    inits = _bn_inits("bn", 4)
    model = _model([helper.make_node("Relu", ["x"], ["r"]), _bn("r", "y", "bn")], inits, [1, 4, 3])
    _left_alone(model)


# --- in compress ----------------------------------------------------------------------------


def _net() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> global pool -> Gemm: two BNs to fold."""
    inits = [_w("W1", 8, 3, 3, 3), _w("W2", 8, 8, 3, 3), _w("Wf", 8, 5)]
    inits += _bn_inits("bn1", 8) + _bn_inits("bn2", 8)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
        _bn("c1", "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        _bn("c2", "b2", "bn2"),
        helper.make_node("GlobalAveragePool", ["b2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8])


def test_compress_folds_by_default_and_says_how_many():
    model = _net()
    result = onnxhq.compress(model, hessian="none", bits=8)
    assert result.report.folded_batchnorms == 2
    assert result.report.to_dict()["folded_batchnorms"] == 2
    assert "batchnorms folded              2" in result.report.to_text()
    decoded = result.model()
    assert "BatchNormalization" not in _ops(decoded)
    assert result.report.unquantized_params == 16  # two folded biases, not 4 x 2 x 8 BN values
    x = RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)
    (want,), (got,) = _run(model, x), _run(decoded, x)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())  # 8 bits


def test_compress_without_folding_keeps_the_batchnorms():
    result = onnxhq.compress(_net(), hessian="none", bits=8, fold_batchnorm=False)
    assert result.report.folded_batchnorms == 0
    assert _ops(result.model()).count("BatchNormalization") == 2
    assert result.report.settings["fold_batchnorm"] is False
    assert CompressOptions.from_dict(result.report.settings).fold_batchnorm is False


def test_fold_batchnorm_must_be_a_bool():
    with pytest.raises(OptionError, match=r"^fold_batchnorm='no' must be a bool$"):
        CompressOptions(fold_batchnorm="no")  # type: ignore[arg-type]


def test_a_supplied_hessian_keeps_the_batchnorms_it_was_estimated_with():
    model = _net()
    diagonals = {
        t.name: np.ones(tuple(t.dims), np.float32)
        for t in model.graph.initializer
        if t.name in ("W1", "W2", "Wf")
    }
    result = onnxhq.compress(model, hessian=diagonals, bits=8)
    assert result.report.folded_batchnorms == 0
    assert _ops(result.model()).count("BatchNormalization") == 2


def test_a_batchnorm_that_would_move_the_weights_out_of_the_shared_range_is_left_alone(caplog):
    model = conv_bn(bias=False)
    (scale,) = [t for t in model.graph.initializer if t.name == "bn_scale"]
    scale.CopyFrom(numpy_helper.from_array(np.full(6, 1e-4, np.float32), "bn_scale"))
    with caplog.at_level("INFO", logger="onnxhq.fold"):
        _left_alone(model)
    assert "BatchNormalization after W left unfolded: it would scale the weights by about" in (
        caplog.text
    )
