"""compensate: GPTQ-style assignment onto codebooks, against brute force and plain rounding."""

import itertools

import numpy as np
import pytest

from onnxhq.compensate import compensate
from onnxhq.errors import ConfigError
from onnxhq.layerwise import LayerHessian, from_view, gptq_columns, inverse_cholesky, matrix_view
from onnxhq.quantize import quantize_weights


def _layer(rows, d, n, seed=0, mix=0.6):
    """Weights (rows, d) of a layer ``y = W x`` and correlated inputs X (n, d)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (np.eye(d) + mix * rng.standard_normal((d, d)))
    return rng.standard_normal((rows, d)), x


def _hessian(x):
    return LayerHessian(False, 1, ((x.T @ x / len(x))[None],), len(x))


def _objective(w, q, x):
    """The layer objective ||X (W - Q)^T||^2 / n."""
    return float(np.sum(np.square(x @ (w - q).T)) / len(x))


def test_compensation_never_loses_to_plain_rounding():
    layers = {"a": _layer(12, 9, 200, seed=1), "b": _layer(7, 16, 300, seed=2)}
    weights = {n: w for n, (w, _) in layers.items()}
    hessians = {n: _hessian(x) for n, (_, x) in layers.items()}
    for scope, method, rate in [
        ("layer", "hkmeans", {"bits": 2}),
        ("network", "uniform", {"bits": 3}),
        ("network", "ecsq", {"target_bits": 2.0}),
        ("channel-group", "uniform", {"k": 3}),
    ]:
        extra = {"group_size": 4} if scope == "channel-group" else {}
        plain = quantize_weights(weights, scope=scope, method=method, **rate, **extra)
        match = "target_bits" in rate
        done, info = compensate(plain, weights, hessians, match_bits=match)
        for n, (w, x) in layers.items():
            assert done.codebooks[done.tensors[n].codebook].shape == (
                plain.codebooks[plain.tensors[n].codebook].shape
            )
            got = _objective(w, done.dequantize(n), x)
            assert got <= _objective(w, plain.dequantize(n), x) + 1e-12
            assert got == pytest.approx(info.compensated[n] / _scale(w, hessians[n]), rel=1e-6)
        if match:  # the rate term keeps the coded size at most the plain one's
            assert _bits(done) <= _bits(plain) + 1e-6


def _scale(w, lh):
    """The importance-units scale of a layer without importances: 1 / mean H_cc."""
    return w.size / float(np.sum(np.broadcast_to(lh.diagonal()[:, None], (1, *w.shape))))


def _bits(qw):
    idx = np.concatenate([t.indices.ravel() for t in qw.tensors.values()])
    counts = np.bincount(idx)
    p = counts[counts > 0] / idx.size
    return float(-np.sum(counts[counts > 0] * np.log2(p)))


def test_one_column_is_the_exact_optimum():
    w, x = _layer(40, 1, 50, seed=3)
    plain = quantize_weights({"w": w}, scope="layer", method="hkmeans", k=3)
    done, _ = compensate(plain, {"w": w}, {"w": _hessian(x)}, refit=False)
    book = plain.codebooks["w"]
    best = np.argmin(np.abs(w - book[None, :].astype(np.float64)), axis=1)
    np.testing.assert_array_equal(done.tensors["w"].indices[:, 0], best)


@pytest.mark.parametrize("seed", range(6))
def test_each_column_is_optimal_given_earlier_codes_and_later_columns_free(seed):
    """The promise, by brute force: 3 columns, 2 codewords, every row, damp=0, natural order."""
    w, x = _layer(5, 3, 40, seed=seed, mix=1.0)
    h = x.T @ x / len(x)
    plain = quantize_weights({"w": w}, scope="layer", method="uniform", k=2)
    done, _ = compensate(
        plain, {"w": w}, {"w": _hessian(x)}, refit=False, damp=0.0, order="natural"
    )
    book = plain.codebooks["w"].astype(np.float64)
    got = done.tensors["w"].indices
    for r in range(len(w)):
        for c in range(3):
            costs = []
            for j in range(2):
                e = w[r, : c + 1] - book[[*got[r, :c], j]]
                hf, hl = h[: c + 1, : c + 1], h[: c + 1, c + 1 :]
                schur = hf - hl @ np.linalg.solve(h[c + 1 :, c + 1 :], hl.T) if c < 2 else hf
                costs.append(e @ schur @ e)
            assert got[r, c] == int(np.argmin(costs)), (r, c, costs)


def test_objective_is_the_sum_of_the_column_costs():
    w, x = _layer(6, 8, 60, seed=4)
    h = x.T @ x / len(x)
    u = inverse_cholesky(h, damp=0.0)
    book = np.array([-1.0, 0.0, 1.5])
    paid = []

    def nearest(c, wc, ucc):
        j = np.argmin(np.abs(wc[:, None] - book), axis=1)
        paid.append(np.sum(np.square((wc - book[j]) / ucc)))
        return j, book[j]

    _, q = gptq_columns(w, u, nearest, block=3)
    assert _objective(w, q, x) == pytest.approx(sum(paid), rel=1e-9)


def test_brute_force_over_all_codes_bounds_the_result():
    """On 2 columns x 2 codewords the global optimum is enumerable: greedy is never below it."""
    w, x = _layer(4, 2, 30, seed=5)
    plain = quantize_weights({"w": w}, scope="layer", method="uniform", k=2)
    done, _ = compensate(plain, {"w": w}, {"w": _hessian(x)}, refit=False, damp=0.0)
    book = plain.codebooks["w"].astype(np.float64)
    for r in range(len(w)):
        best = min(
            _objective(w[r : r + 1], book[list(js)][None], x)
            for js in itertools.product(range(2), repeat=2)
        )
        mine = _objective(w[r : r + 1], done.dequantize("w")[r : r + 1].astype(np.float64), x)
        assert best <= mine + 1e-12
        assert mine <= _objective(w[r : r + 1], plain.dequantize("w")[r : r + 1], x) + 1e-12


def test_rows_are_independent_and_input_scale_does_not_matter():
    w, x = _layer(10, 6, 80, seed=6)
    perm = np.random.default_rng(0).permutation(10)
    plain = quantize_weights({"w": w}, scope="layer", method="hkmeans", k=4)
    base, _ = compensate(plain, {"w": w}, {"w": _hessian(x)})
    moved_plain = quantize_weights({"w": w[perm]}, scope="layer", method="hkmeans", k=4)
    moved, _ = compensate(moved_plain, {"w": w[perm]}, {"w": _hessian(x)})
    np.testing.assert_array_equal(moved.tensors["w"].indices, base.tensors["w"].indices[perm])
    np.testing.assert_allclose(moved.codebooks["w"], base.codebooks["w"], rtol=1e-6)
    scaled, _ = compensate(plain, {"w": w}, {"w": _hessian(7.0 * x)})
    np.testing.assert_array_equal(scaled.tensors["w"].indices, base.tensors["w"].indices)


def test_descending_order_permutes_with_the_inputs():
    w, x = _layer(6, 5, 100, seed=7)
    x = x * np.arange(1, 6)  # distinct H_cc
    perm = np.array([3, 0, 4, 1, 2])
    plain = quantize_weights({"w": w}, scope="layer", method="hkmeans", k=4)
    base, _ = compensate(plain, {"w": w}, {"w": _hessian(x)}, refit=False)
    other = quantize_weights({"w": w[:, perm]}, scope="layer", method="hkmeans", k=4)
    np.testing.assert_array_equal(other.codebooks["w"], plain.codebooks["w"])
    moved, _ = compensate(other, {"w": w[:, perm]}, {"w": _hessian(x[:, perm])}, refit=False)
    np.testing.assert_array_equal(moved.tensors["w"].indices, base.tensors["w"].indices[:, perm])


def test_pruned_weights_keep_the_zero_codeword_and_refit_is_a_minimum():
    w, x = _layer(8, 10, 120, seed=8)
    mask = np.abs(w) < 0.4
    w = np.where(mask, 0.0, w)
    plain = quantize_weights({"w": w}, scope="layer", method="hkmeans", k=5, pruned={"w": mask})
    done, _ = compensate(plain, {"w": w}, {"w": _hessian(x)}, pruned={"w": mask})
    q = done.dequantize("w").astype(np.float64)
    assert np.all(q[mask] == 0.0)
    book = done.codebooks["w"].astype(np.float64)
    base = _objective(w, q, x)
    for j in range(book.size):  # no codeword value can move to lower the objective
        if book[j] == 0.0:
            continue
        for step in (-1e-3, 1e-3):
            moved = book.copy()
            moved[j] += step
            assert _objective(w, moved[done.tensors["w"].indices], x) >= base - 1e-9


def test_views_and_bad_options():
    w = np.arange(12.0).reshape(3, 4)
    lh = LayerHessian(True, 1, (np.eye(3)[None],), 1)
    assert matrix_view(w, lh).shape == (1, 4, 3)
    plain = quantize_weights({"w": w}, scope="layer", method="uniform", k=2)
    with pytest.raises(ConfigError, match="give lam or match_bits, not both"):
        compensate(plain, {"w": w}, {"w": lh}, lam=1.0, match_bits=True)
    with pytest.raises(ConfigError, match="unknown order 'random'"):
        compensate(plain, {"w": w}, {"w": lh}, order="random")


def _tiny_model(w1, w2):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w2.shape[0]])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_compress_compensate_lowers_the_layer_error_and_says_so():
    from onnxhq.data import Dataset
    from onnxhq.options import OptionError
    from onnxhq.pipeline import compress

    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((12, 16)).astype(np.float32)
    w2 = rng.standard_normal((5, 16)).astype(np.float32)
    x = (rng.standard_normal((400, 12)) @ (np.eye(12) + rng.standard_normal((12, 12)))).astype(
        np.float32
    )
    model, data = _tiny_model(w1, w2), Dataset({"x": x}, None)
    runs = {c: compress(model, data, method="kmeans", k=4, compensate=c) for c in (False, True)}
    assert runs[True].report.settings["compensate"] is True
    assert runs[False].report.settings["compensate"] is False
    err = {
        c: float(np.sum(np.square(x @ (w1 - r.quantized.dequantize("w1")))))
        for c, r in runs.items()
    }
    assert err[True] < err[False]
    with pytest.raises(OptionError, match="compensate gathers each layer's input statistics"):
        compress(model, None, method="kmeans", k=4, compensate=True)


def _biased_model(wc, bc, wg, bg):
    """Conv (padded, strided, 2 groups, bias) -> Relu -> Flatten -> Gemm (transB, alpha, bias)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1], strides=[2, 1], group=2
            ),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1, alpha=0.5),
        ],
        "biased",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [
            numpy_helper.from_array(v, n)
            for n, v in [("wc", wc), ("bc", bc), ("wg", wg), ("bg", bg)]
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_bias_correction_puts_each_layer_output_mean_back_on_the_float_one():
    from onnxhq.biascorrect import correct_biases
    from onnxhq.layer_inputs import layer_hessians
    from onnxhq.model import replace_initializers
    from onnxhq.runtime import make_session

    rng = np.random.default_rng(3)
    wc = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    wg = rng.standard_normal((3, 6 * 3 * 5)).astype(np.float32)
    bc, bg = rng.standard_normal(6).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    x = (rng.standard_normal((64, 4, 6, 5)) + 0.7).astype(np.float32)  # nonzero mean inputs
    model = _biased_model(wc, bc, wg, bg)
    weights = {"wc": wc, "wg": wg}
    hessians = layer_hessians(model, {"x": x}, ["wc", "wg"], batch_size=64, max_rows=10**6)
    plain = quantize_weights(weights, scope="layer", method="uniform", bits=2)
    quantized = compensate(plain, weights, hessians)[0]
    corrected, changed = correct_biases(model, quantized, weights, hessians)
    assert changed == ["bc", "bg"]
    dequant = {n: quantized.dequantize(n).astype(np.float32) for n in weights}

    def layer_means(proto, inputs, output):
        """Mean per output channel of one layer, fed ``inputs`` (the float model's)."""
        got = make_session(proto).run([output], inputs)[0].astype(np.float64)
        return got.mean(axis=(0, 2, 3)) if got.ndim == 4 else got.mean(axis=0)

    session = make_session(_exposing(model, "f"))
    f = session.run(["f"], {"x": x})[0]
    for layer, output in [("wc", "c"), ("wg", "y")]:
        feeds = {"x": x} if layer == "wc" else {"f": f}
        ref = layer_means(_cut(model, output, feeds), feeds, output)
        before = layer_means(_cut(replace_initializers(model, dequant), output, feeds), feeds,
                             output)  # fmt: skip
        after = layer_means(_cut(replace_initializers(corrected, dequant), output, feeds), feeds,
                            output)  # fmt: skip
        assert np.max(np.abs(before - ref)) > 1e-3  # the quantization did shift the means
        np.testing.assert_allclose(after, ref, atol=1e-4, err_msg=layer)


def _exposing(model, name):
    from onnx import helper

    out = type(model)()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_empty_tensor_value_info(name))
    return out


def _cut(model, output, feeds):
    """The sub-model from ``feeds`` to ``output``."""
    import onnx.shape_inference
    import onnx.utils

    inferred = onnx.shape_inference.infer_shapes(model)
    return onnx.utils.Extractor(inferred).extract_model(list(feeds), [output])


def _reference_codes(plain, w, lh, lam, pruned, order="descending", damp=0.01):
    """GPTQ written out plainly: group by group, column by column, every codeword costed, ``U``
    from ``inv(H)`` directly; the codes `compensate` must give (``refit=False``)."""
    t = plain.tensors["w"]
    k = plain.codebooks["w"].shape[-1]
    book = plain.codebooks["w"].astype(np.float64).reshape(-1, k)
    rows = np.broadcast_to((np.arange(w.shape[0]) // t.group_size)[:, None], w.shape)
    counts = np.bincount(t.indices.ravel(), minlength=k)
    live = np.zeros(book.shape, bool)
    live[rows[~pruned], t.indices[~pruned]] = True
    with np.errstate(divide="ignore"):
        pen = np.where(live, lam * -np.log2(counts / counts.sum()), np.inf)
    h = lh.blocks[0]
    scale = w.size / float(
        np.sum(np.broadcast_to(lh.diagonal()[:, None], matrix_view(w, lh).shape))
    )
    views = [matrix_view(m, lh) for m in (w, rows, pruned, t.indices)]
    out = np.empty(views[0].shape, np.int64)
    for g in range(lh.groups):
        o = np.argsort(-np.diagonal(h[g]), kind="stable") if order == "descending" else None
        hd = h[g][np.ix_(o, o)] + damp * np.mean(np.diagonal(h[g])) * np.eye(len(o))
        u = np.linalg.cholesky(np.linalg.inv(hd)).T
        wv, r, f, old = (v[g][:, o] for v in views)

        def choose(c, wc, ucc, r=r, f=f, old=old):
            cost = (scale / (ucc * ucc)) * np.square(wc[:, None] - book[r[:, c]]) + pen[r[:, c]]
            j = np.where(f[:, c], old[:, c], np.argmin(cost, axis=1))
            return j, book[r[:, c], j]

        out[g][:, o] = gptq_columns(wv, u, choose)[0]
    return from_view(out, w.shape, lh)


@pytest.mark.parametrize("lam", [0.0, 0.02, 0.3])
def test_the_fast_walk_gives_the_codes_of_the_plain_reference(lam):
    """Conv groups walked together, codebook rows per 8 channels, large codebooks searched by
    window, pruned entries: the same codes as the plain column-by-column walk."""
    rng = np.random.default_rng(11)
    groups, per, d = 3, 48, 7
    x = rng.standard_normal((groups, 300, d)) @ (np.eye(d) + 0.5 * rng.standard_normal((d, d)))
    h = np.einsum("gni,gnj->gij", x, x) / 300
    lh = LayerHessian(False, groups, (h,), 300)
    w = rng.standard_normal((groups * per, d))
    pruned = rng.random(w.shape) < 0.1
    w[pruned] = 0.0
    plain = quantize_weights({"w": w}, scope="channel-group", group_size=8, method="uniform",
                             k=200, pruned={"w": pruned})  # fmt: skip
    assert groups * per * 200 > 8192  # the windowed search, not the full one
    done, _ = compensate(plain, {"w": w}, {"w": lh}, pruned={"w": pruned}, lam=lam, refit=False)
    np.testing.assert_array_equal(
        done.tensors["w"].indices, _reference_codes(plain, w, lh, lam, pruned)
    )


def test_sorted_cells_pick_what_the_full_argmin_picks():
    """Duplicate codeword values, dead codewords, several rows and rate terms, ties."""
    from onnxhq.cells import SortedCells

    rng = np.random.default_rng(12)
    for trial in range(30):
        nb, k = int(rng.integers(1, 4)), int(rng.integers(2, 300))
        book = np.round(rng.standard_normal((nb, k)), 1)  # many equal values
        live = rng.random((nb, k)) < 0.8
        live[:, 0] = True
        ell = np.round(rng.uniform(1, 12, (nb, k)))  # equal costs happen
        pen = np.where(live, (trial % 3) * 0.05 * ell, np.inf)
        cells = SortedCells(book, live)
        n = 4000
        x = np.round(rng.standard_normal(n) * 1.5, 2)
        a = rng.choice([0.0, 0.5, 3.0, 40.0], n)
        rows = rng.integers(0, nb, n)
        want = np.argmin(a[:, None] * np.square(x[:, None] - book[rows]) + pen[rows], axis=1)
        np.testing.assert_array_equal(cells.best(x, a, rows, cells.penalties(pen)), want)


def test_inverse_cholesky_of_a_stack_is_each_matrix_own():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 200, 90))
    h = np.einsum("gni,gnj->gij", x, x) / 200
    h[2, 5, :] = h[2, :, 5] = 0.0  # a dead input
    u = inverse_cholesky(h, damp=0.01)
    for g in range(4):
        hd = h[g].copy()
        dead = np.diagonal(hd) <= 0
        mean = np.mean(np.diagonal(hd)[~dead])
        hd[dead, dead] = 1.0
        hd += 0.01 * mean * np.eye(90)
        np.testing.assert_allclose(u[g], np.linalg.cholesky(np.linalg.inv(hd)).T, atol=1e-9)
        np.testing.assert_array_equal(u[g], inverse_cholesky(h[g], damp=0.01))
        assert np.all(np.tril(u[g], -1) == 0)
