"""Tests for models/resnet_cifar.py (random weights; ../shared is optional)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ort = pytest.importorskip("onnxruntime")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "resnet_cifar", os.path.join(_ROOT, "models", "resnet_cifar.py")
)
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)

_SHARED = os.path.join(os.path.dirname(_ROOT), "shared")


# ------------------------------------------------------------------ helpers
def _session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x, outputs=("logits",)):
    return _session(model).run(list(outputs), {"input": x})


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def np_option_a(x: np.ndarray, planes: int) -> np.ndarray:
    """Reference option-A shortcut: x[:, :, ::2, ::2] zero-padded by planes//4 channels a side."""
    p = planes // 4
    return np.pad(x[:, :, ::2, ::2], ((0, 0), (p, p), (0, 0), (0, 0)))


def np_conv3x3(x, w, stride):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    win = win[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


def np_bn(x, W, k, eps=1e-5):
    s = W[f"{k}.weight"] / np.sqrt(W[f"{k}.running_var"] + eps)
    return (x - W[f"{k}.running_mean"][:, None, None]) * s[:, None, None] + W[f"{k}.bias"][
        :, None, None
    ]


def np_resnet(W, x, depth):
    """Straightforward float64 numpy forward of the CIFAR ResNet (README architecture)."""
    W = {k: v.astype(np.float64) for k, v in W.items()}
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    h = (x.astype(np.float64) - mean) / std
    h = relu(np_bn(np_conv3x3(h, W["conv1.weight"], 1), W, "bn1"))
    n = (depth - 2) // 6
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            stride = 2 if (s > 1 and b == 0) else 1
            y = relu(np_bn(np_conv3x3(h, W[f"{p}.conv1.weight"], stride), W, f"{p}.bn1"))
            y = np_bn(np_conv3x3(y, W[f"{p}.conv2.weight"], 1), W, f"{p}.bn2")
            sc = np_option_a(h, planes) if h.shape[1] != planes else h
            h = relu(y + sc)
    h = h.mean(axis=(2, 3))
    return h @ W["linear.weight"].T + W["linear.bias"]


@pytest.fixture(scope="module")
def weights():
    return rc.random_weights(20, seed=1)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(2).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)


# ------------------------------------------------------------------ tests
def test_build_checks_and_shapes(weights, x):
    m = rc.build_resnet_cifar(weights)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    (inp,) = m.graph.input
    assert inp.name == "input"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in m.graph.output] == ["logits"]

    inits = {t.name for t in m.graph.initializer}
    assert set(weights) <= inits
    assert {"input_mean", "input_std"} <= inits
    names = [nd.name for nd in m.graph.node]
    assert all(names) and len(set(names)) == len(names)
    ops = {nd.op_type for nd in m.graph.node}
    assert ops == {
        "Sub",
        "Div",
        "Conv",
        "BatchNormalization",
        "Relu",
        "Add",
        "Slice",
        "Pad",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }
    assert sum(nd.op_type == "Conv" for nd in m.graph.node) == 19
    gemm = next(nd for nd in m.graph.node if nd.op_type == "Gemm")
    assert helper.get_attribute_value(gemm.attribute[0]) == 1  # transB

    (logits,) = _run(m, x)
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    (l1,) = _run(m, x[:1])  # dynamic batch
    np.testing.assert_allclose(l1, logits[:1], rtol=1e-5, atol=1e-5)


def test_matches_numpy_forward(weights, x):
    (logits,) = _run(rc.build_resnet_cifar(weights), x)
    ref = np_resnet(weights, x, 20)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_same_logits(weights, x):
    plain = rc.build_resnet_cifar(weights)
    folded = rc.build_resnet_cifar(weights, fold_batchnorm=True)
    onnx.checker.check_model(folded, full_check=True)
    assert not any(nd.op_type == "BatchNormalization" for nd in folded.graph.node)
    inits = {t.name for t in folded.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "layer3.2.conv2.bias", "linear.weight"} <= inits
    assert not any(".bn" in n or n.startswith("bn") for n in inits)
    (a,) = _run(plain, x)
    (b,) = _run(folded, x)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("block,planes", [("layer2.0", 32), ("layer3.0", 64)])
def test_option_a_shortcut_matches_numpy(weights, x, block, planes):
    prev = "layer1.2.relu2" if block == "layer2.0" else "layer2.2.relu2"
    m = _with_outputs(rc.build_resnet_cifar(weights), [prev, f"{block}.shortcut.pad"])
    h, sc = _run(m, x, outputs=(prev, f"{block}.shortcut.pad"))
    assert sc.shape == (2, planes, h.shape[2] // 2, h.shape[3] // 2)
    np.testing.assert_array_equal(sc, np_option_a(h, planes))
    # input channels sit in the middle, zeros on both sides
    p = planes // 4
    assert not sc[:, :p].any() and not sc[:, -p:].any()


def test_depth_inference_and_errors(weights):
    assert rc.infer_depth(weights) == 20
    w32 = rc.random_weights(32, seed=0)
    assert rc.infer_depth(w32) == 32
    m = rc.build_resnet_cifar(w32, depth=32)
    assert sum(nd.op_type == "Conv" for nd in m.graph.node) == 31
    with pytest.raises(ValueError, match="ResNet-20"):
        rc.build_resnet_cifar(weights, depth=32)
    bad = dict(weights)
    del bad["layer2.1.bn2.running_var"]
    with pytest.raises(KeyError, match=r"layer2\.1\.bn2\.running_var"):
        rc.build_resnet_cifar(bad)
    bad = dict(weights)
    bad["linear.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ValueError, match=r"linear\.weight"):
        rc.build_resnet_cifar(bad)


def test_load_roundtrip_and_missing(tmp_path, weights, x):
    p = tmp_path / "w.npz"
    np.savez(p, **weights)
    m = rc.load_resnet_cifar(str(p), fold_batchnorm=True)
    (a,) = _run(m, x)
    (b,) = _run(rc.build_resnet_cifar(weights, fold_batchnorm=True), x)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        rc.load_resnet_cifar(str(tmp_path / "missing.npz"))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        rc.load_cifar10_test(str(tmp_path / "missing.npz"))


def test_cli_missing_file_message(tmp_path, capsys):
    assert rc.main(["--weights", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err


def test_gradient_graph_builder_folded(weights):
    """The BN-folded graph builds a gradient graph with onnxruntime-training (onnxhq's engine)."""
    from onnxhq.training.engine import GradientEngine

    m = rc.build_resnet_cifar(weights, fold_batchnorm=True)
    params = [
        t.name
        for t in m.graph.initializer
        if t.data_type == TensorProto.FLOAT and t.name not in ("input_mean", "input_std")
    ]
    engine = GradientEngine(m, params=params)
    x = np.random.default_rng(3).uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)
    loss, grads = engine.loss_and_gradients({"input": x}, np.array([1, 7], np.int64))
    assert np.isfinite(loss)
    for p in params:
        assert grads[p].shape == engine.values[p].shape
    # d loss / d linear.bias = mean over batch of (softmax - onehot)
    lg = engine.logits({"input": x}).astype(np.float64)
    sm = np.exp(lg - lg.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    sm[[0, 1], [1, 7]] -= 1
    np.testing.assert_allclose(grads["linear.bias"], sm.mean(0), atol=1e-5)


_W20 = os.path.join(_SHARED, "models", "resnet20_cifar10.npz")
_C10 = os.path.join(_SHARED, "datasets", "cifar10.npz")


@pytest.mark.skipif(
    not (os.path.exists(_W20) and os.path.exists(_C10)),
    reason="../shared models/datasets not present",
)
def test_pretrained_resnet20_first_1000():
    x, y = rc.load_cifar10_test(_C10, limit=1000)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    # measured: 915/1000 (full split 9173/10000 = 91.73 %), with and without folding
    for fold in (False, True):
        m = rc.load_resnet_cifar(_W20, fold_batchnorm=fold)
        assert rc.evaluate(m, x, y, batch=500) == 915
