"""The forward-only Hessian against numpy: second moments per weight, and the per-layer scale."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxhq.errors import DataError, ModelError
from onnxhq.hessian.activations import activation_hessian


def model_with(
    text_body: str,
    inputs: str,
    weights: dict[str, np.ndarray],
    *,
    outputs: str = "float y",
    opset: int = 17,
) -> onnx.ModelProto:
    """A model from ONNX text whose ``weights`` are initializers."""
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g ({inputs}) => ({outputs}) {{
      {text_body}
    }}""")
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    return model


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def raw(model, feeds, params, **kw):
    return activation_hessian(model, feeds, params, scaled=False, samples=10_000, **kw)


def test_matmul_weight_second_is_the_mean_square_of_each_input_feature():
    x, w = rand(20, 3, 5), rand(5, 4, seed=1)
    model = model_with("y = MatMul(x, W)", "float[N, 3, 5] x", {"W": w})
    before = model.SerializeToString()
    h = raw(model, {"x": x}, ["W"], batch_size=7)
    assert model.SerializeToString() == before, "the input model was changed"
    want = np.mean(x.astype(np.float64) ** 2, axis=(0, 1))
    assert h["W"].dtype == np.float32 and h["W"].shape == w.shape
    np.testing.assert_allclose(h["W"], np.broadcast_to(want[:, None], w.shape), rtol=1e-6)


def test_matmul_weight_first_reads_the_rows_of_the_right_operand():
    x, w = rand(12, 5, 3), rand(4, 5, seed=1)  # y = W @ x: (4, 5) @ (N, 5, 3)
    model = model_with("y = MatMul(W, x)", "float[N, 5, 3] x", {"W": w})
    want = np.mean(x.astype(np.float64) ** 2, axis=(0, 2))
    np.testing.assert_allclose(
        raw(model, {"x": x}, ["W"])["W"], np.broadcast_to(want[None, :], w.shape), rtol=1e-6
    )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_second_follows_trans_b_and_scales_by_alpha_squared(trans_b):
    x, b = rand(9, 5, seed=2), rand(5, 4, seed=3)  # activation (M, K), weight (K, N)
    w = b.T.copy() if trans_b else b
    model = model_with(f"y = Gemm<alpha=0.5, transB={trans_b}>(x, B)", "float[N, 5] x", {"B": w})
    per_k = 0.25 * np.mean(x.astype(np.float64) ** 2, axis=0)
    want = per_k[None, :] if trans_b else per_k[:, None]
    np.testing.assert_allclose(
        raw(model, {"x": x}, ["B"])["B"], np.broadcast_to(want, w.shape), rtol=1e-6
    )


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_weight_first_uses_the_rows_of_the_activation(trans_a):
    # y = A x^T with the samples of x (N, 8) as the columns of the activation (8, N).
    x, a = rand(10, 8, seed=4), rand(6, 8, seed=5)
    w = a.T.copy() if trans_a else a
    model = model_with(
        f"t = Transpose(x)\n      y = Gemm<transA={trans_a}>(A, t)", "float[N, 8] x", {"A": w}
    )
    per_k = np.mean(x.astype(np.float64) ** 2, axis=0)
    want = per_k[:, None] if trans_a else per_k[None, :]
    np.testing.assert_allclose(
        raw(model, {"x": x}, ["A"], batch_size=3)["A"], np.broadcast_to(want, w.shape), rtol=1e-6
    )


def im2col_moments(x: np.ndarray, w_shape, *, strides, dilations, pads, group) -> np.ndarray:
    """Brute force: for every output position and kernel offset, the padded input it reads."""
    cout, cin_g, *kernel = w_shape
    sp = len(kernel)
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *zip(pads[:sp], pads[sp:])])
    out = [
        (padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(sp)
    ]
    h = np.zeros(w_shape)
    count = 0
    for n in range(x.shape[0]):
        for o in itertools.product(*map(range, out)):
            count += 1
            for co in range(cout):
                g = co // (cout // group)
                for ci in range(cin_g):
                    for kk in itertools.product(*map(range, kernel)):
                        at = tuple(
                            oi * s + ki * d for oi, s, ki, d in zip(o, strides, kk, dilations)
                        )
                        h[(co, ci, *kk)] += padded[(n, g * cin_g + ci, *at)] ** 2
    return h / count


@pytest.mark.parametrize(
    "attrs, w_shape, strides, dilations, pads, group",
    [
        ("pads=[1, 0, 1, 2], strides=[2, 1]", (4, 6, 3, 2), [2, 1], [1, 1], [1, 0, 1, 2], 1),
        ("group=2, dilations=[2, 1], strides=[1, 2]", (4, 3, 2, 3), [1, 2], [2, 1], [0] * 4, 2),
        ("group=6, pads=[1, 1, 1, 1]", (6, 1, 3, 3), [1, 1], [1, 1], [1] * 4, 6),  # depthwise
        ('auto_pad="SAME_UPPER", strides=[2, 2]', (2, 6, 3, 2), [2, 2], [1, 1], [1, 0, 1, 1], 1),
    ],
)
def test_conv_equals_a_brute_force_im2col(attrs, w_shape, strides, dilations, pads, group):
    x, w = rand(3, 6, 5, 5, seed=6), rand(*w_shape, seed=7)
    model = model_with(f"y = Conv<{attrs}>(x, W)", "float[N, 6, 5, 5] x", {"W": w})
    want = im2col_moments(x, w_shape, strides=strides, dilations=dilations, pads=pads, group=group)
    np.testing.assert_allclose(raw(model, {"x": x}, ["W"], batch_size=2)["W"], want, rtol=1e-6)


def test_conv_transpose_uses_each_input_channel_mean_square():
    x, w = rand(4, 3, 5, 5, seed=8), rand(3, 2, 2, 2, seed=9)
    model = model_with("y = ConvTranspose<strides=[2, 2]>(x, W)", "float[N, 3, 5, 5] x", {"W": w})
    want = np.mean(x.astype(np.float64) ** 2, axis=(0, 2, 3))
    np.testing.assert_allclose(
        raw(model, {"x": x}, ["W"])["W"],
        np.broadcast_to(want[:, None, None, None], w.shape),
        rtol=1e-6,
    )


def test_gather_rows_get_their_share_of_lookups_and_unread_rows_the_floor():
    table = rand(5, 3, seed=10)
    ids = np.array([[0, 1, 1], [1, 4, 0]], np.int64)
    model = model_with("y = Gather(E, ids)", "int64[N, 3] ids", {"E": table})
    h = raw(model, {"ids": ids}, ["E"])["E"]
    share = np.array([2, 3, 0, 0, 1]) / 6
    np.testing.assert_allclose(h[[0, 1, 4]], np.broadcast_to(share[[0, 1, 4], None], (3, 3)))
    assert (h[[2, 3]] > 0).all() and (h[[2, 3]] == pytest.approx(1e-8 * share.max()))


def test_a_shared_weight_sums_its_uses_and_constant_nodes_count_as_weights():
    x, w = rand(10, 4, seed=11), rand(4, 4, seed=12)
    body = (
        "W = Constant<value=float[4, 4] {" + ", ".join(map(str, w.ravel().tolist())) + "}>()\n"
        "      a = MatMul(x, W)\n      y = MatMul(a, W)"
    )
    model = model_with(body, "float[N, 4] x", {})
    a = x.astype(np.float64) @ w
    want = np.mean(x.astype(np.float64) ** 2, axis=0) + np.mean(a**2, axis=0)
    np.testing.assert_allclose(
        raw(model, {"x": x}, ["W"])["W"], np.broadcast_to(want[:, None], w.shape), rtol=1e-5
    )


def test_the_scale_is_the_output_change_per_predicted_layer_error():
    # Rows of x along the axes: features uncorrelated exactly, so sum(h d^2) is the true layer
    # error; the last layer's scale is then 1, and an output multiplied by 3 scales it by 9.
    x = np.repeat(np.diag([1.0, 2.0, 0.5, 3.0]).astype(np.float32), 4, axis=0)
    w = rand(4, 3, seed=13)
    plain = model_with("y = MatMul(x, W)", "float[N, 4] x", {"W": w})
    tripled = model_with(
        "a = MatMul(x, W)\n      k = Constant<value_float=3.0>()\n      y = Mul(a, k)",
        "float[N, 4] x",
        {"W": w},
    )
    unscaled = raw(plain, {"x": x}, ["W"])["W"]
    scaled = activation_hessian(plain, {"x": x}, ["W"], calibration_samples=16)["W"]
    np.testing.assert_allclose(scaled, unscaled, rtol=1e-3)
    np.testing.assert_allclose(
        activation_hessian(tripled, {"x": x}, ["W"])["W"], 9 * unscaled, rtol=1e-3
    )


def test_layers_of_a_network_come_out_finite_positive_and_weight_shaped():
    x = rand(40, 2, 6, 6, seed=14)
    weights = {
        "C": rand(4, 2, 3, 3, seed=15),
        "D": rand(4, 1, 3, 3, seed=16),
        "F": rand(4, 3, seed=17),
    }
    body = """c = Conv<pads=[1, 1, 1, 1], strides=[2, 2]>(x, C)
      r = Relu(c)
      d = Conv<group=4>(r, D)
      f = Flatten(d)
      y = MatMul(f, F)"""
    model = model_with(body, "float[N, 2, 6, 6] x", weights)
    progress = []
    h = activation_hessian(
        model,
        {"x": x},
        list(weights),
        samples=32,
        batch_size=8,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert {k: v.shape for k, v in h.items()} == {k: v.shape for k, v in weights.items()}
    assert all(np.isfinite(v).all() and (v > 0).all() and v.dtype == np.float32 for v in h.values())
    assert progress[-1] == (4 + 4 * (1 + 3), 20)  # 4 statistics batches; 4 calibration batches,
    # each run once as is and once per weight moved


def test_bad_weights_and_data_are_refused_by_name():
    w = rand(3, 3)
    model = model_with("a = MatMul(x, W)\n      y = Add(a, W)", "float[N, 3] x", {"W": w})
    with pytest.raises(ModelError, match=r"weight 'W' is read by Add node '' \(input 1\)"):
        raw(model, {"x": rand(4, 3)}, ["W"])
    plain = model_with("y = MatMul(x, W)", "float[N, 3] x", {"W": w})
    with pytest.raises(ModelError, match="weight 'V' is not a constant of the model"):
        raw(plain, {"x": rand(4, 3)}, ["V"])
    with pytest.raises(DataError, match="the data has no input 'x'"):
        raw(plain, {"z": rand(4, 3)}, ["W"])


# --- the real models (slow; skipped without ../shared) --------------------------------------

SHARED = Path(os.environ.get("ONNXHQ_SHARED", Path(__file__).parents[2] / "shared"))
REAL_MODELS = {
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (3, 48, 192),
    "ch_PP-OCRv4_det_infer.onnx": (3, 64, 96),
    "ch_PP-OCRv4_rec_infer.onnx": (3, 48, 160),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_models_get_a_finite_positive_diagonal_for_every_weight(name):
    path = SHARED / "models" / "real" / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    model = onnx.load(path)
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    params = sorted(
        {
            n.input[1]
            for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "MatMul") and n.input[1] in consts
        }
    )
    x = np.random.default_rng(0).uniform(-1, 1, (8, *REAL_MODELS[name])).astype(np.float32)
    h = activation_hessian(model, {"x": x}, params, samples=8, batch_size=4, calibration_samples=4)
    assert set(h) == set(params)
    assert all(np.isfinite(v).all() and (v > 0).all() for v in h.values())


def test_the_samples_used_are_those_the_draws_give_and_a_partial_read_suffices():
    """Raw moments of 10 of 40 samples: those of `Draws.order`; the same from a dataset holding
    only those rows."""
    from onnxhq.data import load_data
    from onnxhq.hessian import Draws
    from onnxhq.model import input_specs

    x, w = rand(40, 5, seed=6), rand(5, 3, seed=7)
    model = model_with("y = MatMul(x, W)", "float[N, 5] x", {"W": w})
    picked = x[Draws(10, seed=4).order(40)].astype(np.float64)
    h = activation_hessian(model, {"x": x}, ["W"], scaled=False, samples=10, seed=4)
    want = np.mean(picked**2, axis=0)
    np.testing.assert_allclose(h["W"], np.broadcast_to(want[:, None], w.shape), rtol=1e-6)
    part = load_data({"x": x}, input_specs(model), rows=Draws(10, seed=4).rows(40))
    assert len(part) == 10
    for scaled in (False, True):
        whole = activation_hessian(model, {"x": x}, ["W"], scaled=scaled, samples=10, seed=4)
        got = activation_hessian(model, part, ["W"], scaled=scaled, samples=10, seed=4)
        np.testing.assert_array_equal(got["W"], whole["W"])


def test_memory_is_a_small_multiple_of_the_weights_not_of_the_activations():
    """Six 1024 x 1024 layers (24 MiB), 256 samples: the numpy memory at the peak stays under
    three times the weights (one copy fed to onnxruntime, the result, one layer's temporaries),
    whatever the number of samples."""
    import tracemalloc

    d, layers = 1024, 6
    body = "\n".join(
        f"m{i} = MatMul({'x' if i == 0 else f'r{i - 1}'}, W{i})\n"
        + (f"r{i} = Relu(m{i})" if i < layers - 1 else "")
        for i in range(layers)
    )
    weights = {f"W{i}": rand(d, d, seed=i) / np.float32(np.sqrt(d)) for i in range(layers)}
    model = model_with(body, f"float[N, {d}] x", weights, outputs=f"float[N, {d}] m{layers - 1}")
    x = rand(256, d, seed=9)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        h = activation_hessian(model, {"x": x}, list(weights), samples=256, batch_size=16)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert all(np.isfinite(v).all() and v.shape == (d, d) for v in h.values())
    assert peak < 3 * layers * d * d * 4, f"{peak / 2**20:.0f} MiB at the peak"
