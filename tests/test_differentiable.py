"""Rewrites of ops without a gradient: same values, and gradients equal to finite differences.

Each case is a tiny model ``y = OP(x @ W)``, ``loss = sum(y * r)`` with the weight ``W`` a graph
input. The rewritten model must compute the original's values, onnxruntime-training's gradient
builder must build its gradient graph, and the gradient it returns must equal central finite
differences of the *original* model's loss.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxhq import differentiable
from onnxhq.differentiable import make_differentiable, parse_builder_error, unsupported_ops
from onnxhq.errors import ModelError
from onnxhq.training import worker

ort.set_default_logger_severity(3)

X_SHAPE, W_SHAPE = (2, 4, 3, 3), (3, 3)
CONSTANTS = """
  s4 = Constant<value=float[4] {1.5, 0.5, -1.0, 2.0}>()
  b4 = Constant<value=float[4] {0.1, -0.2, 0.3, 0.0}>()
  m4 = Constant<value=float[4] {0.2, 0.0, -0.5, 1.0}>()
  v4 = Constant<value=float[4] {0.5, 2.0, 1.0, 0.1}>()
  slope = Constant<value=float[4, 1, 1] {0.1, -0.3, 0.25, 2.0}>()
  lo = Constant<value=float {-0.3}>()
  hi = Constant<value=float {0.6}>()
"""

# op text reading h = x @ W, the opset, the number of nodes rewritten
CASES = {
    "HardSigmoid": ("y = HardSigmoid<alpha=0.3, beta=0.4>(h)", 17, 1),
    "HardSigmoid_opset12": ("y = HardSigmoid(h)", 12, 1),
    "HardSwish": ("y = HardSwish(h)", 17, 1),
    "Softplus": ("y = Softplus(h)", 17, 1),
    "Softsign": ("y = Softsign(h)", 17, 1),
    "Elu": ("y = Elu<alpha=0.7>(h)", 17, 1),
    "Selu": ("y = Selu(h)", 17, 1),
    "Celu": ("y = Celu<alpha=1.3>(h)", 17, 1),
    "PRelu": ("y = PRelu(h, slope)", 17, 1),
    "ThresholdedRelu": ("y = ThresholdedRelu<alpha=0.5>(h)", 17, 1),
    "BatchNormalization": ("y = BatchNormalization<epsilon=0.01>(h, s4, b4, m4, v4)", 17, 1),
    "Dropout": ("y = Dropout(h)", 17, 1),
    "Sum": ("y = Sum(h, x, h)", 17, 1),
    "Mean": ("y = Mean(h, x, h)", 17, 1),
    "LRN_odd": ("y = LRN<size=3, alpha=0.5, beta=0.75, bias=1.5>(h)", 17, 1),
    "LRN_5": ("y = LRN<size=5, alpha=0.3, beta=0.6, bias=1.0>(h)", 17, 1),  # ORT: odd sizes only
    "LRN_opset9": ("y = LRN<size=3, alpha=0.5>(h)", 9, 1),
}


def tiny_model(
    body: str, opset: int, *, shapeless: bool = False, x_dims: str = "2, 4, 3, 3"
) -> onnx.ModelProto:
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[{x_dims}] x, float[3, 3] W, float[2, 4, 3, 3] r) => (float loss) {{
      {CONSTANTS}
      h = MatMul(x, W)
      {body}
      yr = Mul(y, r)
      loss = ReduceSum<keepdims=0>(yr)
    }}"""
    model = onnx.parser.parse_model(text)
    if shapeless:  # shape inference then knows no rank downstream of x
        model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    return model


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=X_SHAPE).astype(np.float32),
        "W": rng.normal(size=W_SHAPE).astype(np.float32),
        "r": rng.normal(size=X_SHAPE).astype(np.float32),
    }


def run(model, feed: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    """``outputs`` of ``model`` (a ModelProto, or a `gradient_model` session) for ``feed``."""
    if isinstance(model, worker.RemoteSession):
        return model.run(outputs, feed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


def gradient_model(model: onnx.ModelProto, params: list[str], loss: str = "loss"):
    """A session on the gradient graph, built and run by onnxruntime-training's worker."""
    return worker.gradient_session(model.SerializeToString(), loss, params)


def central_differences(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], *, step: float, param: str = "W"
) -> np.ndarray:
    grad = np.zeros(feed[param].shape)
    for idx in np.ndindex(*grad.shape):
        losses = []
        for sign in (1.0, -1.0):
            moved = dict(feed, **{param: feed[param].copy()})
            moved[param][idx] += sign * step
            losses.append(float(run(model, moved, ["loss"])[0]))
        grad[idx] = (losses[0] - losses[1]) / (2 * step)
    return grad


def check_rewrite(model: onnx.ModelProto, expected_count: int) -> None:
    before = model.SerializeToString()
    rewritten, count = make_differentiable(model)
    assert model.SerializeToString() == before, "the input model was changed"
    assert count == expected_count
    feed = feeds()
    np.testing.assert_allclose(
        run(rewritten, feed, ["y"])[0], run(model, feed, ["y"])[0], rtol=2e-6, atol=1e-6
    )
    grad_model = gradient_model(rewritten, ["W"])
    (got,) = run(grad_model, feed, ["W_grad"])
    want = central_differences(model, feed, step=2e-3)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_keeps_values_and_gradient_equals_finite_differences(case):
    body, opset, count = CASES[case]
    model = tiny_model(body, opset)
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    check_rewrite(model, count)


def test_batchnorm_of_unknown_rank_reshapes_at_run_time():
    body = CASES["BatchNormalization"][0]
    model = tiny_model(body, 17, shapeless=True)
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    check_rewrite(model, 1)


def test_maxpool_over_symbolic_dims_is_flagged_and_pinned_shapes_give_true_gradients():
    body = "p = MaxPool<kernel_shape=[2, 2], pads=[0, 0, 1, 1]>(h)\n  y = Mul(p, h)"
    model = tiny_model(body, 17, x_dims="N, 4, H, W")
    next(n for n in model.graph.node if n.op_type == "MaxPool").name = "pool"
    assert unsupported_ops(model, params=["W"]) == [("MaxPool", "pool")]
    pinned = {"x": (None, 4, 3, 3)}
    assert unsupported_ops(model, params=["W"], input_shapes=pinned) == []
    rewritten, _ = make_differentiable(model, input_shapes=pinned)
    feed = feeds()
    (got,) = run(gradient_model(rewritten, ["W"]), feed, ["W_grad"])
    want = central_differences(model, feed, step=2e-3)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    with pytest.raises(ModelError, match=r"cannot pin input 'x' of rank 4 to shape \(3, 3\)"):
        make_differentiable(model, input_shapes={"x": (3, 3)})


def check_weight_op(
    body: str, k_shape: tuple[int, ...], x_dims: str = "2, 4, 3, 3"
) -> onnx.ModelProto:
    """``body`` computing y from x (2, 4, 3, 3) and a weight K, loss = sum(y sin y): values and
    gradients of the rewritten model against the original's; returns the rewritten model."""
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[{x_dims}] x, float[{", ".join(map(str, k_shape))}] K) => (float loss) {{
      {CONSTANTS}
      {body}
      s = Sin(y)
      ys = Mul(y, s)
      loss = ReduceSum<keepdims=0>(ys)
    }}"""
    model = onnx.parser.parse_model(text)
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    rewritten, count = make_differentiable(model)
    assert count == 1
    rng = np.random.default_rng(4)
    feed = {
        "x": rng.normal(size=X_SHAPE).astype(np.float32),
        "K": rng.normal(size=k_shape).astype(np.float32),
    }
    np.testing.assert_allclose(
        run(rewritten, feed, ["y"])[0], run(model, feed, ["y"])[0], rtol=1e-5, atol=1e-5
    )
    (got,) = run(gradient_model(rewritten, ["K"]), feed, ["K_grad"])
    want = central_differences(model, feed, step=2e-3, param="K")
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    return rewritten


@pytest.mark.parametrize(
    "attrs, k_shape",
    [
        ("strides=[2, 2]", (4, 3, 2, 2)),  # the detector's upsampling
        (
            "strides=[2, 1], pads=[1, 0, 0, 2], output_padding=[1, 0], dilations=[1, 2]",
            (4, 3, 3, 2),
        ),
        ("strides=[3, 2], group=2, pads=[2, 1, 2, 1]", (4, 1, 3, 3)),
        ("group=1", (4, 2, 1, 3)),
    ],
)
def test_conv_transpose_becomes_conv_with_the_same_values_and_gradients(attrs, k_shape):
    rewritten = check_weight_op(f"y = ConvTranspose<{attrs}>(x, K)", k_shape)
    assert "ConvTranspose" not in {n.op_type for n in rewritten.graph.node}


@pytest.mark.parametrize(
    "attrs, scales",
    [
        (
            'mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"',
            "1., 1., 2., 3.",
        ),  # the detector's
        ('mode="nearest"', "1., 1., 3., 2."),  # half_pixel, round_prefer_floor
        ('mode="nearest", nearest_mode="round_prefer_ceil"', "1., 2., 1., 4."),
    ],
)
def test_nearest_resize_by_whole_factors_becomes_expand(attrs, scales):
    body = f"f = Constant<value=float[4] {{{scales}}}>()\n      xk = Mul(x, K)\n      "
    rewritten = check_weight_op(body + f"y = Resize<{attrs}>(xk, , f)", (4, 1, 1))
    assert "Resize" not in {n.op_type for n in rewritten.graph.node}


@pytest.mark.parametrize(
    "attrs",
    [
        "kernel_shape=[3, 2], strides=[3, 2]",
        "kernel_shape=[2, 2], pads=[1, 0, 0, 1], count_include_pad=1",
        "kernel_shape=[2, 3], strides=[1, 2]",
    ],
)
def test_average_pool_becomes_a_depthwise_conv_even_with_a_symbolic_batch(attrs):
    body = f"xk = Mul(x, K)\n      y = AveragePool<{attrs}>(xk)"
    rewritten = check_weight_op(body, (4, 1, 1), x_dims="N, 4, 3, 3")
    assert "AveragePool" not in {n.op_type for n in rewritten.graph.node}


def test_other_resizes_are_kept_and_reported():
    model = tiny_model(
        "f = Constant<value=float[4] {1., 1., 1.5, 2.}>()\n"
        '  p = Resize<mode="linear">(h, , f)\n  y = ReduceSum(p)',
        17,
    )
    assert make_differentiable(model)[1] == 0
    assert [op for op, _ in unsupported_ops(model, params=["W"])] == ["Resize"]


def test_old_opsets_are_converted_and_new_ones_kept():
    old, _ = make_differentiable(tiny_model("y = Relu(h)", 12))
    new, count = make_differentiable(tiny_model("y = Relu(h)", 15))
    assert [o.version for o in old.opset_import] == [differentiable.TARGET_OPSET]
    assert [o.version for o in new.opset_import] == [15] and count == 0


def test_unsupported_ops_name_op_and_node_and_match_the_builder_error():
    model = tiny_model("yy = ReduceMax<keepdims=1>(h)\n y = Add(yy, h)", 17)
    next(n for n in model.graph.node if n.op_type == "ReduceMax").name = "the_max"
    assert unsupported_ops(model, params=["W"]) == [("ReduceMax", "the_max")]
    as_weight = onnx.ModelProto()
    as_weight.CopyFrom(model)
    as_weight.graph.initializer.append(onnx.numpy_helper.from_array(feeds()["W"], "W"))
    del as_weight.graph.input[1]
    assert unsupported_ops(as_weight) == [("ReduceMax", "the_max")]  # initializers by default
    rewritten, _ = make_differentiable(model)
    with pytest.raises(Exception) as err:
        gradient_model(rewritten, ["W"])
    assert parse_builder_error(str(err.value)) == ("ReduceMax", "the_max")
    assert parse_builder_error("some other failure") is None


def test_unsupported_ops_skip_rewritable_and_off_path_nodes():
    body = "y = HardSigmoid(h)\n  k = ReduceMax(x)"  # k does not reach the loss
    assert unsupported_ops(tiny_model(body, 17), params=["W"]) == []
    foreign = tiny_model("y = Relu(h)", 17)
    foreign.graph.node.insert(
        len(foreign.graph.node) - 2,
        helper.make_node("Frobnicate", ["h"], ["h2"], name="custom", domain="example.org"),
    )
    foreign.graph.node[-2].input[0] = "h2"  # yr = Mul(h2, r)
    foreign.opset_import.append(helper.make_opsetid("example.org", 1))
    assert unsupported_ops(foreign, params=["W"]) == [("Frobnicate", "custom")]


# --- the real models (slow; skipped without ../shared) --------------------------------------

SHARED = Path(os.environ.get("ONNXHQ_SHARED", Path(__file__).parents[2] / "shared"))
REAL = SHARED / "models" / "real"
REAL_MODELS = {  # file -> an input shape it accepts
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (2, 3, 48, 192),
    "ch_PP-OCRv4_det_infer.onnx": (1, 3, 64, 96),
    "ch_PP-OCRv4_rec_infer.onnx": (2, 3, 48, 160),
}


def training_view(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The weights of Conv/ConvTranspose/MatMul/Gemm as graph inputs (returned with their values),
    and outputs ``loss`` = sum(output^2) and the model's first output."""
    from onnxhq.model import materialize_constants

    m = onnx.ModelProto()
    m.CopyFrom(model)
    materialize_constants(m)
    inits = {t.name: t for t in m.graph.initializer}
    params = sorted(
        {
            n.input[1]
            for n in m.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")
            and len(n.input) > 1
            and n.input[1] in inits
        }
    )
    keep = [t for t in m.graph.initializer if t.name not in params]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.input.extend(
        helper.make_tensor_value_info(p, inits[p].data_type, list(inits[p].dims)) for p in params
    )
    out = m.graph.output[0].name
    m.graph.node.extend(
        [
            helper.make_node("Mul", [out, out], ["onnxhq_sq"]),
            helper.make_node("ReduceSum", ["onnxhq_sq"], ["loss"], keepdims=0),
        ]
    )
    del m.graph.output[:]
    m.graph.output.extend(
        [
            helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
            helper.make_tensor_value_info(out, TensorProto.FLOAT, None),
        ]
    )
    return m, {p: onnx.numpy_helper.to_array(inits[p]) for p in params}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_models_gradient_graphs_build_after_the_rewrite(name):
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    view, weights = training_view(onnx.load(path))
    x = np.random.default_rng(0).uniform(-1, 1, REAL_MODELS[name]).astype(np.float32)
    pinned = {"x": (None, *x.shape[1:])}  # the cls model's MaxPool needs static H, W
    rewritten, count = make_differentiable(view, input_shapes=pinned)
    assert count > 0 and unsupported_ops(view, list(weights), input_shapes=pinned) == []
    feed = {"x": x, **weights}
    out = view.graph.output[1].name
    np.testing.assert_allclose(
        run(rewritten, feed, [out])[0], run(view, feed, [out])[0], rtol=1e-4, atol=1e-5
    )
    grads = run(gradient_model(rewritten, list(weights)), feed, [f"{p}_grad" for p in weights])
    assert all(np.isfinite(g).all() for g in grads)
    assert sum(float(np.abs(g).sum()) for g in grads) > 0
