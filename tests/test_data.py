"""Data files: keys, aliases, shapes, dtypes and hostile files give clear DataErrors."""

from __future__ import annotations

import numpy as np
import pytest

from onnxhq.data import load_data, save_data
from onnxhq.errors import DataError


def write(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_inputs_by_name_and_labels(tmp_path, convnet):
    x = np.zeros((5, 1, 6, 6), np.float32)
    data = load_data(write(tmp_path, input=x, labels=np.arange(5)), convnet)
    assert len(data) == 5 and data.labels.dtype == np.int64
    assert [len(b[0]["input"]) for b in data.batches(2)] == [2, 2, 1]


def test_single_input_aliases_x_and_y(tmp_path, convnet):
    data = load_data(write(tmp_path, x=np.zeros((3, 1, 6, 6)), y=np.array([0, 1, 2])), convnet)
    assert data.inputs["input"].dtype == np.float32 and list(data.labels) == [0, 1, 2]


def test_save_data_round_trips(tmp_path, convnet):
    save_data(tmp_path / "s.npz", {"input": np.ones((2, 1, 6, 6), np.float32)}, [1, 0])
    assert list(load_data(tmp_path / "s.npz", convnet).labels) == [1, 0]


@pytest.mark.parametrize("arrays, match", [
    (dict(image=np.zeros((2, 1, 6, 6), np.float32)), "no array for model input 'input'.*image"),
    (dict(input=np.zeros((2, 1, 5, 6), np.float32)), r"shape \(2, 1, 5, 6\).*\[N, 1, 6, 6\]"),
    (dict(input=np.zeros((2, 6, 6), np.float32)), "rank 4"),
    (dict(input=np.zeros((2, 1, 6, 6), np.uint8)), "uint8.*x / 255"),
    (dict(input=np.zeros((2, 1, 6, 6), np.float32), labels=np.zeros(3, int)), r"labels.*\(2,\)"),
    (dict(input=np.zeros((2, 1, 6, 6), np.float32), labels=np.array([0.5, 1.0])), "integer class labels"),
    (dict(input=np.full((2, 1, 6, 6), np.nan, np.float32)), "NaN"),
])
def test_bad_arrays_are_data_errors(tmp_path, convnet, arrays, match):
    with pytest.raises(DataError, match=match):
        load_data(write(tmp_path, **arrays), convnet)


def test_pickled_objects_are_refused(tmp_path, convnet):
    path = tmp_path / "p.npz"
    np.savez(path, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_data(path, convnet)


def test_not_an_npz_and_missing_file(tmp_path, convnet):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(path, convnet)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "none.npz", convnet)


def test_labels_required_when_asked(tmp_path, convnet):
    with pytest.raises(DataError, match="no 'labels'"):
        load_data(write(tmp_path, input=np.zeros((2, 1, 6, 6), np.float32)), convnet, need_labels=True)


def test_a_file_that_is_not_a_zip_is_never_unpickled(tmp_path, convnet):
    path = tmp_path / "text.npz"
    path.write_text("just text, which np.load would try to unpickle")
    with pytest.raises(DataError, match="not a readable .npz archive"):
        load_data(path, convnet)
