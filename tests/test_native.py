"""Native low-bit targets: a codebook on a uniform grid becomes DequantizeLinear of int8/int4
levels that computes the gather model's weights up to float rounding; anything else is refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import small_convnet

from onnxhq import naming
from onnxhq.errors import ConfigError, ModelError
from onnxhq.model import default_opset
from onnxhq.native import grid_of, lower
from onnxhq.rewrite import rewrite
from onnxhq.runtime import make_session

STEP = np.float32(0.0371)


def grid_codes(model, levels, rng, grouped=False):
    """Codebooks ``STEP * levels`` (per row group of 1 with ``grouped``) and random indices for
    the conv and fc weights of the small convnet."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.endswith("weight")}
    k = len(levels)
    if grouped:
        books = {
            n: np.stack([(STEP * (r + 1)) * levels for r in range(s[0])]).astype(np.float32)
            for n, s in shapes.items()
        }
        return books, {
            n: SimpleNamespace(codebook=n, indices=rng.integers(0, k, s), group_size=1)
            for n, s in shapes.items()
        }
    books = {"shared": (STEP * np.asarray(levels, np.float32)).astype(np.float32)}
    return books, {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, k, s), group_size=None)
        for n, s in shapes.items()
    }


def outputs(model, x):
    return make_session(model).run(None, {"input": x})[0]


def test_grid_of_recovers_scale_and_levels():
    levels = np.array([-7, -3, 0, 1, 2, 6])
    scale, got = grid_of(STEP * levels.astype(np.float32))
    np.testing.assert_array_equal(got, levels)
    assert scale == pytest.approx(STEP, rel=1e-6)
    assert grid_of(np.array([0.5], np.float32))[1].tolist() == [1]
    assert grid_of(np.zeros(3, np.float32))[1].tolist() == [0, 0, 0]


def test_grid_of_refuses_values_off_a_grid():
    assert grid_of(np.array([-1.0, 0.1, 0.3517, 2.0], np.float32)) is None
    assert grid_of(np.sort(np.random.default_rng(0).normal(size=32)).astype(np.float32)) is None


@pytest.mark.parametrize("target", ["int8", "int4"])
@pytest.mark.parametrize("grouped", [False, True])
def test_native_model_computes_the_gather_models_weights(target, grouped):
    model = small_convnet()
    levels = np.arange(-8, 8) if target == "int4" else np.arange(-100, 120, 3)
    books, tensors = grid_codes(model, levels, np.random.default_rng(1), grouped)
    gather = rewrite(model, books, tensors)
    native = lower(gather, target)
    onnx.checker.check_model(native, full_check=True)
    assert {n.op_type for n in native.graph.node if n.output[0] in tensors} == {"DequantizeLinear"}
    assert not native.functions and all(o.domain != naming.DOMAIN for o in native.opset_import)
    assert not any(t.name.startswith("onnxhq.codebook") for t in native.graph.initializer)
    assert default_opset(native) == (21 if target == "int4" else 17)  # int4 needs opset 21
    x = np.random.default_rng(2).normal(size=(8, 1, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(outputs(native, x), outputs(gather, x), rtol=1e-5, atol=1e-5)


def test_levels_off_zero_take_an_unsigned_type_and_a_zero_point():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(0, 200), np.random.default_rng(0))
    native = lower(rewrite(model, books, tensors), "int8")
    inits = {t.name: t for t in native.graph.initializer}
    q = inits[naming.index_tensor("fc.weight")]
    zp = inits[naming.index_tensor("fc.weight") + ".zero_point"]
    assert q.data_type == zp.data_type == onnx.TensorProto.UINT8
    # levels 0..199 fit int8 only shifted: 0 -> -128 would need a zero point, uint8 holds them
    assert onnx.numpy_helper.to_array(zp) in (0, 128)


def test_a_codebook_off_the_grid_is_refused_in_one_line():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-4, 4), np.random.default_rng(0))
    books["shared"] = books["shared"] + np.float32(0.01) * np.arange(8, dtype=np.float32) ** 2
    with pytest.raises(ModelError, match=r"'conv.weight' \(8 values\) is not a uniform grid"):
        lower(rewrite(model, books, tensors), "int8")


def test_too_many_levels_for_int4_are_refused():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-10, 10), np.random.default_rng(0))
    with pytest.raises(ModelError, match="spans grid levels -10 to 9, more than the 16 of int4"):
        lower(rewrite(model, books, tensors), "int4")


def test_gather_target_is_the_model_and_unknown_targets_are_refused():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-4, 4), np.random.default_rng(0))
    gather = rewrite(model, books, tensors)
    assert lower(gather, "gather").SerializeToString() == gather.SerializeToString()
    with pytest.raises(ConfigError, match="--target 'int2' is not one of gather, int8, int4"):
        lower(gather, "int2")


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 40] x) => (float[N, 6] y) {
    h = MatMul(x, w1)
    a = Tanh(h)
    b = MatMul(a, w2)
    y = Add(b, w2_sum)
}
"""


def test_int4_matmul_weights_become_matmul_nbits_that_compute_the_same():
    model = onnx.parser.parse_model(MLP)
    rng = np.random.default_rng(3)
    shapes = {"w1": (40, 9), "w2": (9, 6)}  # K = 40 and 9: a padded last block, and one block
    books = {"shared": STEP * np.arange(-8, 8, dtype=np.float32)}
    tensors = {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, 16, s), group_size=None)
        for n, s in shapes.items()
    }
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
            for n, s in [("w1", shapes["w1"]), ("w2", shapes["w2"]), ("w2_sum", (6,))]
        ]
    )
    gather = rewrite(model, books, tensors)
    native = lower(gather, "int4")
    assert [n.op_type for n in native.graph.node] == ["MatMulNBits", "Tanh", "MatMulNBits", "Add"]
    assert default_opset(native) == 17  # no DequantizeLinear left: no conversion to opset 21
    x = {"x": rng.normal(size=(5, 40)).astype(np.float32)}
    want = make_session(gather).run(None, x)[0]
    np.testing.assert_allclose(make_session(native).run(None, x)[0], want, rtol=1e-5, atol=1e-5)
