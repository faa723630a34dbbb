"""The deployable graph: decoded models run in onnxruntime (whichever version is installed) and in
the ONNX reference evaluator, and compute exactly what the quantized weights compute.

CI also runs this file in a separate virtual environment with the newest onnxruntime release
(`make test-latest-ort`), since the training build cannot share an environment with it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import onnxhq
from onnxhq.data import load_data
from onnxhq.model import load_model, replace_initializers
from onnxhq.runtime import make_session


@pytest.fixture(scope="module")
def kmeans_result(bundled_model):
    return onnxhq.compress(bundled_model, method="kmeans", k=16)


@pytest.fixture(scope="module")
def sample(bundled_model, bundled_sample):
    return load_data(bundled_sample, load_model(bundled_model)).head(64).inputs


def test_decoded_model_passes_the_full_checker(kmeans_result):
    onnx.checker.check_model(kmeans_result.model(), full_check=True)


def test_outputs_equal_the_quantized_reference_exactly(kmeans_result, bundled_model, sample):
    reference = replace_initializers(
        load_model(bundled_model), kmeans_result.quantized.dequantize_all()
    )
    want = make_session(reference).run(None, sample)[0]
    np.testing.assert_array_equal(make_session(kmeans_result.model()).run(None, sample)[0], want)


def test_unfolded_dequantize_nodes_compute_the_same_model(kmeans_result, bundled_model, sample):
    # Without graph optimizations the weights are computed at run time, not constant-folded, and
    # onnxruntime then uses its non-prepacked GEMM path: equal up to float32 rounding.
    reference = replace_initializers(
        load_model(bundled_model), kmeans_result.quantized.dequantize_all()
    )
    want = make_session(reference, optimize=False).run(None, sample)[0]
    got = make_session(kmeans_result.model(), optimize=False).run(None, sample)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_reference_evaluator_agrees(kmeans_result, bundled_model, sample):
    reference = replace_initializers(
        load_model(bundled_model), kmeans_result.quantized.dequantize_all()
    )
    x = {k: v[:8] for k, v in sample.items()}
    want = ReferenceEvaluator(reference).run(None, x)[0]
    np.testing.assert_array_equal(ReferenceEvaluator(kmeans_result.model()).run(None, x)[0], want)


def test_saved_artifacts_load_as_session(kmeans_result, tmp_path, sample):
    paths = kmeans_result.save(tmp_path)
    session = onnxhq.InferenceSession(paths[0])
    np.testing.assert_array_equal(
        session.run(None, sample)[0], make_session(kmeans_result.model()).run(None, sample)[0]
    )
    plain = onnxhq.load(paths[0], dequantize=True)
    assert not plain.functions
    np.testing.assert_array_equal(
        make_session(plain).run(None, sample)[0],
        make_session(kmeans_result.model()).run(None, sample)[0],
    )


def test_graph_file_leaves_out_function_bodies_and_decode_restores_them(kmeans_result):
    graph = onnx.load_from_string(kmeans_result.artifacts.graph_bytes)
    assert not graph.functions and any(n.domain == "onnxhq" for n in graph.graph.node)
    decoded = kmeans_result.model()
    assert {f.name for f in decoded.functions} == {
        n.op_type for n in decoded.graph.node if n.domain == "onnxhq"
    }


def test_a_newer_graph_format_is_refused(kmeans_result):
    from onnxhq.decode import load_from_bytes
    from onnxhq.model import set_metadata

    graph = onnx.load_from_string(kmeans_result.artifacts.graph_bytes)
    set_metadata(graph, {"onnxhq.version": "99"})
    with pytest.raises(onnxhq.ModelError, match="format 99"):
        load_from_bytes(graph.SerializeToString(), kmeans_result.artifacts.sidecar_bytes)


def test_decode_targets_refuse_codebooks_off_a_grid_and_float_weights(kmeans_result, tmp_path):
    from onnxhq.decode import decode_file

    paths = kmeans_result.save(tmp_path)
    with pytest.raises(onnxhq.ModelError, match="is not a uniform grid through 0"):
        decode_file(paths[0], tmp_path / "int8.onnx", target="int8")
    with pytest.raises(onnxhq.ConfigError, match="--dequantize writes float weights"):
        onnxhq.load(paths[0], dequantize=True, target="int4")
    with pytest.raises(
        onnxhq.ConfigError, match="'int3' is not one of gather, gather-unpacked, int8, int4"
    ):
        onnxhq.load(paths[0], target="int3")
    assert not (tmp_path / "int8.onnx").exists()
