"""Rewritten graphs compute exactly the quantized weights, under onnxruntime and the reference
evaluator.

Covers the three dequantize functions (plain, 4-bit packed, channel-grouped), their opsets and
the packed storage. The artifacts they make (`encode`, `decode`) are in test_artifacts.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import with_dequantized_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxhq
from onnxhq import naming
from onnxhq.errors import ModelError
from onnxhq.model import load_model, read_initializers
from onnxhq.rewrite import (
    PACK_MIN_SIZE,
    PACKED_OP,
    dequantize_model,
    index_dtype,
    pack4,
    rewrite,
    unpack4,
)
from onnxhq.runtime import make_session


def codes_for(model, k, rng, grouped=False):
    """Random codebooks and indices for the conv and fc weights of the small convnet."""
    weights = read_initializers(model, ["conv.weight", "fc.weight"])
    if grouped:
        books = {
            "conv.weight": rng.normal(size=(3, k)).astype(np.float32),
            "fc.weight": rng.normal(size=(2, k)).astype(np.float32),
        }
        sizes = {"conv.weight": 1, "fc.weight": 2}
        tensors = {
            n: SimpleNamespace(codebook=n, indices=rng.integers(0, k, w.shape), group_size=sizes[n])
            for n, w in weights.items()
        }
        return books, tensors
    books = {"shared": np.sort(rng.normal(size=k)).astype(np.float32)}
    tensors = {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, k, w.shape), group_size=None)
        for n, w in weights.items()
    }
    return books, tensors


@pytest.mark.parametrize("k, grouped", [(4, False), (32, False), (300, False), (8, True)])
def test_outputs_equal_the_numpy_reference(convnet, convnet_inputs, k, grouped):
    books, tensors = codes_for(convnet, k, np.random.default_rng(k), grouped)
    model = rewrite(convnet, books, tensors)
    onnx.checker.check_model(model, full_check=True)
    x, _ = convnet_inputs
    want = make_session(with_dequantized_weights(convnet, books, tensors)).run(None, {"input": x})[
        0
    ]
    np.testing.assert_array_equal(make_session(model).run(None, {"input": x})[0], want)
    got_ref = ReferenceEvaluator(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got_ref, want, rtol=1e-5, atol=1e-6)
    plain = dequantize_model(model)
    assert not plain.functions and all(n.domain == "" for n in plain.graph.node)
    onnx.checker.check_model(plain, full_check=True)
    np.testing.assert_array_equal(make_session(plain).run(None, {"input": x})[0], want)


def test_index_tensors_are_small_unsigned(convnet):
    books, tensors = codes_for(convnet, 32, np.random.default_rng(0))
    model = rewrite(convnet, books, tensors)
    idx = {t.name: t for t in model.graph.initializer if t.name.endswith("onnxhq_indices")}
    assert set(idx) == {naming.index_tensor("conv.weight"), naming.index_tensor("fc.weight")}
    assert all(t.data_type == onnx.TensorProto.UINT8 for t in idx.values())
    # the shared codebook once
    assert sum(t.name.startswith("onnxhq.codebook") for t in model.graph.initializer) == 1
    assert "conv.weight" not in {t.name for t in model.graph.initializer}


def test_index_dtype_bounds():
    assert (
        index_dtype(256) == np.uint8
        and index_dtype(257) == np.uint16
        and index_dtype(65536) == np.uint16
    )
    with pytest.raises(Exception, match="65,536"):
        index_dtype(65537)


def test_original_model_is_not_mutated(convnet):
    before = convnet.SerializeToString()
    books, tensors = codes_for(convnet, 4, np.random.default_rng(0))
    rewrite(convnet, books, tensors)
    assert convnet.SerializeToString() == before


# --- 4-bit packed indices -------------------------------------------------------------------

MLP = """
<ir_version: 8, opset_import: ["" : OPSET]>
mlp (float[N, 13] x) => (float[N, OUT] y) {
    h = MatMul(x, w1)
    a = Tanh(h)
    y = MatMul(a, w2)
}
"""


MLP_SHAPES = {"w1": (13, 7), "w2": (7, 10)}  # 91 (odd) and 70 weights: both packed when k <= 16


def mlp(opset: int = 17, out: int = 10) -> onnx.ModelProto:
    model = onnx.parser.parse_model(MLP.replace("OPSET", str(opset)).replace("OUT", str(out)))
    rng = np.random.default_rng(opset)
    shapes = {"w1": (13, 7), "w2": (7, out)}
    model.graph.initializer.extend(
        numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in shapes.items()
    )
    return model


def shared_codes(k, rng, shapes=MLP_SHAPES):
    books = {"shared": np.sort(rng.normal(size=k)).astype(np.float32)}
    return books, {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, k, s), group_size=None)
        for n, s in shapes.items()
    }


def ops(model):
    return {n.output[0]: n.op_type for n in model.graph.node if n.domain == naming.DOMAIN}


def test_pack4_golden_bytes():
    # Byte j: index j (low nibble) and index m + j (high), m = ceil(n / 2); 0 pads an odd n.
    assert pack4(np.array([1, 2, 3])).tolist() == [0x31, 0x02]  # [1, 2] low, [3, pad] high
    assert pack4(np.array([[15, 0], [0, 15]])).tolist() == [0x0F, 0xF0]
    assert pack4(np.array([7])).dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=300), st.integers(1, 3))
def test_unpack4_inverts_pack4(values, rows):
    idx = np.array(values * rows).reshape(rows, -1)
    packed = pack4(idx)
    assert packed.shape == ((idx.size + 1) // 2,)
    np.testing.assert_array_equal(unpack4(packed, idx.shape), idx)


def test_pack4_and_unpack4_refuse_what_does_not_fit():
    with pytest.raises(ModelError, match="from 0 to 16"):
        pack4(np.array([0, 16]))
    with pytest.raises(ModelError, match="5 indices need 3"):
        unpack4(np.zeros(2, np.uint8), (5,))


@pytest.mark.parametrize("opset", [10, 13, 17, 21])
@pytest.mark.parametrize("k", [2, 16])
def test_packed_graph_computes_what_the_unpacked_one_does(opset, k):
    model = mlp(opset)
    books, tensors = shared_codes(k, np.random.default_rng(k))
    packed, plain = rewrite(model, books, tensors), rewrite(model, books, tensors, pack=False)
    assert ops(packed) == {"w1": PACKED_OP, "w2": PACKED_OP} and set(ops(plain).values()) == {
        "Dequantize"
    }
    for m in (packed, plain):
        onnx.checker.check_model(m, full_check=True)
        assert [(o.domain, o.version) for o in m.opset_import] == [
            ("", opset),
            ("onnxhq", 1),
        ]  # model opset kept
        assert all(
            [(o.domain, o.version) for o in f.opset_import] == [("", opset)] for f in m.functions
        )
    x = {"x": np.random.default_rng(0).normal(size=(5, 13)).astype(np.float32)}
    want = make_session(with_dequantized_weights(model, books, tensors)).run(None, x)[0]
    np.testing.assert_array_equal(make_session(packed).run(None, x)[0], want)
    # Unfolded, both graphs compute their weights at run time, through the same kernels.
    np.testing.assert_array_equal(
        make_session(packed, optimize=False).run(None, x)[0],
        make_session(plain, optimize=False).run(None, x)[0],
    )
    np.testing.assert_array_equal(
        ReferenceEvaluator(packed).run(None, x)[0], ReferenceEvaluator(plain).run(None, x)[0]
    )
    flat = dequantize_model(packed)
    assert not flat.functions and all(n.domain == "" for n in flat.graph.node)
    # codebook, shapes dropped
    assert not any(t.name.startswith("onnxhq.") for t in flat.graph.initializer)
    for name, c in tensors.items():
        np.testing.assert_array_equal(
            read_initializers(flat, [name])[name], books["shared"][c.indices]
        )


def test_onnxruntime_folds_the_packed_weights_into_constants(tmp_path):
    # Folding is what makes the decoded model as fast as the original; an operator that onnxruntime
    # does not fold (Compress, in recent releases) leaves the unpacking to every run.
    import onnxruntime as ort

    books, tensors = shared_codes(16, np.random.default_rng(0))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(
        rewrite(mlp(), books, tensors).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    left = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert left <= {"MatMul", "Tanh"}, left


def test_packed_storage_is_half_a_byte_per_weight():
    books, tensors = shared_codes(16, np.random.default_rng(0))
    packed = {t.name: t for t in rewrite(mlp(), books, tensors).graph.initializer}
    w1 = packed[naming.index_tensor("w1")]
    assert w1.data_type == onnx.TensorProto.UINT8 and list(w1.dims) == [46]  # ceil(91 / 2)
    np.testing.assert_array_equal(numpy_helper.to_array(w1), pack4(tensors["w1"].indices))


@pytest.mark.parametrize(
    "k, out, pack, packed",
    [
        (16, 10, True, {"w1", "w2"}),
        (17, 10, True, set()),  # 17 codewords do not fit in 4 bits
        (16, 9, True, {"w1"}),  # w2 has 63 < PACK_MIN_SIZE weights
        (16, 10, False, set()),  # packing turned off
    ],
)
def test_what_gets_packed(k, out, pack, packed):
    assert PACK_MIN_SIZE == 64
    books, tensors = shared_codes(k, np.random.default_rng(0), {"w1": (13, 7), "w2": (7, out)})
    got = ops(rewrite(mlp(out=out), books, tensors, pack=pack))
    assert {n for n, op in got.items() if op == PACKED_OP} == packed


def test_below_opset_10_indices_stay_unpacked():
    model = mlp(9)
    books, tensors = shared_codes(4, np.random.default_rng(0))
    out = rewrite(model, books, tensors)
    assert set(ops(out).values()) == {"Dequantize"}
    onnx.checker.check_model(out, full_check=True)


def test_channel_groups_need_opset_15(convnet):
    books, tensors = codes_for(convnet, 8, np.random.default_rng(0), grouped=True)
    old = onnx.ModelProto()
    old.CopyFrom(convnet)
    old.opset_import[0].version = 13
    with pytest.raises(ModelError, match="opset >= 15 and the model imports opset 13"):
        rewrite(old, books, tensors)


def test_decoded_lenet5_at_k16_is_about_half_the_unpacked_size(bundled_model):
    result = onnxhq.compress(bundled_model, method="kmeans", k=16)
    packed = result.model()
    plain = rewrite(
        load_model(bundled_model), result.quantized.codebooks, result.quantized.tensors, pack=False
    )
    assert set(ops(packed).values()) == {PACKED_OP}
    assert 0.45 < packed.ByteSize() / plain.ByteSize() < 0.55
    onnx.checker.check_model(packed, full_check=True)


@pytest.mark.parametrize("opset", [10, 11, 17])
def test_bodies_keep_folded_intermediates_small(opset):
    # onnxruntime keeps every tensor its constant folding makes until the pass ends: the indices
    # are cast to int32 (half of int64), and from opset 11 the packed body unpacks in uint8 and
    # reads the codebook once.
    from onnxhq.rewrite import (
        dequantize_function,
        dequantize_grouped_function,
        dequantize_packed4_function,
    )

    bodies = [dequantize_function(opset), dequantize_packed4_function(opset)]
    bodies += [dequantize_grouped_function(opset)] if opset >= 15 else []
    for body in bodies:
        casts = {a.i for n in body.node if n.op_type == "Cast" for a in n.attribute}
        assert onnx.TensorProto.INT64 not in casts, body.name
    gathers = [n for n in dequantize_packed4_function(opset).node if n.op_type == "Gather"]
    assert len(gathers) == (2 if opset < 11 else 1)
