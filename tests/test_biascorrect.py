"""Bias correction of ``compress --compensate`` when the biases are quantized too
(``include_biases``): each layer's mean output on float inputs goes back to the float model's."""

import numpy as np
import pytest

from onnxhq.data import Dataset
from onnxhq.model import replace_initializers
from onnxhq.pipeline import compress
from onnxhq.runtime import make_session

LAYERS = {"wc": ("bc", "c"), "wg": ("bg", "y")}  # weight -> (bias, the layer's output)


def _two_layers(seed=3):
    """Conv (padded, strided, 2 groups) on ``x`` and Gemm (transB, alpha 0.5) on ``z``, side by
    side: both layers read the model's inputs, so their inputs are the float ones; and calibration
    inputs with nonzero means (so ``(W - Q) E[x]`` is not small)."""
    from onnx import numpy_helper, parser

    model = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        two (float[N, 4, 6, 5] x, float[N, 10] z) => (float[N, 6, 3, 5] c, float[N, 3] y) {
            c = Conv <pads = [1, 1, 1, 1], strides = [2, 1], group = 2> (x, wc, bc)
            y = Gemm <transB = 1, alpha = 0.5> (z, wg, bg)
        }
    """)
    rng = np.random.default_rng(seed)
    values = {
        "wc": rng.standard_normal((6, 2, 3, 3)),
        "bc": rng.standard_normal(6),
        "wg": rng.standard_normal((3, 10)),
        "bg": rng.standard_normal(3),
    }
    model.graph.initializer.extend(
        numpy_helper.from_array(v.astype(np.float32), n) for n, v in values.items()
    )
    x = (rng.standard_normal((64, 4, 6, 5)) + 1.5).astype(np.float32)
    z = (rng.standard_normal((64, 10)) + 1.5).astype(np.float32)
    return model, {"x": x, "z": z}


def _means(model, values, feeds):
    """Output name -> mean per output channel of ``model`` with ``values`` as its initializers."""
    outs = make_session(replace_initializers(model, values)).run(["c", "y"], feeds)
    return {"c": outs[0].mean(axis=(0, 2, 3)), "y": outs[1].mean(axis=0)}


def _float(model):
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("scope", ["layer", "channel-group"])
def test_quantized_biases_keep_the_correction(scope):
    model, feeds = _two_layers()
    originals = _float(model)
    extra = {"group_size": 2} if scope == "channel-group" else {}
    ref = _means(model, originals, feeds)
    for include in (False, True):
        result = compress(model, Dataset(feeds, None), method="kmeans", k=8, scope=scope,
                          hessian="none", compensate=True, include_biases=include,
                          **extra)  # fmt: skip
        q = result.quantized
        assert set(q.tensors) == ({"wc", "wg", "bc", "bg"} if include else {"wc", "wg"})
        weights = {w: q.dequantize(w) for w in LAYERS}
        shifted = _means(model, {**originals, **weights}, feeds)  # float biases, uncorrected
        if include:  # a bias's own codebook holds its few values exactly: all the shift goes
            got = _means(model, {**originals, **q.dequantize_all()}, feeds)
        else:  # the corrected float biases are in the artifact's graph
            got = _means(result.model(), {}, feeds)
        for w, (_, out) in LAYERS.items():
            assert np.max(np.abs(shifted[out] - ref[out])) > 1e-2, (w, "no shift to correct")
            np.testing.assert_allclose(got[out], ref[out], atol=2e-4, err_msg=f"{w} {include}")


def test_a_bias_in_the_shared_codebook_takes_the_codeword_nearest_its_corrected_value():
    model, feeds = _two_layers(seed=5)
    originals = _float(model)
    result = compress(model, Dataset(feeds, None), method="uniform", bits=4, scope="network",
                      hessian="none", compensate=True, include_biases=True,
                      guard="off")  # fmt: skip
    q = result.quantized
    book = q.codebooks["shared"].astype(np.float64)
    assert {t.codebook for t in q.tensors.values()} == {"shared"}
    ref = _means(model, originals, feeds)
    shifted = _means(model, {**originals, **{w: q.dequantize(w) for w in LAYERS}}, feeds)
    for _, (b, out) in LAYERS.items():
        corrected = originals[b] + (ref[out] - shifted[out])  # b + (W - Q) E[x], measured
        nearest = book[np.argmin(np.abs(corrected[:, None] - book), axis=1)]
        np.testing.assert_allclose(q.dequantize(b), nearest, rtol=0, atol=1e-6, err_msg=b)


def test_the_weights_absorb_a_quantized_bias_rounding_error_by_least_squares():
    """``W' = W + e m^T H^-1`` makes the gradient of ``E |(W - W') x + e|^2`` in ``W'`` vanish:
    ``(W' - W) H = e m^T`` per group (OBQ's update of the other columns when the bias column,
    input 1, is rounded first); weights without a quantized bias are left as they are."""
    from onnxhq.biascorrect import absorb_bias_errors
    from onnxhq.layer_inputs import layer_hessians
    from onnxhq.layerwise import matrix_view
    from onnxhq.quantize import quantize_weights

    model, feeds = _two_layers(seed=7)
    weights = _float(model)
    hessians = layer_hessians(model, feeds, ["wc", "wg"], batch_size=64, max_rows=10**6)
    quantized = quantize_weights({"bc": weights["bc"]}, scope="layer", bits=1)
    moved = absorb_bias_errors(model, quantized, weights, hessians, damp=0.0)
    assert moved["wg"] is weights["wg"]  # bg is not quantized
    lh = hessians["wc"]
    err = weights["bc"].astype(np.float64) - quantized.dequantize("bc")
    delta = matrix_view(moved["wc"].astype(np.float64) - weights["wc"], lh)  # (G, R, d)
    got = np.matmul(delta, lh.blocks[0])
    want = err.reshape(delta.shape[:2])[:, :, None] * lh.mean[:, None, :]
    assert np.max(np.abs(err)) > 0.1  # one bit: a real rounding error to absorb
    np.testing.assert_allclose(got, want, atol=1e-4 * np.max(np.abs(want)))
