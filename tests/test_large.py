"""Models of any size: compress tensor by tensor (`onnxhq.streamed`), lazy external data,
decode stream by stream; the slow test compresses and decodes a model past 2 GB."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxhq
from onnxhq import pipeline
from onnxhq.decode import decode_file, load
from onnxhq.errors import ModelError
from onnxhq.model import load_model, read_weight
from onnxhq.options import CompressOptions
from onnxhq.sidecar import decode_sidecar
from onnxhq.streamed import compress_streamed
from tools.bench_large import make_chain, measure

SETTINGS = [
    {},
    {"method": "kmeans", "k": 8},
    {"method": "hkmeans", "bits": 3, "hessian": "none"},
    {"scope": "layer", "target_bits": 3},
    {"scope": "channel-group", "group_size": 2, "k": 4},
    {"method": "uniform", "k": 4, "guard": "warn"},
]


def in_memory(monkeypatch, *args, **keywords):
    """`onnxhq.compress` on the in-memory path (every weight at once)."""
    with monkeypatch.context() as m:
        m.setattr(pipeline, "streamable", lambda options: False)
        return onnxhq.compress(*args, **keywords)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(map(str, s.items())))
def test_the_streamed_path_gives_the_in_memory_artifacts(
    convnet_file, convnet_data, monkeypatch, settings
):
    keywords = {"hessian": "none", **settings}
    streamed = onnxhq.compress(convnet_file, **keywords)
    whole = in_memory(monkeypatch, convnet_file, **keywords)
    assert streamed.artifacts.graph_bytes == whole.artifacts.graph_bytes
    assert streamed.artifacts.sidecar_bytes == whole.artifacts.sidecar_bytes
    assert streamed.report.to_dict() == whole.report.to_dict()
    for name, codes in whole.quantized.tensors.items():
        np.testing.assert_array_equal(streamed.quantized.tensors[name].indices, codes.indices)


def test_weighted_streamed_compress_equals_in_memory(convnet_file, convnet_data, monkeypatch):
    keywords = {"hessian": "activations", "hessian_samples": 16}
    streamed = onnxhq.compress(convnet_file, convnet_data, **keywords)
    whole = in_memory(monkeypatch, convnet_file, convnet_data, **keywords)
    assert streamed.artifacts.sidecar_bytes == whole.artifacts.sidecar_bytes
    assert streamed.artifacts.graph_bytes == whole.artifacts.graph_bytes


def test_a_spooled_sidecar_is_the_same_file(convnet_file, monkeypatch, tmp_path):
    whole = in_memory(monkeypatch, convnet_file, hessian="none")
    proto = load_model(convnet_file)
    options = CompressOptions.from_keywords(hessian="none")
    names = [c.name for c in whole.report.layers]
    done = compress_streamed(proto, names, options, None, "convnet", path=convnet_file, keep_max=0)
    assert done.artifacts.sidecar_bytes == b""  # it waits in a temporary file
    assert done.artifacts.sidecar() == whole.artifacts.sidecar_bytes
    assert done.quantized.tensors == {}  # a model read from its file: no index arrays past keep_max
    written = pipeline.Result(done.artifacts, done.quantized, whole.report).save(tmp_path)
    assert written[1].read_bytes() == whole.artifacts.sidecar_bytes


def test_a_sampled_network_codebook_is_nearly_the_exact_one(tmp_path):
    path = make_chain(tmp_path, 3, 64)  # 12,288 weights, a sample of 2,000
    proto = load_model(path, lazy=True)
    options = CompressOptions.from_keywords(hessian="none", target_bits=3)
    names = ["W0", "W1", "W2"]
    exact = compress_streamed(proto, names, options, None, "c", path=path)
    sampled = compress_streamed(proto, names, options, None, "c", path=path, sample_max=2000)
    assert not np.array_equal(exact.quantized.codebooks["shared"],
                              sampled.quantized.codebooks["shared"])  # fmt: skip
    for name in names:  # about the same error: within 1 dB of the fit of every weight
        assert sampled.quantized.errors[name].sqnr_db > exact.quantized.errors[name].sqnr_db - 1
    rate = sum(r.entropy_bits * r.params for r in sampled.rows) / sum(
        r.params for r in sampled.rows
    )
    assert rate < 3 + 0.25


def chain_with_external_data(folder: Path, layers=3, side=64) -> Path:
    return make_chain(folder, layers, side)


def test_external_weights_are_read_one_at_a_time_and_never_from_outside(tmp_path):
    path = chain_with_external_data(tmp_path / "m")
    lazy = load_model(path, lazy=True)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    full = load_model(path)
    for t in full.graph.initializer:
        np.testing.assert_array_equal(
            read_weight(lazy, t.name, path), onnx.numpy_helper.to_array(t)
        )
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "../outside.data"
    bad = tmp_path / "m" / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    (tmp_path / "outside.data").write_bytes(b"\0" * 64 * 64 * 4)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(bad, lazy=True)


def test_decode_writes_the_model_stream_by_stream(tmp_path):
    path = chain_with_external_data(tmp_path / "m")
    result = onnxhq.compress(path, hessian="none", compact_names=False)  # streams named W<i>
    result.save(tmp_path / "c")
    graph = tmp_path / "c" / path.name
    decode_file(graph, tmp_path / "d.onnx")
    decoded = onnx.load(str(tmp_path / "d.onnx"))
    whole = load(graph)
    got = {t.name: onnx.numpy_helper.to_array(t) for t in decoded.graph.initializer}
    want = {t.name: onnx.numpy_helper.to_array(t) for t in whole.graph.initializer}
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
    check_runs_as_dequantized(tmp_path / "d.onnx", result.artifacts.sidecar(), result, side=64)


def check_runs_as_dequantized(decoded: Path, sidecar: bytes, result, *, side: int) -> None:
    """The decoded model in onnxruntime computes the chain with codebook[indices] weights."""
    streams = {s.name: s.indices for s in decode_sidecar(sidecar)[0]}
    book = result.quantized.codebooks["shared"]
    x = np.random.default_rng(1).standard_normal((2, side), dtype=np.float32)
    session = ort.InferenceSession(str(decoded), providers=["CPUExecutionProvider"])
    want = x
    for i in range(len(streams)):
        want = want @ book[streams[f"W{i}.onnxhq_indices"].astype(np.int64)]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_model_past_2_gb_compresses_and_decodes_within_its_memory_bound(tmp_path):
    layers, side = 33, 4096  # 33 x 64 MiB = 2.06 GiB of float32 weights
    path = make_chain(tmp_path / "m", layers, side)
    largest = side * side * 4
    bound = 2 * largest + 2**30
    cli = [sys.executable, "-m", "onnxhq", "--quiet"]
    out = tmp_path / "c"
    for command in (
        [*cli, "compress", str(path), "--hessian", "none", "-o", str(out)],
        [*cli, "decode", str(out / path.name), "-o", str(tmp_path / "d.onnx")],
    ):
        r = measure(command)
        assert r["rc"] == 0, command
        assert r["peak_rss"] <= bound, (command[4], r["peak_rss"] / 2**30)
    (tmp_path / "m" / (path.name + ".data")).unlink()  # room on the disk for the check
    report = onnxhq.report(out / path.name).to_dict()
    assert report["layers"] and len(report["layers"]) == layers
    graph = onnx.load(str(out / path.name))
    book = onnx.numpy_helper.to_array(
        next(t for t in graph.graph.initializer if t.name == "onnxhq.codebook.shared")
    )
    sidecar = (out / path.with_suffix(".onnxhq").name).read_bytes()
    streams = {s.name: s.indices for s in decode_sidecar(sidecar)[0]}
    x = np.random.default_rng(1).standard_normal((2, side), dtype=np.float32)
    want = x
    for i in range(layers):  # the chain with each weight dequantized by hand
        want = want @ book[streams.pop(f"W{i}.onnxhq_indices").astype(np.int64)]
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
