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


def stored_npz(path, **arrays) -> None:
    """An .npz with uncompressed members (their bytes sit in the file as they are)."""
    import io

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            z.writestr(f"{name}.npy", buffer.getvalue())


def test_only_the_samples_asked_for_are_read(tmp_path, convnet):
    x = np.arange(400 * 36, dtype=np.float32).reshape(400, 1, 6, 6)
    path = tmp_path / "d.npz"
    stored_npz(path, input=x, labels=np.arange(400) % 4)
    raw = bytearray(path.read_bytes())
    tail = raw.index(x[300].tobytes())  # damage row 300 on: a whole read fails its CRC check
    raw[tail : tail + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    data = load_data(path, convnet, max_samples=10)
    np.testing.assert_array_equal(data.inputs["input"], x[:10])
    assert list(data.labels) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with pytest.raises(DataError, match=r"d\.npz is not a readable \.npz archive"):
        load_data(path, convnet)


def test_a_member_larger_than_memory_is_refused_before_it_is_inflated(
    tmp_path, convnet, monkeypatch
):
    import onnxhq.npz

    path = write(tmp_path, input=np.zeros((4096, 1, 6, 6), np.float32))
    monkeypatch.setattr(onnxhq.npz, "available_memory", lambda: 2**19)
    with pytest.raises(DataError) as info:
        load_data(path, convnet)
    assert str(info.value) == (
        f"data file {path}: 'input' has shape (4096, 1, 6, 6) float32: 576.0 KiB to read, more "
        "than the 512.0 KiB of memory available; pass fewer samples"
    )
    assert len(load_data(path, convnet, max_samples=100)) == 100  # 14 KiB: fine


def test_a_declared_shape_that_disagrees_with_the_stored_bytes_is_refused(tmp_path, convnet):
    path = tmp_path / "d.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1, 6, 6)}
    with zipfile.ZipFile(path, "w") as z, z.open("input.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(144))
    with pytest.raises(DataError, match=r"declares shape \(1000000000, 1, 6, 6\) float32 "
                       r"\(134\.1 GiB\) but stores 144 bytes"):  # fmt: skip
        load_data(path, convnet)


def test_labels_past_int64_and_out_of_range_are_refused(tmp_path, convnet):
    from onnxhq.data import Dataset, check_label_range

    x = np.zeros((2, 1, 6, 6), np.float32)
    path = write(tmp_path, input=x, labels=np.array([1, 2**63], np.uint64))
    with pytest.raises(DataError, match="'labels' has label 9223372036854775808, past int64"):
        load_data(path, convnet)
    data = Dataset({"input": x}, np.array([0, 4]), "train.npz")
    check_label_range(data, 5)
    with pytest.raises(DataError) as info:
        check_label_range(data, 4)
    assert str(info.value) == (
        "train.npz: label 4 is not a class of the model, which scores 4 classes (labels 0..3); "
        "check the labels match this model"
    )


#: Run in a child: read the first 1,000 samples of argv[1]; print their count and peak RSS.
FIRST_SAMPLES = """
import resource, sys
from onnxhq.data import load_data
from onnxhq.model import InputSpec
import numpy as np
data = load_data(sys.argv[1], [InputSpec("x", np.dtype(np.float32), (None, 4))], max_samples=1000)
print(len(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_zip_bomb_is_not_inflated_past_the_samples_used(tmp_path):
    """4 GiB of zeros in a few MB: reading 1,000 samples inflates 16 KB of it."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "hostile"))
    import make_hostile

    bomb = make_hostile.zip_bomb(tmp_path, gib=4.0)
    assert bomb.stat().st_size < 2**24
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_SAMPLES, str(bomb)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    count, peak = map(int, proc.stdout.split())
    assert count == 1000 and peak < 2**29  # the interpreter, numpy and onnx: well under 512 MB


def test_chosen_rows_are_read_in_order_and_taken_by_file_index(tmp_path, convnet):
    x = np.arange(50 * 36, dtype=np.float32).reshape(50, 1, 6, 6)
    path = write(tmp_path, input=x, labels=np.arange(50) % 4)
    data = load_data(path, convnet, rows=[42, 3, 17, 3])
    assert list(data.rows) == [3, 17, 42] and data.total == data.source_size == 50
    np.testing.assert_array_equal(data.inputs["input"], x[[3, 17, 42]])
    assert list(data.labels) == [3, 1, 2]
    taken = data.take(np.array([42, 3, 42]))
    np.testing.assert_array_equal(taken.inputs["input"], x[[42, 3, 42]])
    with pytest.raises(DataError) as info:
        data.take(np.array([4]))
    assert str(info.value) == (
        f"{path}: sample 4 was not read (only 3 of its 50 samples were); read it with "
        "load_data(rows=...)"
    )
    with pytest.raises(DataError, match=r"holds 50 samples; sample 50 does not exist"):
        load_data(path, convnet, rows=[0, 50])
    in_memory = load_data({"input": x}, convnet, rows=[42, 3])
    np.testing.assert_array_equal(in_memory.take(np.array([3, 42])).inputs["input"], x[[3, 42]])


def test_chosen_rows_inflate_nothing_past_the_last_one(tmp_path, convnet):
    """Damage row 300: the rows before it read (the member is left before its CRC check); a
    read that reaches the member's end fails."""
    x = np.arange(400 * 36, dtype=np.float32).reshape(400, 1, 6, 6)
    path = tmp_path / "d.npz"
    stored_npz(path, input=x)
    raw = bytearray(path.read_bytes())
    tail = raw.index(x[300].tobytes())
    raw[tail : tail + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(
        load_data(path, convnet, rows=[299, 7]).inputs["input"], x[[7, 299]]
    )
    with pytest.raises(DataError, match="not a readable"):  # the CRC check at the member's end
        load_data(path, convnet, rows=[7, 399])


def test_chosen_rows_fit_in_memory_where_the_whole_member_does_not(tmp_path, convnet, monkeypatch):
    import onnxhq.npz

    x = np.random.default_rng(0).normal(size=(4096, 1, 6, 6)).astype(np.float32)  # 576 KiB
    path = tmp_path / "d.npz"
    np.savez_compressed(path, input=x)
    monkeypatch.setattr(onnxhq.npz, "available_memory", lambda: 2**16)  # 64 KiB
    monkeypatch.setattr(onnxhq.npz, "_CHUNK", 2**12)  # inflate 4 KiB at a time
    rows = np.random.default_rng(1).choice(4096, 100, replace=False)  # 14 KiB
    np.testing.assert_array_equal(
        load_data(path, convnet, rows=rows).inputs["input"], x[np.sort(rows)]
    )
    with pytest.raises(DataError, match=r"576\.0 KiB to read, more than the 64\.0 KiB"):
        load_data(path, convnet)


def test_sample_count_reads_the_headers_and_checks_them(tmp_path, convnet):
    from onnxhq.data import sample_count

    x = np.zeros((30, 1, 6, 6), np.float32)
    assert sample_count(write(tmp_path, input=x, labels=np.zeros(30, int)), convnet) == 30
    with pytest.raises(DataError) as info:
        sample_count(write(tmp_path, input=x, labels=np.zeros(29, int)), convnet)
    assert str(info.value) == (
        f"{tmp_path / 'd.npz'}: 'labels' must be integer class labels of shape (30,), "
        "got shape (29,)"
    )
    with pytest.raises(DataError, match="has no 'labels' array"):
        sample_count(write(tmp_path, input=x), convnet, need_labels=True)
    with pytest.raises(DataError, match="'input' is a scalar; put the samples on axis 0"):
        sample_count(write(tmp_path, input=np.float32(1)), convnet)
