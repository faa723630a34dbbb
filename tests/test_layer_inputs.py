"""layer_hessians: X X^T of each weight's inputs equals a direct numpy reference."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhq.errors import ConfigError
from onnxhq.layer_inputs import layer_hessians
from onnxhq.layerwise import from_view, matrix_view


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v.astype(np.float32), n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _naive_patches(x, kh, kw, stride, pads, dil, group):
    """Per group: rows (sample, oy, ox) of the padded patch, columns (c, ky, kx)."""
    n, c = x.shape[:2]
    xp = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    oh = (xp.shape[2] - dil * (kh - 1) - 1) // stride + 1
    ow = (xp.shape[3] - dil * (kw - 1) - 1) // stride + 1
    per = c // group
    out = []
    for g in range(group):
        rows = []
        for s in range(n):
            for oy in range(oh):
                for ox in range(ow):
                    patch = [
                        xp[s, ch, oy * stride + ky * dil, ox * stride + kx * dil]
                        for ch in range(g * per, (g + 1) * per)
                        for ky in range(kh)
                        for kx in range(kw)
                    ]
                    rows.append(patch)
        out.append(np.array(rows, np.float64))
    return out


@pytest.mark.parametrize(
    "group,stride,pads,dil", [(1, 1, [1, 1, 1, 1], 1), (2, 2, [0, 1, 2, 0], 1), (4, 1, [1] * 4, 2)]
)
def test_conv_matches_numpy_im2col(group, stride, pads, dil):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4 // group, 3, 2)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=group, strides=[stride] * 2, pads=pads,
        dilations=[dil] * 2,
    )  # fmt: skip
    model = _model([node], [("x", [None, 4, 7, 6])], ["y"], {"w": w})
    got = layer_hessians(model, {"x": x}, ["w"], batch_size=2)["w"]
    ref = _naive_patches(x.astype(np.float64), 3, 2, stride, pads, dil, group)
    assert got.groups == group and not got.transpose and got.samples == len(ref[0])
    for g in range(group):
        np.testing.assert_allclose(
            got.blocks[0][g], ref[g].T @ ref[g] / len(ref[g]), rtol=1e-5, atol=1e-5
        )
    # the view's columns are the weight's (C/G, kh, kw): the layer output is view @ patch
    view = matrix_view(w.astype(np.float64), got)
    assert view.shape == (group, 8 // group, 4 // group * 6)
    np.testing.assert_array_equal(from_view(view, w.shape, got), w)


def test_matmul_both_slots_and_gemm_trans_b():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    w_right = rng.standard_normal((5, 4)).astype(np.float32)  # x @ W
    w_left = rng.standard_normal((2, 3)).astype(np.float32)  # W @ x
    w_gemm = rng.standard_normal((7, 4)).astype(np.float32)  # y (., 4) @ W^T (transB)
    nodes = [
        helper.make_node("MatMul", ["x", "wr"], ["y"]),
        helper.make_node("MatMul", ["wl", "x"], ["z"]),
        helper.make_node("ReduceMean", ["y"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["m", "wg"], ["g"], transB=1, alpha=0.5),
    ]
    model = _model(
        nodes, [("x", [None, 3, 5])], ["z", "g"], {"wr": w_right, "wl": w_left, "wg": w_gemm}
    )
    got = layer_hessians(model, {"x": x}, ["wr", "wl", "wg"], batch_size=4, cap=3)
    x64 = x.astype(np.float64)
    rows = x64.reshape(-1, 5)
    full = rows.T @ rows / len(rows)
    hr = got["wr"]
    assert hr.transpose and [b.shape for b in hr.blocks] == [(1, 3, 3), (1, 2, 2)]  # cap=3
    np.testing.assert_allclose(hr.blocks[0][0], full[:3, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hr.blocks[1][0], full[3:, 3:], rtol=1e-5, atol=1e-5)
    cols = np.moveaxis(x64, -2, -1).reshape(-1, 3)
    assert not got["wl"].transpose
    np.testing.assert_allclose(
        got["wl"].blocks[0][0], cols.T @ cols / len(cols), rtol=1e-5, atol=1e-5
    )
    m = (x64 @ w_right).mean(axis=1)
    assert not got["wg"].transpose  # stored (N, K): already the (outputs, inputs) view
    ref = 0.25 * m.T @ m / len(m)
    np.testing.assert_allclose(got["wg"].blocks[0][0], ref[:3, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["wg"].blocks[1][0], ref[3:, 3:], rtol=1e-5, atol=1e-5)
    assert matrix_view(w_right, hr).shape == (1, 4, 5)


def test_weights_of_other_ops_are_left_out():
    w = np.ones((3, 2), np.float32)
    nodes = [helper.make_node("Gather", ["w", "i"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert layer_hessians(model, {"i": np.array([0, 2])}, ["w"]) == {}


def test_bad_cap_is_refused():
    with pytest.raises(ConfigError, match="cap=0 must be an integer >= 1"):
        layer_hessians(onnx.ModelProto(), {}, [], cap=0)


def test_a_conv_subsample_is_the_rows_drawn_from_the_full_im2col():
    """With more output positions than ``max_rows``, only the drawn rows are gathered: ``H`` is
    that subset's, the subset the full im2col would give (same seed, same draw)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=3, pads=[1, 1, 1, 1], strides=[2, 2])
    model = _model([node], [("x", [None, 6, 9, 8])], ["y"], {"w": w})
    got = layer_hessians(model, {"x": x}, ["w"], batch_size=3, max_rows=50, seed=7)["w"]
    order = np.random.default_rng(7).permutation(3)  # the samples' draw, then the rows'
    ref = _naive_patches(x[order].astype(np.float64), 3, 3, 2, [1, 1, 1, 1], 1, 3)
    pick = np.random.default_rng([7, 0, 0]).choice(len(ref[0]), 50, replace=False)
    assert got.samples == 50
    for g in range(3):
        rows = ref[g][pick]
        np.testing.assert_allclose(got.blocks[0][g], rows.T @ rows / 50, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.mean[g], rows.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_the_compensation_cost_reads_each_weight_as_its_nodes_matrix():
    """Gemm(x, w1^T), MatMul(w2, .) and Gemm(w3^T, .): (outputs, inputs) (5, 4), (3, 1), (7, 3)."""
    from onnxhq.layer_inputs import COLUMN_COST, ROUNDS, compensation_cost

    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1),
        helper.make_node("MatMul", ["w2", "a"], ["b"]),
        helper.make_node("Gemm", ["w3", "b"], ["y"], transA=1),
    ]
    inits = {"w1": np.ones((5, 4)), "w2": np.ones((3, 1)), "w3": np.ones((3, 7))}
    model = _model(nodes, [("x", [1, 4])], ["y"], inits)

    def want(outputs, b, runs=2):  # 32 samples in batches of 16, a row per sample
        return b**3 + ROUNDS * outputs * b**2 + runs * 16 * b**2 + ROUNDS * COLUMN_COST * b

    got = compensation_cost(model, ["w1", "w2", "w3"], samples=32)
    assert got == want(5, 4) + want(3, 1) + want(7, 3)
