"""Data files: keys, aliases, shapes, dtypes and hostile files give clear DataErrors."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from onnxhq.data import load_data, open_npz, read_npz, save_data
from onnxhq.errors import DataError
from onnxhq.model import input_specs


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


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(image=np.zeros((2, 1, 6, 6), np.float32)), "no array for model input 'input'.*image"),
        (dict(input=np.zeros((2, 1, 5, 6), np.float32)), r"shape \(2, 1, 5, 6\).*\[N, 1, 6, 6\]"),
        (dict(input=np.zeros((2, 6, 6), np.float32)), "rank 4"),
        (dict(input=np.zeros((2, 1, 6, 6), np.uint8)), "uint8.*x / 255"),
        (
            dict(input=np.zeros((2, 1, 6, 6), np.float32), labels=np.zeros(3, int)),
            r"labels.*\(2,\)",
        ),
        (
            dict(input=np.zeros((2, 1, 6, 6), np.float32), labels=np.array([0.5, 1.0])),
            "integer class labels",
        ),
        (dict(input=np.full((2, 1, 6, 6), np.nan, np.float32)), "NaN"),
    ],
)
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
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_data(path, convnet)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "none.npz", convnet)


def test_labels_required_when_asked(tmp_path, convnet):
    with pytest.raises(DataError, match="no 'labels'"):
        load_data(
            write(tmp_path, input=np.zeros((2, 1, 6, 6), np.float32)), convnet, need_labels=True
        )


def test_a_file_that_is_not_a_zip_is_never_unpickled(tmp_path, convnet):
    path = tmp_path / "text.npz"
    path.write_text("just text, which np.load would try to unpickle")
    with pytest.raises(DataError, match=r"not a readable \.npz archive"):
        load_data(path, convnet)


def test_input_specs_stand_in_for_the_model(tmp_path, convnet):
    path = write(tmp_path, input=np.ones((3, 1, 6, 6), np.float32), labels=np.arange(3))
    from_model = load_data(path, convnet)
    from_specs = load_data(path, input_specs(convnet))
    np.testing.assert_array_equal(from_specs.inputs["input"], from_model.inputs["input"])
    np.testing.assert_array_equal(from_specs.labels, from_model.labels)


def test_members_the_model_does_not_read_are_not_decoded(tmp_path, convnet):
    # A pickled member would be refused if it were read (see test_pickled_objects_are_refused).
    path = write(tmp_path, input=np.zeros((2, 1, 6, 6), np.float32), notes=np.array([{}], object))
    assert len(load_data(path, convnet)) == 2
    with pytest.raises(DataError, match="pickled"):
        read_npz(path)


def test_a_corrupt_member_is_a_data_error_when_read(tmp_path, convnet):
    path = tmp_path / "c.npz"
    np.savez_compressed(
        path, input=np.zeros((2, 1, 6, 6), np.float32), big=np.arange(4096, dtype=np.float64)
    )
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("big.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 20, start + info.compress_size - 20):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(load_data(path, convnet)) == 2
    with open_npz(path, "test file") as arrays:
        assert sorted(arrays) == ["big", "input"] and "big" in arrays and "other" not in arrays
        with pytest.raises(DataError, match=r"test file .*c\.npz is not a readable \.npz archive"):
            arrays["big"]
