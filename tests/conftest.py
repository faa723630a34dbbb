"""Shared fixtures: small inline models and the bundled LeNet-5 with its MNIST sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from training_support import pytest_runtest_makereport  # noqa: F401 -- a hook, see there

from onnxhq.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = ROOT / "models" / "lenet5_mnist.onnx"
BUNDLED_SAMPLE = ROOT / "models" / "mnist_sample.npz"
BUNDLED_ADAM = ROOT / "models" / "lenet5_mnist_adam.npz"


def small_convnet(seed: int = 0, activation: str = "Tanh", classes: int = 4) -> onnx.ModelProto:
    """input [N,1,6,6] -> Conv 3@3x3 -> activation -> Flatten -> Gemm -> logits [N, classes]."""
    rng = np.random.default_rng(seed)
    params = {
        "conv.weight": rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 3).astype(np.float32),
        "fc.weight": rng.normal(0, 0.3, (classes, 48)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.1, classes).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv", kernel_shape=[3, 3]
        ),
        helper.make_node(activation, ["c"], ["a"], name="act"),
        helper.make_node("Flatten", ["a"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def with_dequantized_weights(model: onnx.ModelProto, books, tensors) -> onnx.ModelProto:
    """``model`` with each coded weight replaced by its float values: the reference a rewritten
    graph must compute. ``books``: key -> (k,) or (G, k); ``tensors``: name -> codes (codebook,
    indices, group_size), as `onnxhq.rewrite.rewrite` takes them."""
    from onnxhq.model import replace_initializers
    from onnxhq.rewrite import dequantized_value

    values = {}
    for name, c in tensors.items():
        book = np.asarray(books[c.codebook])
        values[name] = dequantized_value(book.reshape(-1), c.indices, book.shape[-1], c.group_size)
    return replace_initializers(model, values)


@pytest.fixture
def convnet() -> onnx.ModelProto:
    return small_convnet()


@pytest.fixture
def convnet_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(8, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, 8)


@pytest.fixture(scope="module")
def convnet_file(tmp_path_factory) -> Path:
    """`small_convnet` saved as an .onnx file."""
    path = tmp_path_factory.mktemp("model") / "convnet.onnx"
    onnx.save(small_convnet(), str(path))
    return path


@pytest.fixture(scope="module")
def convnet_data() -> Dataset:
    """64 labelled random inputs for `small_convnet` (4 classes)."""
    rng = np.random.default_rng(3)
    return Dataset(
        {"input": rng.normal(size=(64, 1, 6, 6)).astype(np.float32)}, rng.integers(0, 4, 64)
    )


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    if not BUNDLED_MODEL.is_file():
        pytest.fail(
            f"{BUNDLED_MODEL} is missing: the repository ships it (tools/train_mnist.py makes it)"
        )
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def bundled_sample() -> Path:
    return BUNDLED_SAMPLE
