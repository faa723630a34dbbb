"""Rewritten graphs compute exactly the quantized weights, under onnxruntime and the reference evaluator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from onnxhq import naming
from onnxhq.model import read_initializers, replace_initializers
from onnxhq.rewrite import dequantize_model, dequantized_value, index_dtype, rewrite
from onnxhq.runtime import make_session


def codes_for(model, k, rng, grouped=False):
    """Random codebooks and indices for the conv and fc weights of the small convnet."""
    weights = read_initializers(model, ["conv.weight", "fc.weight"])
    if grouped:
        books = {"conv.weight": rng.normal(size=(3, k)).astype(np.float32),
                 "fc.weight": rng.normal(size=(2, k)).astype(np.float32)}
        sizes = {"conv.weight": 1, "fc.weight": 2}
        tensors = {n: SimpleNamespace(codebook=n, indices=rng.integers(0, k, w.shape), group_size=sizes[n])
                   for n, w in weights.items()}
        return books, tensors
    books = {"shared": np.sort(rng.normal(size=k)).astype(np.float32)}
    tensors = {n: SimpleNamespace(codebook="shared", indices=rng.integers(0, k, w.shape), group_size=None)
               for n, w in weights.items()}
    return books, tensors


def reference_model(model, books, tensors):
    values = {}
    for name, c in tensors.items():
        book = books[c.codebook]
        values[name] = dequantized_value(book.reshape(-1), c.indices, book.shape[-1], c.group_size)
    return replace_initializers(model, values)


@pytest.mark.parametrize("k, grouped", [(4, False), (32, False), (300, False), (8, True)])
def test_outputs_equal_the_numpy_reference(convnet, convnet_inputs, k, grouped):
    books, tensors = codes_for(convnet, k, np.random.default_rng(k), grouped)
    model = rewrite(convnet, books, tensors)
    onnx.checker.check_model(model, full_check=True)
    x, _ = convnet_inputs
    want = make_session(reference_model(convnet, books, tensors)).run(None, {"input": x})[0]
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
    assert sum(t.name.startswith("onnxhq.codebook") for t in model.graph.initializer) == 1  # shared once
    assert "conv.weight" not in {t.name for t in model.graph.initializer}


def test_index_dtype_bounds():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
    with pytest.raises(Exception, match="65,536"):
        index_dtype(65537)


def test_original_model_is_not_mutated(convnet):
    before = convnet.SerializeToString()
    books, tensors = codes_for(convnet, 4, np.random.default_rng(0))
    rewrite(convnet, books, tensors)
    assert convnet.SerializeToString() == before
