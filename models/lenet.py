"""ONNX builders for the MNIST reference networks: LeNet-5 (Caffe variant) and LeNet-300-100.

Both take ``input`` float32 [N, 1, 28, 28] (pixels / 255) and give ``logits`` float32 [N, 10].
Weights are initializers named like PyTorch state-dict keys (``conv1.weight``, ``fc1.bias``...).
Initialization: He-normal weights, zero biases, from ``seed``. ``tools/train_mnist.py`` trains them;
``tools/datasets.py`` reads MNIST.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(nodes, params: dict[str, np.ndarray], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxhq-models"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_lenet5(seed: int = 0) -> onnx.ModelProto:
    """Caffe LeNet-5: conv 20@5x5, maxpool 2, conv 50@5x5, maxpool 2, fc 500, ReLU, fc 10.

    431,080 parameters.
    """
    rng = np.random.default_rng(seed)
    params = {
        "conv1.weight": _he(rng, (20, 1, 5, 5), 25),
        "conv1.bias": np.zeros(20, np.float32),
        "conv2.weight": _he(rng, (50, 20, 5, 5), 500),
        "conv2.bias": np.zeros(50, np.float32),
        "fc1.weight": _he(rng, (500, 800), 800),
        "fc1.bias": np.zeros(500, np.float32),
        "fc2.weight": _he(rng, (10, 500), 500),
        "fc2.bias": np.zeros(10, np.float32),
    }
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["conv1"],
            name="conv1",
            kernel_shape=[5, 5],
        ),
        helper.make_node("MaxPool", ["conv1"], ["pool1"], name="pool1", **pool),
        helper.make_node(
            "Conv",
            ["pool1", "conv2.weight", "conv2.bias"],
            ["conv2"],
            name="conv2",
            kernel_shape=[5, 5],
        ),
        helper.make_node("MaxPool", ["conv2"], ["pool2"], name="pool2", **pool),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
    ]
    return _model(nodes, params, "lenet5")


def build_lenet300(seed: int = 0) -> onnx.ModelProto:
    """LeNet-300-100: MLP 784-300-100-10 with ReLU, input flattened inside the graph.

    266,610 parameters.
    """
    rng = np.random.default_rng(seed)
    params = {
        "fc1.weight": _he(rng, (300, 784), 784),
        "fc1.bias": np.zeros(300, np.float32),
        "fc2.weight": _he(rng, (100, 300), 300),
        "fc2.bias": np.zeros(100, np.float32),
        "fc3.weight": _he(rng, (10, 100), 100),
        "fc3.bias": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["fc2"], name="fc2", transB=1
        ),
        helper.make_node("Relu", ["fc2"], ["relu2"], name="relu2"),
        helper.make_node(
            "Gemm", ["relu2", "fc3.weight", "fc3.bias"], ["logits"], name="fc3", transB=1
        ),
    ]
    return _model(nodes, params, "lenet300")
