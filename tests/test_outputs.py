"""Which output the loss reads: class scores found or checked by name, Softmax inputs as logits."""

from __future__ import annotations

import onnx
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper

from onnxhq.errors import ModelError
from onnxhq.outputs import class_score_output, logits_tensor, projection_output


def with_softmax(axis: int = 1) -> onnx.ModelProto:
    model = small_convnet()
    model.graph.node[-1].output[0] = "scores"
    model.graph.node.append(helper.make_node("Softmax", ["scores"], ["logits"], axis=axis))
    return model


def test_the_first_rank_2_float_output_holds_the_scores(convnet):
    assert class_score_output(convnet) == ("logits", False)
    assert logits_tensor(convnet) == "logits"


def test_an_output_without_recorded_shape_can_hold_the_scores():
    model = small_convnet()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    assert class_score_output(model) == ("logits", False)


def test_a_softmax_output_is_read_through_its_input():
    assert class_score_output(with_softmax()) == ("logits", True)
    assert logits_tensor(with_softmax()) == "scores"
    with pytest.raises(
        ModelError, match="Softmax over axis 0; onnxhq needs class scores on axis 1"
    ):
        logits_tensor(with_softmax(axis=0))


def test_a_named_output_must_exist(convnet):
    with pytest.raises(ModelError, match="no output 'nope'; its outputs are logits"):
        class_score_output(convnet, "nope")


def test_a_model_path_is_read_for_its_graph(convnet, tmp_path):
    onnx.save(convnet, tmp_path / "m.onnx")
    assert class_score_output(tmp_path / "m.onnx") == ("logits", False)
    assert class_score_output(str(tmp_path / "m.onnx")) == ("logits", False)


def test_no_rank_2_output_is_a_model_error_asking_for_a_name(convnet):
    convnet.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, 2])
    )
    with pytest.raises(ModelError, match=r"no output of rank 2.*name the class-score output"):
        class_score_output(convnet)


def test_projection_takes_the_first_float_output_and_refuses_others(convnet):
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])
    convnet.graph.output.insert(0, ids)
    assert projection_output(convnet) == ("logits", TensorProto.FLOAT)
    with pytest.raises(ModelError, match=r"output 'ids' has element type INT64.*needs a float"):
        projection_output(convnet, "ids")
    del convnet.graph.output[1]
    with pytest.raises(ModelError, match="no float output among ids"):
        projection_output(convnet)
