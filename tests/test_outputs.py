"""Which output the loss reads: class scores found or checked by name, Softmax inputs as logits;
output kinds detected through pass-through ops, or given as NAME:KIND."""

from __future__ import annotations

import onnx
import onnx.parser
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper

from onnxhq.errors import ModelError
from onnxhq.options.parts import OptionError
from onnxhq.outputs import (
    ModelOutput,
    OutputSpec,
    class_score_output,
    logits_tensor,
    parse_output_spec,
    projection_output,
    reaching,
    resolve_output,
)


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


# --- output kinds ---------------------------------------------------------------------------


def parsed(text: str, outputs: str = "float y") -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T, 4] x) => ({outputs}) {{
      {text}
    }}""")


def test_a_per_position_softmax_of_rank_3_is_classes_read_through_its_input():
    model = parsed("z = MatMul(x, w)\n y = Softmax <axis = -1> (z)", "float[N, T, 5] y")
    assert resolve_output(model) == ModelOutput("y", "classes", "z", -1)


def test_the_softmax_is_found_through_identity_cast_reshape_transpose_squeeze():
    text = """z = MatMul(x, w)
      p = Softmax <axis = 2> (z)
      a = Identity(p)
      b = Cast <to = 1> (a)
      c = Transpose <perm = [1, 0, 2]> (b)
      d = Unsqueeze(c, one)
      y = Squeeze(d, one)"""
    assert resolve_output(parsed(text)) == ModelOutput("y", "classes", "z", 2)


def test_a_sigmoid_map_is_bernoulli_and_other_outputs_are_real():
    sig = parsed("z = MatMul(x, w)\n y = Sigmoid(z)")
    assert resolve_output(sig) == ModelOutput("y", "bernoulli", "z")
    normed = parsed("z = MatMul(x, w)\n n = ReduceL2 <axes = [-1]> (z)\n y = Div(z, n)")
    assert resolve_output(normed) == ModelOutput("y", "real", "y")


def test_rank_2_logits_of_a_linear_layer_are_classes_but_one_column_is_real():
    text = "f = Flatten(x)\n z = MatMul(f, w)\n y = Add(z, b)"
    assert resolve_output(parsed(text, "float[N, 3] y")).kind == "classes"
    assert resolve_output(parsed(text, "float[N, 1] y")).kind == "real"


def test_skl2onnx_probabilities_behind_identity_are_class_scores():
    text = """z = Gemm(x2, w, b)
      p = Softmax(z)
      probabilities = Identity(p)
      label = ArgMax <axis = 1> (z)"""
    head = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x2) => (int64[N, 1] label, float[N, 3] probabilities)"""
    model = onnx.parser.parse_model(f"{head} {{ {text} }}")
    assert resolve_output(model) == ModelOutput("probabilities", "classes", "z", -1)
    assert class_score_output(model) == ("probabilities", True)
    assert logits_tensor(model) == "z"


def test_an_old_opset_softmax_flattens_from_its_axis():
    model = parsed("z = MatMul(x, w)\n y = Softmax <axis = 1> (z)")
    model.opset_import[0].version = 11
    assert resolve_output(model) == ModelOutput("y", "classes", "z", 1, flat=True)


def test_a_kind_given_overrides_the_detection():
    model = parsed("z = MatMul(x, w)\n y = Sigmoid(z)")
    assert resolve_output(model, "y:real") == ModelOutput("y", "real", "y")
    assert resolve_output(model, ":classes") == ModelOutput("y", "classes", "y", -1)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("y", OutputSpec("y")),
        ("y:bernoulli", OutputSpec("y", "bernoulli")),
        (":real", OutputSpec(None, "real")),
        ("dense/Softmax:0", OutputSpec("dense/Softmax:0")),
        ("a:b:classes", OutputSpec("a:b", "classes")),
    ],
)
def test_output_specs_parse_name_and_kind(text, spec):
    assert parse_output_spec(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (":probs", r"'probs' is no output kind; choose one of classes, bernoulli, real"),
        ("", "NAME"),
    ],
)
def test_bad_output_specs_are_option_errors(text, match):
    with pytest.raises(OptionError, match=match):
        parse_output_spec(text)


def test_resolve_refuses_unknown_and_non_float_outputs():
    model = parsed("z = MatMul(x, w)\n y = ArgMax(z)", "int64 y")
    with pytest.raises(ModelError, match="no output 'q'; its outputs are y"):
        resolve_output(model, "q")
    with pytest.raises(ModelError, match="output 'y' has element type INT64"):
        resolve_output(model, "y")
    with pytest.raises(ModelError, match="no float output among y"):
        resolve_output(model)


def test_reaching_follows_inputs_and_the_names_subgraphs_read():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2] x, bool c) => (float[N, 2] y, float[N, 2] e) {
      h = MatMul(x, w1)
      y = If(c) <then_branch = t () => (float[N, 2] a) { a = MatMul(h, w2) },
                 else_branch = f () => (float[N, 2] b) { b = Identity(h) }>
      e = MatMul(x, w3)
    }""")
    assert reaching(model, "y", ["w3", "w2", "w1"]) == ["w2", "w1"]
    assert reaching(model, "e", ["w1", "w2", "w3"]) == ["w3"]
