"""Hessian-diagonal files: a deterministic round trip, and every malformed file refused with a
message naming the entry."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxhq.errors import DataError, NumericalError
from onnxhq.hessian.files import hessian_bytes, load_hessian, read_second_moment, save_hessian


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    """A model holding the weights of an 8 -> 16 -> 5 MLP (only its initializers matter here)."""
    shapes = {"w1": (16, 8), "b1": (16,), "w2": (5, 16), "b2": (5,)}
    weights = [numpy_helper.from_array(np.ones(s, np.float32), k) for k, s in shapes.items()]
    return helper.make_model(helper.make_graph([], "weights", [], [], weights))


def test_hessian_file_round_trips_and_is_deterministic(model, tmp_path):
    diag = {
        "w2": np.random.default_rng(0).random((5, 16)).astype(np.float32),
        "b1": np.ones(16, np.float32),
    }
    size = save_hessian(tmp_path / "h.npz", diag)
    assert size == os.path.getsize(tmp_path / "h.npz")
    assert os.listdir(tmp_path) == ["h.npz"]  # no temporary file left behind
    for reference_ in (model, {"w2": (5, 16)}):
        back = load_hessian(tmp_path / "h.npz", reference_)
        np.testing.assert_array_equal(back["w2"], diag["w2"])
    assert set(load_hessian(tmp_path / "h.npz", {"w2": (5, 16)})) == {"w2"}
    assert hessian_bytes(diag) == hessian_bytes(dict(reversed(list(diag.items()))))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"w9": np.ones(3)}, "entry 'w9' is not a float initializer of the model"),
        ({"w2": np.ones((16, 5))}, r"'w2' has shape \(16, 5\), the model's weight has \(5, 16\)"),
        ({"w2": np.full((5, 16), np.nan)}, "'w2' has 80 non-finite entries"),
        ({"w2": -np.ones((5, 16))}, r"'w2' has 80 negative entries \(min -1\)"),
        ({"w2": np.ones((5, 16), np.int64)}, "'w2' has dtype int64"),
    ],
)
def test_bad_hessian_file_is_a_data_error_naming_the_entry(model, tmp_path, arrays, message):
    np.savez(tmp_path / "h.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_hessian(tmp_path / "h.npz", model)


def test_unreadable_hessian_files_are_data_errors(model, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "single.npy", np.ones(3))
    np.savez(tmp_path / "pickled.npz", w2=np.array([{"a": 1}], dtype=object))
    for name, message in [
        ("missing.npz", "does not exist"),
        ("junk.npz", "not a readable .npz"),
        ("single.npy", "single .npy array"),
        ("pickled.npz", "pickled objects"),
    ]:
        with pytest.raises(DataError, match=message):
            load_hessian(tmp_path / name, model)
    with pytest.raises(NumericalError, match="Hessian diagonal of 'w' has 1 negative"):
        save_hessian(tmp_path / "bad.npz", {"w": np.array([-1.0, 1.0])})
    assert not (tmp_path / "bad.npz").exists()


def test_second_moment_is_read_as_float64_for_the_names_asked(tmp_path):
    state = {"w": np.full((2, 2), 0.25, np.float32), "other": np.ones(3, np.float32)}
    np.savez(tmp_path / "adam.npz", **state)
    for source in (state, tmp_path / "adam.npz"):
        second = read_second_moment(source, {"w": (2, 2)})
        assert set(second) == {"w"} and second["w"].dtype == np.float64
        np.testing.assert_array_equal(second["w"], 0.25)
