"""Batched runs: one output name gives its array, a list of names gives name -> array; either
way the batches concatenate to what one run over every sample gives."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxhq.runtime import make_session, run_batched

N = 7  # batches of 3: 3 + 3 + 1, the last one short


def two_output_model() -> onnx.ModelProto:
    """``y = x @ W`` (N, 4) and ``s = sum(relu(y), axis 1)`` (N,): outputs of different ranks."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 5] x) => (float[N, 4] y, float[N] s) {
      y = MatMul(x, W)
      r = Relu(y)
      axes = Constant<value = int64[1] {1}>()
      s = ReduceSum<keepdims = 0>(r, axes)
    }""")
    w = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "W"))
    return model


@pytest.fixture(scope="module")
def session():
    return make_session(two_output_model())


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(0).normal(size=(N, 5)).astype(np.float32)}


def test_one_name_gives_the_array_of_one_whole_run(session, feeds):
    (whole,) = session.run(["y"], feeds)
    got = run_batched(session, feeds, "y", batch_size=3)
    assert isinstance(got, np.ndarray) and got.shape == (N, 4)
    np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("names", [["s", "y"], ("y",), ["y", "s"]])
def test_a_list_of_names_gives_each_output_of_one_whole_run(session, feeds, names):
    whole = dict(zip(["y", "s"], session.run(["y", "s"], feeds)))
    got = run_batched(session, feeds, names, batch_size=3)
    assert list(got) == list(names)  # in the order asked, even for a single name
    for name in names:
        assert got[name].shape[0] == N
        np.testing.assert_array_equal(got[name], whole[name])
    assert np.array_equal(got[names[0]], run_batched(session, feeds, names[0], batch_size=3))


def test_an_empty_list_runs_nothing(feeds):
    class Refuses:
        def run(self, names, inputs):
            raise AssertionError("ran with no outputs asked")

    assert run_batched(Refuses(), feeds, [], batch_size=3) == {}
