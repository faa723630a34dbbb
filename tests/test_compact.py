"""Short names in the written graph: same outputs, fewer bytes, graph and sidecar in agreement."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper, numpy_helper

import onnxhq
from onnxhq import naming, pipeline
from onnxhq.cli import build_parser
from onnxhq.cli.common import option_keywords
from onnxhq.compact import base36, compact_graph, name_plan
from onnxhq.decode import decode_file
from onnxhq.describe import describe_artifacts
from onnxhq.sidecar import decode_sidecar


def _run(model, x: np.ndarray, name: str = "input") -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})


def _exported() -> onnx.ModelProto:
    """`small_convnet` with exporter-style long names and doc strings."""
    model = small_convnet()
    for node in model.graph.node:
        node.name = f"/model/layers.0/{node.name}/{node.op_type}_output_0"
        node.doc_string = "exported from some framework, file model.py line 42"
    model.doc_string = "a model"
    return model


def test_base36_counts_in_lower_case_digits():
    assert [base36(n) for n in (0, 9, 10, 35, 36, 36**2 + 1)] == ["0", "9", "a", "z", "10", "101"]


def test_short_names_keep_the_outputs_and_shrink_the_graph(tmp_path):
    model = _exported()
    short = onnxhq.compress(model, hessian="none", k=4)
    kept = onnxhq.compress(model, hessian="none", k=4, compact_names=False)
    assert len(short.artifacts.graph_bytes) < len(kept.artifacts.graph_bytes)
    x = np.random.default_rng(0).standard_normal((5, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(short.model(), x)[0], _run(kept.model(), x)[0])
    decoded = short.model()
    assert [i.name for i in decoded.graph.input] == ["input"]
    assert [o.name for o in decoded.graph.output] == ["logits"]
    assert not any(n.doc_string for n in decoded.graph.node) and not decoded.doc_string
    written = onnx.load_from_string(short.artifacts.graph_bytes).graph
    assert naming.PACKED_OP in {n.op_type for n in written.node}  # fc.weight: 4-bit packed
    assert not [t.name for t in written.initializer if t.name.startswith("onnxhq.shape.")]
    # the report names the weights as the model does, whatever the files call them
    assert short.report.layers == kept.report.layers
    assert {r.name for r in short.report.layers} == {"conv.weight", "fc.weight"}

    paths = short.save(tmp_path)
    decode_file(paths[0], tmp_path / "decoded.onnx")
    np.testing.assert_array_equal(_run(str(tmp_path / "decoded.onnx"), x)[0], _run(decoded, x)[0])
    plan = name_plan(model)
    streams = {s.name for s in decode_sidecar(short.artifacts.sidecar())[0]}
    assert streams == {naming.index_tensor(plan.value(w)) for w in ("conv.weight", "fc.weight")}
    rebuilt = {r.name: r for r in describe_artifacts(paths[0]).layers}
    assert rebuilt == {plan.value(r.name): replace(r, name=plan.value(r.name))
                       for r in short.report.layers}  # fmt: skip


def test_a_value_a_subgraph_reads_keeps_its_name():
    then = helper.make_graph(
        [helper.make_node("Identity", ["outer_value"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["outer_value"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["outer_value"], name="relu"),
        helper.make_node("ReduceSum", ["outer_value"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="greater"),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = name_plan(model)
    assert "outer_value" not in plan.values and {"s", "c", "zero"} <= set(plan.values)
    assert set(plan.values.values()).isdisjoint({"x", "y", "outer_value"})
    short = compact_graph(model, plan)
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(_run(short, x, "x")[0], _run(model, x, "x")[0])


def _bn_net() -> onnx.ModelProto:
    rng = np.random.default_rng(1)

    def tensor(name, *shape, low=None):
        v = rng.uniform(low, 2.0, shape) if low is not None else rng.standard_normal(shape)
        return numpy_helper.from_array(v.astype(np.float32), name)

    inits = [tensor("features.0.weight", 8, 1, 3, 3), tensor("classifier.weight", 4, 8)]
    inits += [tensor("bn.weight", 8, low=0.5), tensor("bn.bias", 8), tensor("bn.mean", 8)]
    inits += [tensor("bn.var", 8, low=0.1)]
    nodes = [
        helper.make_node("Conv", ["input", "features.0.weight"], ["conv_out"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv_out", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["b"]
        ),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "classifier.weight"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_streamed_compress_of_external_weights_folds_and_names_as_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "bn_net.onnx"
    onnx.save(_bn_net(), str(path), save_as_external_data=True, size_threshold=0)
    streamed = onnxhq.compress(path, hessian="none", bits=6)  # lazy: weights read from the file
    with monkeypatch.context() as m:
        m.setattr(pipeline, "streamable", lambda options: False)
        whole = onnxhq.compress(path, hessian="none", bits=6)
    assert streamed.report.folded_batchnorms == whole.report.folded_batchnorms == 1
    assert streamed.artifacts.graph_bytes == whole.artifacts.graph_bytes
    assert streamed.artifacts.sidecar() == whole.artifacts.sidecar()
    x = np.random.default_rng(2).standard_normal((3, 1, 6, 6)).astype(np.float32)
    (want,), (got,) = _run(_bn_net(), x), _run(streamed.model(), x)
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1 * np.abs(want).max())  # 6 bits


@pytest.mark.parametrize(
    ("flags", "fold", "compact"),
    [([], True, True), (["--no-fold-batchnorm"], False, True), (["--keep-names"], True, False)],
)
def test_cli_flags_turn_folding_and_short_names_off(flags, fold, compact):
    args = build_parser().parse_args(["compress", "m.onnx", "-o", "out", *flags])
    keywords = option_keywords(args)
    assert (keywords["fold_batchnorm"], keywords["compact_names"]) == (fold, compact)


def test_default_attributes_and_inner_shapes_are_dropped_and_the_outputs_stay():
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w"],
            ["c"],
            dilations=[1, 1],
            strides=[1, 1],
            group=1,
            pads=[0, 0, 0, 0],
            kernel_shape=[3, 3],
        ),
        helper.make_node("Conv", ["x", "w"], ["d"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c"], ["h"], alpha=0.2, beta=0.6),
        helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], ceil_mode=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 7, 7])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("h", "p")],
        [w],
    )
    graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 5, 5]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    short = compact_graph(model, name_plan(model))
    assert not short.graph.value_info  # inner shapes: onnxruntime infers them
    kept = {n.op_type + str(i): sorted(a.name for a in n.attribute)
            for i, n in enumerate(short.graph.node)}  # fmt: skip
    assert kept == {"Conv0": [], "Conv1": ["pads", "strides"],
                    "HardSigmoid2": ["beta"], "MaxPool3": ["kernel_shape"]}  # fmt: skip
    x = rng.standard_normal((1, 1, 7, 7)).astype(np.float32)
    session = [ort.InferenceSession(m.SerializeToString()) for m in (model, short)]
    for want, got in zip(*(s.run(None, {"x": x}) for s in session)):
        np.testing.assert_array_equal(got, want)


def test_the_result_says_what_the_artifacts_call_each_weight():
    short = onnxhq.compress(_exported(), hessian="none", k=4)
    kept = onnxhq.compress(_exported(), hessian="none", k=4, compact_names=False)
    assert kept.names == {"conv.weight": "conv.weight", "fc.weight": "fc.weight"}
    assert set(short.names) == set(short.quantized.tensors)
    assert short.names["fc.weight"] != "fc.weight"
    decoded = {n.output[0] for n in short.model().graph.node if n.domain == naming.DOMAIN}
    assert decoded == set(short.names.values())
