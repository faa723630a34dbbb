"""The artifacts of a rewritten graph (`encode`, `decode`): the graph file and its sidecar keep
one symbol per weight while the graph packs two per byte, the stored graph leaves out what decode
restores, older graph formats still decode, and streams or graphs that do not fit are refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from test_rewrite import codes_for, mlp, shared_codes

import onnxhq
from onnxhq import naming
from onnxhq.decode import graph_format, join_artifacts, load_from_bytes
from onnxhq.encode import GRAPH_FORMAT_VERSION, index_streams, index_streams_of, split_artifacts
from onnxhq.errors import ConfigError, ModelError, SidecarError
from onnxhq.model import load_model
from onnxhq.rewrite import PACKED_OP, rewrite
from onnxhq.sidecar import IndexStream, describe_sidecar


def test_artifacts_keep_logical_indices_and_the_graph_packs_them():
    books, tensors = shared_codes(5, np.random.default_rng(3))
    model = rewrite(mlp(), books, tensors)
    streams = {s.name: s for s in index_streams(model)}
    w1 = streams[naming.index_tensor("w1")]
    assert w1.shape == (13, 7) and w1.alphabet_size == 5
    np.testing.assert_array_equal(w1.indices, tensors["w1"].indices)
    artifacts = split_artifacts(model, "mlp")
    decoded = load_from_bytes(artifacts.graph_bytes, artifacts.sidecar_bytes)
    assert {t.name: t for t in decoded.graph.initializer} == {
        t.name: t for t in model.graph.initializer
    }
    packed = {t.name: t for t in decoded.graph.initializer}[naming.index_tensor("w1")]
    assert list(packed.dims) == [46]


@pytest.mark.parametrize("k, grouped", [(5, False), (300, False), (8, True)])
def test_streams_of_the_quantized_weights_are_those_of_the_rewritten_graph(convnet, k, grouped):
    # Plain, 4-bit packed and channel-grouped index tensors: encoding straight from the codes gives
    # the very bytes of encoding from the graph, and the layouts describe_sidecar reads from them.
    books, tensors = codes_for(convnet, k, np.random.default_rng(k), grouped)
    model = rewrite(convnet, books, tensors)
    streams = index_streams_of(tensors, books)
    assert streams == index_streams(model)
    given = split_artifacts(model, "net", streams=streams, original_bytes=123)
    read = split_artifacts(model, "net", original_bytes=123)
    assert given == read
    assert list(given.layouts) == describe_sidecar(given.sidecar_bytes)


def test_split_refuses_streams_that_are_not_the_models():
    books, tensors = shared_codes(5, np.random.default_rng(3))
    model = rewrite(mlp(), books, tensors)
    streams = index_streams_of(tensors, books)
    w1 = naming.index_tensor("w1")
    wider = index_streams_of(tensors, {"shared": np.zeros(6, np.float32)})
    with pytest.raises(
        ConfigError,
        match=rf"stream '{w1}' is of shape \(13, 7\) with 6 levels, "
        r"the model's index tensor is of shape \(13, 7\) with 5",
    ):
        split_artifacts(model, "mlp", streams=wider)
    with pytest.raises(ConfigError, match=rf"stream '{w1}' is missing"):
        split_artifacts(model, "mlp", streams=[s for s in streams if s.name != w1])
    extra = IndexStream("x", (2,), 5, np.zeros(2, np.uint8))
    with pytest.raises(
        ConfigError,
        match="stream 'x' is of shape \\(2,\\) with 5 levels, the model's index tensor is missing",
    ):
        split_artifacts(model, "mlp", streams=[*streams, extra])
    with pytest.raises(ConfigError, match="codebook 'shared', which is not among the 0 given"):
        index_streams_of(tensors, {})


@pytest.mark.parametrize(
    "recorded, version",
    [("1", 1), ("2", 2), (None, GRAPH_FORMAT_VERSION), ("3", None), ("02", None), ("two", None)],
)
def test_the_graph_format_is_written_as_its_decimal_and_read_back_exactly(recorded, version):
    from onnxhq.model import get_metadata, set_metadata

    books, tensors = shared_codes(5, np.random.default_rng(3))
    graph = onnx.load_from_string(
        split_artifacts(rewrite(mlp(), books, tensors), "mlp").graph_bytes
    )
    assert get_metadata(graph)[naming.METADATA_VERSION] == str(GRAPH_FORMAT_VERSION)
    if recorded is None:
        del graph.metadata_props[:]
    else:
        set_metadata(graph, {naming.METADATA_VERSION: recorded})
    if version is None:
        with pytest.raises(
            ModelError, match=f"graph format {recorded}; this onnxhq reads formats 1, 2"
        ):
            graph_format(graph)
    else:
        assert graph_format(graph) == version


@pytest.mark.parametrize("scope_codebooks", ["shared", "per weight"])
def test_the_stored_graph_leaves_out_what_decode_restores(scope_codebooks):
    books, tensors = shared_codes(5, np.random.default_rng(3))
    if (
        scope_codebooks == "per weight"
    ):  # codebooks named after their weight: decode derives that input too
        books = {name: books["shared"] for name in tensors}
        tensors = {
            name: SimpleNamespace(**{**vars(t), "codebook": name}) for name, t in tensors.items()
        }
    model = rewrite(mlp(), books, tensors)
    artifacts = split_artifacts(model, "mlp")
    stored = onnx.load_from_string(artifacts.graph_bytes)
    onnx.checker.check_model(stored, full_check=True)  # still a valid ONNX file
    assert not stored.functions
    nodes = [n for n in stored.graph.node if n.domain == naming.DOMAIN]
    assert [n.name for n in nodes] == ["", ""] and [n.input[1] for n in nodes] == ["", ""]
    shared = naming.codebook_tensor("shared") if scope_codebooks == "shared" else ""
    assert [n.input[0] for n in nodes] == [shared, shared]
    assert not [i for i in stored.graph.input if i.name.endswith(naming.index_tensor(""))]
    decoded = load_from_bytes(artifacts.graph_bytes, artifacts.sidecar_bytes)
    assert list(decoded.graph.node) == list(model.graph.node)
    assert list(decoded.functions) == list(model.functions)
    assert list(decoded.graph.input) == list(model.graph.input)


def _as_format_1(artifacts) -> bytes:
    """The graph as onnxhq 0.2.0 wrote it: full node inputs, index tensors declared as graph
    inputs."""
    from onnx import helper

    from onnxhq.encode import restore_derived_names
    from onnxhq.model import set_metadata

    graph = onnx.load_from_string(artifacts.graph_bytes)
    streams = {s.name: s for s in onnxhq.sidecar.decode_sidecar(artifacts.sidecar_bytes)[0]}
    nodes = [n for n in graph.graph.node if n.domain == naming.DOMAIN]
    for node in nodes:
        restore_derived_names(node)
        node.name = ""
    packed = {n.input[1] for n in nodes if n.op_type == PACKED_OP}
    for node in nodes:
        if node.domain == naming.DOMAIN:
            name = node.input[1]
            shape = (
                [-(-streams[name].indices.size // 2)]
                if name in packed
                else list(streams[name].shape)
            )
            dtype = (
                onnx.TensorProto.UINT8
                if name in packed or streams[name].alphabet_size <= 256
                else onnx.TensorProto.UINT16
            )
            graph.graph.input.append(helper.make_tensor_value_info(name, dtype, shape))
    kept = [p for p in graph.metadata_props if p.key != naming.METADATA_SIDECAR_CRC]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    set_metadata(graph, {naming.METADATA_VERSION: "1"})
    return graph.SerializeToString()


def test_graphs_of_format_1_still_decode_and_check_declared_shapes():
    books, tensors = shared_codes(5, np.random.default_rng(3))
    model = rewrite(mlp(), books, tensors)
    artifacts = split_artifacts(model, "mlp")
    old = _as_format_1(artifacts)
    decoded = load_from_bytes(old, artifacts.sidecar_bytes)
    assert list(decoded.graph.node) == list(model.graph.node)
    assert {t.name: t for t in decoded.graph.initializer} == {
        t.name: t for t in model.graph.initializer
    }
    assert list(decoded.graph.input) == list(model.graph.input)
    # shapes of plain index tensors come from the declarations
    unpacked = rewrite(mlp(), books, tensors, pack=False)
    graph = onnx.load_from_string(_as_format_1(split_artifacts(unpacked, "mlp")))
    streams = index_streams(unpacked)
    plain = streams[0]
    wrong = IndexStream(
        plain.name, (plain.indices.size,), plain.alphabet_size, plain.indices.reshape(-1)
    )
    with pytest.raises(SidecarError, match="gives shape"):
        join_artifacts(graph, [wrong] + streams[1:])


def test_a_sidecar_of_another_model_is_refused_before_decoding():
    books, tensors = shared_codes(5, np.random.default_rng(3))
    ours = split_artifacts(rewrite(mlp(), books, tensors), "mlp")
    books2, tensors2 = shared_codes(5, np.random.default_rng(4))
    theirs = split_artifacts(rewrite(mlp(), books2, tensors2), "mlp")
    with pytest.raises(SidecarError, match="valid, but not this graph's sidecar"):
        load_from_bytes(ours.graph_bytes, theirs.sidecar_bytes)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(alphabet_size=17), "at most 16"),
        (dict(shape=(7, 13)), r"shape \(7, 13\), the graph expects \(13, 7\)"),
    ],
)
def test_join_refuses_streams_that_do_not_fit_the_packed_input(change, match):
    books, tensors = shared_codes(5, np.random.default_rng(3))
    model = rewrite(mlp(), books, tensors)
    graph = load_model(split_artifacts(model, "mlp").graph_bytes)
    streams = index_streams(model)
    bad = streams[0]
    fields = dict(
        name=bad.name, shape=bad.shape, alphabet_size=bad.alphabet_size, indices=bad.indices
    )
    fields.update(change)
    fields["indices"] = fields["indices"].reshape(fields["shape"])
    with pytest.raises(SidecarError, match=match):
        join_artifacts(graph, [IndexStream(**fields)] + streams[1:])


def test_a_damaged_dequantize_node_is_a_model_error():
    books, tensors = shared_codes(5, np.random.default_rng(3))
    artifacts = split_artifacts(rewrite(mlp(), books, tensors), "mlp")
    graph = onnx.load_from_string(artifacts.graph_bytes)
    del next(n for n in graph.graph.node if n.domain == naming.DOMAIN).input[1:]
    with pytest.raises(ModelError, match="needs a codebook and an index input"):
        load_from_bytes(graph.SerializeToString(), artifacts.sidecar_bytes)
