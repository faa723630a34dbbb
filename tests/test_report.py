"""Reports: the stable JSON keys, the text table, and the report rebuilt from saved artifacts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import small_convnet

from onnxhq import naming
from onnxhq.data import Dataset
from onnxhq.describe import describe_artifacts
from onnxhq.errors import ModelError, SidecarError
from onnxhq.pipeline import compress
from onnxhq.report import CodebookRow, LayerRow, Report, codebook_rows, layer_rows

#: Keys scripts are written against; they must not disappear.
STABLE_KEYS = {
    "model",
    "original_bytes",
    "compressed_bytes",
    "compression_ratio",
    "paper_ratio",
    "files",
    "file_bytes",
    "graph_bytes",
    "sidecar_bytes",
    "codebook_bytes",
    "quantized_params",
    "unquantized_params",
    "settings",
    "layers",
}


def make_report(**changes) -> Report:
    fields = dict(
        model="m",
        original_bytes=4000,
        files={"/a/m.onnx": 300, "/a/m.onnxhq": 200},
        layers=(LayerRow("w1", 800, 4, 2, 2.0, 1.9), LayerRow("w2", 200, 3, 50, 2.0, 1.5)),
        codebook_bytes=16,
        unquantized_params=10,
        graph_bytes=300,
        sidecar_bytes=200,
    )
    return Report(**{**fields, **changes})


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(3)
    return Dataset(
        {"input": rng.normal(size=(32, 1, 6, 6)).astype(np.float32)}, rng.integers(0, 4, 32)
    )


@pytest.fixture(scope="module", params=["network", "layer"])
def saved(request, tmp_path_factory, data):
    result = compress(
        small_convnet(), data, k=4, scope=request.param, hessian_samples=32, name="convnet",
        compact_names=False,  # the files keep the weights' names (tests/test_compact.py: short)
    )  # fmt: skip
    paths = result.save(tmp_path_factory.mktemp(request.param))
    return result, paths


def test_json_keeps_the_stable_keys_and_adds_accuracy_only_when_measured():
    plain = make_report().to_dict()
    assert set(plain) >= STABLE_KEYS and "accuracy" not in plain and "codebooks" not in plain
    measured = make_report(accuracy_original=0.99, accuracy_compressed=0.98).to_dict()
    assert measured["accuracy"] == {"original": 0.99, "compressed": 0.98}
    assert json.loads(json.dumps(measured)) == measured


def test_totals():
    r = make_report()
    assert r.compressed_bytes == 500 and r.compression_ratio == 8.0
    assert r.quantized_params == 1000 and r.bits_per_weight == pytest.approx(8 * 52 / 1000)


def test_text_names_every_layer_and_the_source_of_the_original_size():
    text = make_report().to_text()
    assert "w1" in text and "w2" in text and "total quantized" in text and "original model" in text
    decoded = make_report(
        original_source="decoded",
        codebooks=(CodebookRow("book", 4, 3, "float32", (-1.0, 0.0, 0.5, 1.0), ("w1", "w2")),),
    ).to_text()
    assert "float model (decoded)" in decoded
    assert "codebook book: 4 entries (float32), 3 used, read by w1, w2" in decoded


def test_artifacts_give_back_the_compress_report(saved):
    result, paths = saved
    rebuilt = describe_artifacts(paths[0])
    original = result.report
    assert rebuilt.layers == original.layers
    # the files hold sizes and codes, not the original weights: the errors are compress's alone
    assert rebuilt.errors == () and [e.name for e in original.errors] == sorted(
        r.name for r in original.layers
    )
    for field in (
        "files",
        "graph_bytes",
        "sidecar_bytes",
        "codebook_bytes",
        "unquantized_params",
        "original_bytes",
        "compression_ratio",
    ):
        assert getattr(rebuilt, field) == getattr(original, field), field
    assert rebuilt.accuracy_original is None and rebuilt.original_source == "input"


def test_artifacts_without_the_recorded_size_report_against_the_decoded_model(saved, tmp_path):
    import onnx

    _, paths = saved
    graph = onnx.load(str(paths[0]))
    kept = [p for p in graph.metadata_props if p.key != naming.METADATA_ORIGINAL_BYTES]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tmp_path / paths[0].name))
    (tmp_path / paths[1].name).write_bytes(paths[1].read_bytes())
    rebuilt = describe_artifacts(tmp_path / paths[0].name)
    from onnxhq.decode import load

    assert rebuilt.original_source == "decoded"
    assert rebuilt.original_bytes == load(tmp_path / paths[0].name, dequantize=True).ByteSize()


def test_codebooks_hold_the_quantized_values_and_who_reads_them(saved):
    result, paths = saved
    rebuilt = describe_artifacts(paths[0])
    books = result.quantized.codebooks
    assert len(rebuilt.codebooks) == len(books)
    readers = sorted(layer for c in rebuilt.codebooks for layer in c.layers)
    assert readers == sorted(result.quantized.tensors)
    for c in rebuilt.codebooks:
        key = result.quantized.tensors[c.layers[0]].codebook
        np.testing.assert_array_equal(
            np.asarray(c.values, np.float32), np.asarray(books[key], np.float32).ravel()
        )
        used = np.unique(
            np.concatenate([result.quantized.tensors[n].indices.ravel() for n in c.layers])
        )
        assert c.used == used.size <= c.entries


def test_a_plain_model_is_not_artifacts(tmp_path):
    import onnx

    path = tmp_path / "plain.onnx"
    onnx.save(small_convnet(), str(path))
    with pytest.raises(ModelError, match="not a graph written by 'onnxhq compress'"):
        describe_artifacts(path)


def test_a_missing_or_foreign_sidecar_is_a_sidecar_error(saved, tmp_path, data):
    _, paths = saved
    graph = tmp_path / paths[0].name
    graph.write_bytes(paths[0].read_bytes())
    with pytest.raises(SidecarError, match=r"convnet\.onnxhq"):
        describe_artifacts(graph)
    other = compress(
        small_convnet(seed=1, classes=3),
        data.subset(np.arange(8)),
        method="kmeans",
        k=4,
        name="convnet",
    )
    (tmp_path / "convnet.onnxhq").write_bytes(other.artifacts.sidecar_bytes)
    with pytest.raises(SidecarError):
        describe_artifacts(graph)


def test_codebook_bytes_count_what_is_stored_for_float16_weights(tmp_path):
    from onnx import numpy_helper

    model = small_convnet()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    result = compress(model, method="kmeans", k=4, name="half")
    entries = sum(np.asarray(b).size for b in result.quantized.codebooks.values())
    assert result.report.codebook_bytes == 2 * entries
    paths = result.save(tmp_path)
    assert describe_artifacts(paths[0]).codebook_bytes == result.report.codebook_bytes


def layout(name, payload, table, bits, entropy):
    """Stands in for a sidecar StreamLayout: the fields `layer_rows` reads."""
    return SimpleNamespace(
        name=name,
        payload_bytes=payload,
        table_bytes=table,
        coded_bits_per_weight=bits,
        entropy_bits=entropy,
    )


def test_layer_rows_take_sizes_from_each_weights_stream_and_counts_from_its_indices():
    indices = {"b": np.array([[0, 2], [2, 2]]), "a": np.zeros(5, np.uint8)}
    layouts = [
        layout(naming.index_tensor("a"), 1, 2, 4.8, 0.0),
        layout(naming.index_tensor("b"), 3, 4, 14.0, 0.81),
        layout("other", 9, 9, 9.0, 9.0),
    ]
    assert layer_rows(indices, layouts) == (
        LayerRow("b", 4, 2, 7, 14.0, 0.81),
        LayerRow("a", 5, 1, 3, 4.8, 0.0),
    )
    with pytest.raises(SidecarError, match=r"no stream 'c\.onnxhq_indices' for weight 'c'"):
        layer_rows({"c": np.zeros(2)}, layouts)


def test_codebook_rows_list_each_codebook_once_with_its_readers_in_graph_order():
    books = {"shared": np.array([[-1.0, 0.0, 1.0, 2.0]], np.float16), "own": np.array([5.0, 6.0])}
    readers = {"w2": "shared", "w1": "own", "w3": "shared"}
    indices = {"w1": np.array([1, 1]), "w2": np.array([0, 3]), "w3": np.array([[3, 3]])}
    assert codebook_rows(books, readers, indices) == (
        CodebookRow("shared", 4, 2, "float16", (-1.0, 0.0, 1.0, 2.0), ("w2", "w3")),
        CodebookRow("own", 2, 1, "float64", (5.0, 6.0), ("w1",)),
    )
