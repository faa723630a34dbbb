"""Model I/O: loading from every source, weight discovery, opset handling, bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxhq import graphfile
from onnxhq.errors import ModelError
from onnxhq.model import (
    BASELINE_IR,
    MAX_OPSET,
    InputSpec,
    count_float_params,
    get_metadata,
    input_specs,
    load_model,
    model_file_bytes,
    model_files,
    quantizable_weights,
    read_initializers,
    replace_initializers,
    runtime_limits,
    save_model,
    set_metadata,
)
from onnxhq.normalize import materialize_constants
from onnxhq.runtime import make_session


def test_load_from_path_bytes_and_proto_agree(tmp_path, convnet):
    path = tmp_path / "m.onnx"
    save_model(convnet, path)
    for source in (path, str(path), path.read_bytes(), convnet):
        model = load_model(source)
        assert [t.name for t in model.graph.initializer] == [
            t.name for t in convnet.graph.initializer
        ]


def test_external_data_is_loaded(tmp_path, convnet):
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        small_convnet(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    model = load_model(path)
    np.testing.assert_array_equal(
        read_initializers(model, ["fc.weight"])["fc.weight"],
        read_initializers(convnet, ["fc.weight"])["fc.weight"],
    )
    with pytest.raises(ModelError, match="external data"):
        load_model(path.read_bytes())


@pytest.mark.parametrize(
    "content, match", [(b"not a model at all", "not an ONNX model"), (b"", "no graph|no nodes")]
)
def test_bad_files_are_model_errors(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        load_model(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.onnx does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_quantizable_weights_are_conv_and_gemm_weights(convnet):
    found = {w.name: w for w in quantizable_weights(convnet)}
    assert set(found) == {"conv.weight", "fc.weight"}
    assert found["conv.weight"].shape == (3, 1, 3, 3) and found["conv.weight"].size == 27
    assert found["fc.weight"].consumers == (("fc", "Gemm", 1),)


def test_matmul_weight_in_either_slot_and_extra_ops():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    emb = numpy_helper.from_array(np.ones((10, 4), np.float32), "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, emb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [x.name for x in quantizable_weights(model)] == ["w"]
    assert {x.name for x in quantizable_weights(model, extra_ops=("Gather",))} == {"w", "emb"}
    with pytest.raises(ModelError, match="Softmax"):
        quantizable_weights(model, extra_ops=("Softmax",))


def test_fp16_weights_are_listed_with_their_dtype(convnet):
    model = small_convnet()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    assert {w.dtype for w in quantizable_weights(model)} == {np.dtype(np.float16)}


def test_constant_and_constant_of_shape_become_initializers():
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["w"],
            value=numpy_helper.from_array(np.array([0.5], np.float32)),
        ),
        helper.make_node(
            "Constant", [], ["b"], value=numpy_helper.from_array(np.ones(2, np.float32))
        ),
        helper.make_node("Gemm", ["x", "w", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert materialize_constants(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    np.testing.assert_array_equal(
        read_initializers(model, ["w"])["w"], np.full((2, 3), 0.5, np.float32)
    )
    assert [w.name for w in quantizable_weights(model)] == ["w"]


def test_weights_behind_reshape_and_transpose_are_folded_into_initializers():
    # Inception v1's classifier in the onnx backend data:
    # Reshape(ConstantOfShape(shape), new_shape).
    shape = numpy_helper.from_array(np.array([6], np.int64), "shape")
    new_shape = numpy_helper.from_array(np.array([2, 3], np.int64), "new_shape")
    stored = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "stored")
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["flat"],
            value=numpy_helper.from_array(np.array([0.5], np.float32)),
        ),
        helper.make_node("Reshape", ["flat", "new_shape"], ["w1"]),
        helper.make_node("Transpose", ["stored"], ["w2"], perm=[1, 0]),
        helper.make_node("Gemm", ["x", "w1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["y"]),
        helper.make_node("Reshape", ["y", "new_shape"], ["z"]),
    ]  # data input: stays
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("stored", TensorProto.FLOAT, [2, 3]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [shape, new_shape, stored],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=3)
    x = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    expected = ReferenceEvaluator(model).run(
        None, {"x": x, "stored": numpy_helper.to_array(stored)}
    )[0]
    assert materialize_constants(model) == 3
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Gemm", "Reshape"]
    assert {t.name for t in model.graph.initializer} == {
        "new_shape",
        "w1",
        "w2",
    }  # shape, stored: unread
    assert [i.name for i in model.graph.input] == ["x"]
    np.testing.assert_array_equal(
        read_initializers(model, ["w2"])["w2"], numpy_helper.to_array(stored).T
    )
    assert [w.name for w in quantizable_weights(model)] == ["w1", "w2"]
    np.testing.assert_allclose(
        ReferenceEvaluator(model).run(None, {"x": x})[0], expected, rtol=1e-6
    )


def _runtime_one_below_onnx(monkeypatch) -> tuple[int, int]:
    """Make onnxhq see a runtime that stops below an opset and IR version the installed onnx
    knows (its converter cannot start from an opset it does not know, and the newest onnxruntime
    may run every opset the installed onnx defines); returns that limit."""
    max_opset, max_ir = runtime_limits()
    limits = (min(max_opset, onnx.defs.onnx_opset_version() - 1), min(max_ir, onnx.IR_VERSION - 1))
    monkeypatch.setattr(graphfile, "runtime_limits", lambda: limits)
    return limits


def test_an_opset_or_ir_the_runtime_cannot_run_is_converted_down_or_refused(convnet, monkeypatch):
    assert runtime_limits() >= (MAX_OPSET, BASELINE_IR)
    max_opset, max_ir = _runtime_one_below_onnx(monkeypatch)
    model = small_convnet()
    model.opset_import[0].version = max_opset + 1
    model.ir_version = max_ir + 1
    converted = load_model(model)
    assert (converted.opset_import[0].version, converted.ir_version) == (max_opset, max_ir)
    make_session(converted)  # loads in the installed onnxruntime
    with pytest.raises(ModelError, match=f"opset {max_opset + 1}"):
        load_model(model, convert_opset=False)
    within = small_convnet()
    within.opset_import[0].version = max_opset
    assert load_model(within).opset_import[0].version == max_opset  # kept as it is


def test_a_large_model_is_saved_with_external_data_and_loads_back(tmp_path):
    convnet = small_convnet()
    big = np.arange(3000, dtype=np.float32).reshape(30, 100)
    convnet.graph.initializer.append(numpy_helper.from_array(big, "big"))
    path = tmp_path / "out" / "m.onnx"
    before = convnet.SerializeToString()
    written = save_model(convnet, path, external_above=0)
    assert convnet.SerializeToString() == before  # the model is left as it was
    assert written == path.stat().st_size + (tmp_path / "out/m.onnx.data").stat().st_size
    header = onnx.load(str(path), load_external_data=False)
    assert [t.name for t in header.graph.initializer if t.data_location == 1] == ["big"]
    loaded = load_model(path)
    names = [t.name for t in convnet.graph.initializer]
    for name, value in read_initializers(loaded, names).items():
        np.testing.assert_array_equal(value, read_initializers(convnet, names)[name])
    assert model_files(path) == [path, (tmp_path / "out/m.onnx.data").resolve()]


def test_subgraph_initializers_are_counted(convnet):
    model = small_convnet()
    body = helper.make_graph(
        [helper.make_node("Identity", ["extra"], ["y"])],
        "body",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((5, 7), np.float32), "extra")],
    )
    node = helper.make_node("If", ["cond"], ["branch"], then_branch=body, else_branch=body)
    model.graph.node.append(node)
    extra = 2 * 35  # the body's 5x7 initializer, in both branches
    assert count_float_params(model) == count_float_params(small_convnet()) + extra


def test_replace_initializers_checks_shapes_and_copies(convnet):
    new = replace_initializers(convnet, {"fc.bias": np.zeros(4, np.float32)})
    assert np.all(read_initializers(new, ["fc.bias"])["fc.bias"] == 0)
    assert np.any(read_initializers(convnet, ["fc.bias"])["fc.bias"] != 0)
    with pytest.raises(ModelError, match="shape"):
        replace_initializers(convnet, {"fc.bias": np.zeros(5, np.float32)})


def test_weights_also_listed_as_graph_inputs_are_quantizable():
    model = small_convnet()
    for t in model.graph.initializer:  # the IR < 4 convention of old exporters
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.ir_version = 3
    loaded = load_model(model)
    assert [i.name for i in loaded.graph.input] == ["input"]
    assert {w.name for w in quantizable_weights(loaded)} == {"conv.weight", "fc.weight"}
    onnx.checker.check_model(loaded, full_check=True)
    x = np.ones((1, 1, 6, 6), np.float32)
    np.testing.assert_array_equal(
        make_session(loaded).run(None, {"input": x})[0],
        make_session(small_convnet()).run(None, {"input": x})[0],
    )


def test_weights_behind_identity_nodes_are_found():
    model = small_convnet()
    model.graph.node.insert(0, helper.make_node("Identity", ["fc.weight"], ["onnx::Gemm_7"]))
    model.graph.node[-1].input[1] = "onnx::Gemm_7"
    loaded = load_model(model)
    assert "Identity" not in {n.op_type for n in loaded.graph.node}
    assert {w.name for w in quantizable_weights(loaded)} == {"conv.weight", "fc.weight"}
    x = np.ones((1, 1, 6, 6), np.float32)
    np.testing.assert_array_equal(
        make_session(loaded).run(None, {"input": x})[0],
        make_session(small_convnet()).run(None, {"input": x})[0],
    )


def test_input_specs_are_the_inputs_to_feed_with_numpy_dtypes_and_symbolic_dims():
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["N", 3, 8, None]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),  # backed by an initializer
    ]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.INT64, [2])],
        [numpy_helper.from_array(np.zeros(2, np.float32), "w")],
    )
    assert input_specs(helper.make_model(graph)) == [
        InputSpec("image", np.dtype(np.float16), (None, 3, 8, None)),
        InputSpec("ids", np.dtype(np.int64), (2,)),
    ]


def test_float_params_count_every_float_type_including_bfloat16(convnet):
    total = sum(int(np.prod(t.dims)) for t in convnet.graph.initializer)
    assert count_float_params(convnet) == total
    assert count_float_params(convnet, exclude={"fc.weight"}) == total - 4 * 48
    model = onnx.ModelProto()
    model.CopyFrom(convnet)
    model.graph.initializer.extend(
        [
            helper.make_tensor("half", TensorProto.BFLOAT16, [5], [0] * 5),
            helper.make_tensor("f16", TensorProto.FLOAT16, [3], [0] * 3),
            helper.make_tensor("count", TensorProto.INT64, [7], [0] * 7),
        ]
    )
    assert count_float_params(model) == total + 5 + 3


def test_set_metadata_replaces_or_appends_and_get_metadata_reads_it_back(convnet):
    model = onnx.ModelProto()
    model.CopyFrom(convnet)
    set_metadata(model, {"a": "1", "b": "2"})
    set_metadata(model, {"b": "3", "c": "4"})
    assert get_metadata(model) == {"a": "1", "b": "3", "c": "4"}
    assert [p.key for p in model.metadata_props] == ["a", "b", "c"]
    assert get_metadata(convnet) == {}


def test_model_file_bytes_count_the_external_data_files(tmp_path, convnet, monkeypatch):
    single, split = tmp_path / "one.onnx", tmp_path / "ext.onnx"
    save_model(convnet, single)
    assert model_file_bytes(single) == single.stat().st_size
    onnx.save_model(
        convnet, str(split), save_as_external_data=True, location="ext.data", size_threshold=0
    )
    load_model(split)
    parses, real = [], graphfile.parse_model
    monkeypatch.setattr(graphfile, "parse_model", lambda *a: parses.append(a) or real(*a))
    sizes = split.stat().st_size + (tmp_path / "ext.data").stat().st_size
    assert model_file_bytes(split) == sizes > split.stat().st_size
    assert parses == []  # what a loaded file names is known: it is not parsed again
    save_model(small_convnet(), split)  # a new file under the same name is read anew
    assert model_file_bytes(split) == split.stat().st_size and len(parses) == 1


def test_a_compressed_graph_past_the_limit_keeps_its_tensors_beside_it(tmp_path, monkeypatch):
    """Unquantized tensors past 2 GB (here: past a lowered limit) go to ``<graph>.data``,
    written with the pair as one; report and decode read all three."""
    import onnxhq.model
    from onnxhq import compress, decode, report

    model = small_convnet()
    model.graph.initializer.append(
        numpy_helper.from_array(np.ones((40, 50), np.float32), "unquantized")
    )
    monkeypatch.setattr(onnxhq.model, "EXTERNAL_ABOVE", 4096)
    result = compress(model, hessian="none", method="kmeans", k=4, name="m")
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["m.onnx", "m.onnxhq", "m.onnx.data"]
    assert result.report.graph_bytes == sum(p.stat().st_size for p in (paths[0], paths[2]))
    assert report(tmp_path / "m.onnx").graph_bytes == result.report.graph_bytes
    decoded = decode.load(tmp_path / "m.onnx", dequantize=True)
    np.testing.assert_array_equal(read_initializers(decoded, ["unquantized"])["unquantized"], 1)
    decode.decode_file(tmp_path / "m.onnx", tmp_path / "d.onnx", dequantize=True)
    assert (tmp_path / "d.onnx.data").is_file()  # the decoded model is past the limit too
    make_session(str(tmp_path / "d.onnx"))


#: Run in a child: load the model at argv[1], save it to argv[2], print peak RSS in bytes.
ROUND_TRIP = """
import resource, sys
from onnxhq.model import load_model, save_model
save_model(load_model(sys.argv[1]), sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_model_past_2_gb_loads_and_saves_with_external_data(tmp_path):
    """A 2.1 GiB weight in external data: loaded from the model's folder, written back as
    graph + ``.data`` (one file could not hold it), bit-exact, at a peak memory of a small
    multiple of the tensor."""
    import subprocess
    import sys

    from onnxhq.data import available_memory

    size = 2**31 + 2**26  # 2.06 GiB of float32
    if available_memory() < 4 * size:
        pytest.skip(f"needs {4 * size / 2**30:.0f} GiB of free memory")
    rows, cols = size // 4096, 1024
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in/big.bin", "wb") as f:
        block = np.arange(cols * 256, dtype=np.float32).reshape(256, cols)
        for _ in range(rows // 256):
            f.write(block.tobytes())
    table = TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, cols])
    table.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(size))):
        table.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "table"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        [table],
    )
    onnx.save_model(helper.make_model(graph), tmp_path / "in/big.onnx")
    out = tmp_path / "out/big.onnx"
    proc = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(tmp_path / "in/big.onnx"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    assert peak <= 3 * size + 2**30  # the proto's copy, the bytes onnx reads, the NaN check
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 2**20
    header = onnx.load(str(out), load_external_data=False)
    offset = int({e.key: e.value for e in header.graph.initializer[0].external_data}["offset"])
    with open(tmp_path / "in/big.bin", "rb") as a, open(out.parent / "big.onnx.data", "rb") as b:
        b.seek(offset)
        while chunk := a.read(2**26):
            assert b.read(len(chunk)) == chunk


def test_a_large_model_is_converted_without_its_tensor_bytes(monkeypatch):
    monkeypatch.setattr(graphfile, "LEAN_ABOVE", 0)
    monkeypatch.setattr(graphfile, "_LEAN_TENSOR", 64)
    max_opset, _ = _runtime_one_below_onnx(monkeypatch)
    model = small_convnet()
    model.opset_import[0].version = max_opset + 1
    names = [t.name for t in model.graph.initializer]
    converted = load_model(model)
    assert converted.opset_import[0].version == max_opset
    for name, value in read_initializers(small_convnet(), names).items():
        np.testing.assert_array_equal(read_initializers(converted, [name])[name], value)
