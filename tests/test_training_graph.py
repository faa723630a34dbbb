"""Training views: parameters become inputs once, BatchNormalization folds exactly, and the
builder's log filter drops onnxruntime's INFO lines but never a dying process's message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from training_support import needs_training_build

from onnxhq.errors import ModelError
from onnxhq.model import initializer_map
from onnxhq.runtime import make_session
from onnxhq.training import graph
from onnxhq.training.engine import GradientEngine


def inputs_of(model) -> dict[str, tuple]:
    return {
        v.name: tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim)
        for v in model.graph.input
    }


def test_parameters_become_inputs_of_their_type_and_shape(convnet):
    before = convnet.SerializeToString()
    shapes = graph.parameter_shapes(convnet)
    for view in (
        graph.build_training_model(convnet, ["fc.weight", "conv.bias"]),
        graph.build_projection_model(convnet, ["fc.weight", "conv.bias"]),
        graph.build_forward_model(convnet, ["fc.weight", "conv.bias"], "logits"),
    ):
        assert set(initializer_map(view)) == {"conv.weight", "fc.bias"}
        assert inputs_of(view)["fc.weight"] == shapes["fc.weight"] == (4, 48)
        assert inputs_of(view)["conv.bias"] == (3,)
    assert convnet.SerializeToString() == before  # the views are copies


def test_each_view_has_its_loss_and_inputs(convnet):
    training = graph.build_training_model(convnet, ["fc.bias"])
    assert [o.name for o in training.graph.output] == [graph.LOSS]
    assert graph.LABELS in inputs_of(training)
    projection = graph.build_projection_model(convnet, ["fc.bias"])
    assert [o.name for o in projection.graph.output] == [graph.LOSS]
    assert graph.PROJECTION in inputs_of(projection)
    forward = graph.build_forward_model(convnet, ["fc.bias"], "logits")
    assert [o.name for o in forward.graph.output] == ["logits"]


def test_a_parameter_that_is_not_an_initializer_is_named(convnet):
    with pytest.raises(ModelError, match="cannot differentiate 'c': it is not an initializer"):
        graph.parameters_as_inputs(convnet, ["fc.bias", "c"])


@needs_training_build
def test_the_gradient_graph_has_one_gradient_per_parameter(convnet):
    grads = graph.build_gradient_model(
        graph.build_training_model(convnet, ["fc.weight"]), ["fc.weight"]
    )
    assert {graph.LOSS, graph.grad_name("fc.weight")} <= {o.name for o in grads.graph.output}


def test_inference_batchnorm_becomes_differentiable_affine():
    rng = np.random.default_rng(0)
    c = 3
    bn = {n: rng.uniform(0.5, 1.5, c).astype(np.float32) for n in ("scale", "bias", "mean", "var")}
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], epsilon=1e-3
        ),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=(c, 1, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(v, k) for k, v in bn.items()]
    bn_graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])],
        inits,
    )
    model = helper.make_model(bn_graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(4, 1, 6, 6)).astype(np.float32)
    reference = make_session(model).run(None, {"input": x})[0]
    affine = helper.make_model(bn_graph, opset_imports=[helper.make_opsetid("", 17)])
    affine.ir_version = 8
    assert graph.frozen_batchnorm_as_affine(affine) == 1
    np.testing.assert_allclose(
        make_session(affine).run(None, {"input": x})[0], reference, rtol=1e-5, atol=1e-6
    )
    assert graph.default_params(model) == ["w"]  # BN's own parameters stay frozen
    engine = GradientEngine(model)
    _, grads = engine.loss_and_gradients({"input": x}, np.array([0, 1, 2, 0]))
    assert grads["w"].shape == (c, 1, 3, 3) and np.abs(grads["w"]).sum() > 0


FILTERED = """
    import os
    from onnxhq.training.graph import _onnxruntime_info_filtered
    with _onnxruntime_info_filtered():
        os.write(2, b"2026-01-01 00:00:00.0 [I:onnxruntime:Default, x.cc:1 Apply] chatter\\n")
        os.write(2, b"native: something worth reading\\n")
        {end}
"""


def run_filtered(end: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(FILTERED).format(end=end)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_builder_filter_drops_info_lines_and_passes_the_rest():
    done = run_filtered("pass")
    assert done.returncode == 0
    assert done.stderr == "native: something worth reading\n"


def test_the_builder_filter_passes_on_the_message_of_a_dying_process():
    died = run_filtered("os.abort()")
    assert died.returncode != 0
    assert died.stderr == "native: something worth reading\n"


def test_building_a_gradient_graph_leaves_stderr_quiet(convnet, capfd):
    GradientEngine(convnet)
    assert capfd.readouterr().err == ""
