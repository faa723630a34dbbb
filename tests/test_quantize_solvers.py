"""The solvers against references: brute force, scikit-learn, dense argmin, and their own theory."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from onnxhq.numeric import entropy_bits
from onnxhq.quantize import ecsq as ecsq_mod
from onnxhq.quantize import exact, kmeans, quantize
from onnxhq.quantize._sorted import interval_sums, means, sort_weights, sse
from onnxhq.quantize.kmeans import lloyd, seed_centers
from onnxhq.quantize.uniform import step_for_levels


def brute_force_kmeans(w, h, k):
    """Least weighted squared error over every partition of the sorted weights into k intervals."""
    order = np.argsort(w, kind="stable")
    v, g = np.asarray(w, float)[order], np.asarray(h, float)[order]
    best = np.inf
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        total = 0.0
        for a, b in zip((0, *cuts), (*cuts, len(v))):
            mu = np.dot(g[a:b], v[a:b]) / g[a:b].sum()
            total += np.dot(g[a:b], (v[a:b] - mu) ** 2)
        best = min(best, total)
    return best


@pytest.mark.parametrize("case", range(40))
def test_exact_kmeans_equals_brute_force(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(2, 11))
    w = np.round(rng.normal(size=n), 1 if case % 3 == 0 else 6)  # some cases with repeated values
    h = rng.random(n) + 0.05
    distinct = np.unique(w).size
    k = int(rng.integers(1, min(4, distinct) + 1))
    q = quantize(w, h, method="hkmeans", k=k, exact=True)
    assert q.distortion == pytest.approx(brute_force_kmeans(w, h, k), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [3, 7, 16])
def test_exact_kmeans_is_never_worse_than_lloyd(seed, k):
    rng = np.random.default_rng(seed)
    w = np.concatenate([rng.laplace(scale=0.1, size=1500), rng.normal(1.0, 0.05, 300)])
    h = rng.lognormal(size=w.size)
    best = quantize(w, h, method="hkmeans", k=k, exact=True).distortion
    for init, s in (("dp", 0), ("k-means++", seed), ("k-means++", seed + 100)):
        assert best <= quantize(w, h, method="hkmeans", k=k, init=init, seed=s).distortion * (
            1 + 1e-12
        )


def test_exact_kmeans_on_binned_weights_keeps_its_promises(caplog):
    rng = np.random.default_rng(0)
    w = rng.laplace(scale=0.1, size=exact.KMEANS_UNITS + 5000).astype(np.float32)
    h = rng.lognormal(size=w.size).astype(np.float32)
    with caplog.at_level("INFO", logger="onnxhq.quantize"):
        q = quantize(w, h, method="hkmeans", k=8, exact=True)
    assert "binning costs at most" in caplog.text
    assert q.distortion <= quantize(w, h, method="hkmeans", k=8).distortion * (1 + 1e-12)
    # Bins make the DP inexact by at most loss_bound, a small fraction of the objective here.
    units = exact.make_units(sort_weights(w, h), exact.KMEANS_UNITS)
    assert units.size <= exact.KMEANS_UNITS and 0 < units.loss_bound < 1e-3 * q.distortion


@pytest.mark.parametrize("k", [8, 16])
def test_lloyd_is_at_least_as_good_as_scikit_learn(k):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(k)
    w = rng.laplace(scale=0.1, size=20000)
    h = rng.lognormal(size=w.size)
    ours = quantize(w, h, method="hkmeans", k=k).distortion
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for state in range(3):
            km = sklearn_cluster.KMeans(n_clusters=k, n_init=1, random_state=state).fit(
                w[:, None], sample_weight=h
            )
            assert ours <= km.inertia_ * (1 + 1e-9)


def test_lloyd_never_raises_its_objective_and_ends_at_a_fixed_point():
    rng = np.random.default_rng(1)
    w, h = rng.laplace(size=5000), rng.lognormal(size=5000)
    sw = sort_weights(w, h)
    start = seed_centers(sw, 10, np.random.default_rng(0))
    objectives = [lloyd(sw, start, max_iter=i, tol=0.0).objective for i in (1, 2, 5, 20, 100)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(objectives))
    res = lloyd(sw, start, max_iter=10_000, tol=0.0)
    again = lloyd(sw, res.centers, max_iter=1, tol=0.0)
    np.testing.assert_array_equal(again.thresholds, res.thresholds)


def test_lloyd_refills_clusters_that_empty_out():
    w = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 10.2])
    sw = sort_weights(w, None)
    res = lloyd(
        sw, np.array([-5.0, -4.0, 10.1]), max_iter=50, tol=0.0
    )  # two centers far from any weight
    assert len(res.centers) == 3 and np.all(res.counts > 0)


def test_seeding_gives_distinct_centers_drawn_from_the_weights():
    rng = np.random.default_rng(2)
    w = np.round(rng.normal(size=3000), 2)
    sw = sort_weights(w, rng.random(3000))
    c = seed_centers(sw, 20, np.random.default_rng(0))
    assert len(c) == 20 and np.all(np.diff(c) > 0) and np.all(np.isin(c, w))


def test_unit_importances_equal_unweighted_lloyd():
    w = np.random.default_rng(3).laplace(size=3000).astype(np.float32)
    a = lloyd(sort_weights(w, None), np.array([-1.0, 0.0, 1.0]), max_iter=100, tol=0.0)
    b = lloyd(sort_weights(w, np.ones_like(w)), np.array([-1.0, 0.0, 1.0]), max_iter=100, tol=0.0)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    np.testing.assert_array_equal(a.centers, b.centers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sorting_keeps_pairs_together_and_prefix_sums_are_exact(dtype):
    rng = np.random.default_rng(4)
    w = np.concatenate([rng.laplace(size=3000), [0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38]]).astype(
        dtype
    )
    h = rng.random(w.size).astype(dtype)
    sw = sort_weights(w, h)
    assert np.all(np.diff(sw.values) >= 0)
    assert sorted(zip(sw.values.tolist(), sw.weights.tolist())) == sorted(
        zip(w.tolist(), h.tolist())
    )
    v, g = sw.values.astype(float) - sw.shift, sw.weights.astype(float)
    for p in (0, 1, 777, w.size):
        np.testing.assert_allclose(
            sw.prefix([p])[:, 0],
            [g[:p].sum(), (g * v)[:p].sum(), (g * v * v)[:p].sum()],
            rtol=1e-10,
            atol=1e-300,
        )


@pytest.mark.parametrize("block", [1, 7, 32])
@pytest.mark.parametrize("weighted", [True, False])
def test_block_prefix_sums_match_running_sums_at_every_position(monkeypatch, block, weighted):
    import onnxhq.quantize._sorted as sorted_mod

    monkeypatch.setattr(sorted_mod, "BLOCK", block)
    monkeypatch.setattr(sorted_mod, "PASS_CHUNK", 100)  # several chunks per pass
    rng = np.random.default_rng(5)
    w = (rng.normal(size=1_007) + 3.0).astype(np.float32)  # away from zero: the shift matters
    h = rng.random(w.size).astype(np.float32) if weighted else None
    sw = sort_weights(w, h)
    assert sw.block == block and sw.cum.shape == (3, w.size // block + 1)
    x = sw.values.astype(float) - sw.shift
    g = np.ones_like(x) if h is None else sw.weights.astype(float)
    full = np.zeros((3, w.size + 1))
    full[:, 1:] = np.cumsum([g, g * x, g * x * x], axis=1)
    np.testing.assert_allclose(sw.prefix(np.arange(w.size + 1)), full, rtol=1e-12, atol=1e-9)


def _special_floats(rng, n):
    """float32 weights with ties, both zeros, denormals and the extremes."""
    w = np.round(rng.laplace(size=n), 1).astype(np.float32)
    tiny, big = np.float32(1e-45), np.finfo(np.float32).max
    specials = np.array([0.0, -0.0, tiny, -tiny, 2 * tiny, big, -big, 1.0, -1.0], dtype=np.float32)
    w[rng.integers(0, n, n // 5)] = rng.choice(specials, n // 5)
    return w


@pytest.mark.parametrize("chunk", [1 << 22, 37])
def test_packed_key_sort_is_a_stable_argsort(monkeypatch, chunk):
    import onnxhq.quantize._sorted as sorted_mod

    monkeypatch.setattr(sorted_mod, "CHUNK", chunk)
    rng = np.random.default_rng(14)
    w = _special_floats(rng, 3000)
    values, tags = sorted_mod._sort_f32(w, np.arange(w.size, dtype=np.uint32), stable=True)
    order = np.argsort(w, kind="stable")  # ties, -0.0 == 0.0 included, in index order
    np.testing.assert_array_equal(tags, order)
    np.testing.assert_array_equal(values, w[order])
    assert not np.any(np.signbit(values[values == 0]))  # -0.0 comes back as 0.0
    h = rng.random(w.size).astype(np.float32)
    values, bits = sorted_mod._sort_f32(w, h.view(np.uint32), stable=False)
    np.testing.assert_array_equal(values, w[order])
    assert sorted(zip(values.tolist(), bits.view(np.float32).tolist())) == sorted(
        zip(w.tolist(), h.tolist())
    )


@pytest.mark.parametrize("case", range(12))
def test_table_labels_equal_searchsorted(monkeypatch, case):
    import onnxhq.quantize._sorted as sorted_mod

    monkeypatch.setattr(sorted_mod, "PASS_CHUNK", 500 if case % 2 else 1 << 16)
    rng = np.random.default_rng(case)
    w = _special_floats(rng, 4000)
    t = np.unique(
        rng.choice(w, int(rng.integers(1, 40)))
    )  # thresholds on weights, ties and zeros too
    if case % 3 == 0:
        t[t == 0] = -0.0
    expected = np.searchsorted(t, w, side="right")
    np.testing.assert_array_equal(sorted_mod.labels_f32(w, t), expected)


@pytest.mark.parametrize("seed", range(5))
def test_refine_never_worsens_a_partition_and_keeps_an_optimum(seed):
    rng = np.random.default_rng(seed)
    w = np.round(rng.laplace(scale=0.1, size=3000), 3)  # ties: boundaries must stay at run starts
    h = rng.lognormal(size=w.size)
    sw = sort_weights(w, h)
    starts = np.flatnonzero(np.diff(sw.values)) + 1

    def error(b):
        sums = interval_sums(sw, b)
        return float(sse(sw, sums, means(sw, b, sums)).sum())

    for k in (2, 5, 12):
        start = np.concatenate([[0], np.sort(rng.choice(starts, k - 1, replace=False)), [w.size]])
        refined = kmeans.refine(sw, start)
        assert (
            refined.size == k + 1
            and np.all(np.diff(refined) > 0)
            and np.all(np.isin(refined[1:-1], starts))
        )
        assert error(refined) <= error(start) * (1 + 1e-12)
        units = exact.make_units(sw, exact.KMEANS_UNITS)  # single weights: the exact optimum
        optimum = units.bounds[exact.kmeans_dp(units, k)]
        assert error(kmeans.refine(sw, optimum)) == pytest.approx(error(optimum), rel=1e-12)


def test_ecsq_assignment_is_the_exact_argmin():
    rng = np.random.default_rng(6)
    x, h = rng.laplace(scale=0.1, size=20000), rng.lognormal(sigma=2.0, size=20000)
    h[::97] = 0.0
    c = np.sort(rng.laplace(scale=0.1, size=40))
    pen = rng.random(40) * 0.05
    points = ecsq_mod._Points(x, h, None, False)
    labels = ecsq_mod._assign(points, c, pen)
    cost = h[:, None] * (x[:, None] - c[None, :]) ** 2 + pen[None, :]
    np.testing.assert_allclose(
        cost[np.arange(x.size), labels], cost.min(axis=1), rtol=1e-12, atol=1e-15
    )


def _ecsq_path(w, h, lams, **kwargs):
    out = []
    for lam in lams:
        q = quantize(w, h, method="ecsq", lam=lam, **kwargs)
        out.append((q.entropy_bits, q.distortion))
    return np.array(out)


def test_exact_ecsq_rate_falls_and_distortion_rises_with_lambda():
    w = np.random.default_rng(7).laplace(scale=0.1, size=600)
    path = _ecsq_path(w, None, np.geomspace(1e-5, 1e-1, 12), exact=True)
    assert np.all(np.diff(path[:, 0]) <= 1e-12) and np.all(np.diff(path[:, 1]) >= -1e-12)
    assert path[0, 0] > 4 and path[-1, 0] < 1.5


def test_iterative_ecsq_rate_falls_and_distortion_rises_with_lambda():
    rng = np.random.default_rng(8)
    w, h = rng.laplace(scale=0.1, size=5000), rng.lognormal(size=5000)
    path = _ecsq_path(w, h, np.geomspace(1e-5, 1e-1, 9))
    assert np.all(np.diff(path[:, 0]) <= 0) and np.all(np.diff(path[:, 1]) >= 0)


def test_exact_ecsq_equals_brute_force_with_equal_importances():
    rng = np.random.default_rng(9)
    w, lam = np.round(rng.normal(size=8), 2), 0.05
    v = np.sort(w)
    best = np.inf
    for r in range(0, len(v)):
        for cuts in itertools.combinations(range(1, len(v)), r):
            bounds = (0, *cuts, len(v))
            total = sum(
                np.sum((v[a:b] - v[a:b].mean()) ** 2) + lam * (b - a) * np.log2(len(v) / (b - a))
                for a, b in itertools.pairwise(bounds)
            )
            best = min(best, total)
    q = quantize(w, method="ecsq", lam=lam, exact=True)
    assert q.distortion + lam * len(w) * q.entropy_bits == pytest.approx(best, rel=1e-9)


def test_ecsq_objective_never_rises_across_iterations():
    rng = np.random.default_rng(10)
    w, h = rng.laplace(scale=0.1, size=3000), rng.lognormal(size=3000)
    lam = 2e-3
    js = []
    for it in (1, 2, 4, 8, 16):
        q = quantize(w, h, method="ecsq", lam=lam, max_iter=it, tol=0.0)
        js.append(q.distortion + lam * w.size * q.entropy_bits)
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(js))


def test_uniform_spans_the_weights_with_at_most_k_cells():
    for vmin, vmax, k in ((-1.0, 1.0, 7), (-0.3, 2.0, 16), (0.5, 0.6, 3), (-2.0, -1.0, 1)):
        step = step_for_levels(vmin, vmax, k)
        cells = np.floor(vmax / step + 0.5) - np.floor(vmin / step + 0.5) + 1
        finer = step * (1 - 1e-6)
        assert (
            cells <= k < np.floor(vmax / finer + 0.5) - np.floor(vmin / finer + 0.5) + 1 or k == 1
        )


def test_entropy_of_counts():
    assert entropy_bits([5, 5]) == pytest.approx(1.0)
    assert entropy_bits([4, 0, 0]) == 0.0
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)


@pytest.mark.parametrize("n", [400, 3000])  # dense layers, then divide and conquer
def test_dp_layers_agree_and_prefix_moments_match_direct_sums(n, monkeypatch):
    rng = np.random.default_rng(11)
    w, h = rng.normal(size=n), rng.random(n)
    sw = sort_weights(w, h)
    units = exact.make_units(sw, 1 << 16)
    cuts = exact.kmeans_dp(units, 5)
    monkeypatch.setattr(exact, "DENSE_UNITS", 0)
    np.testing.assert_array_equal(exact.kmeans_dp(units, 5), cuts)
    pos = units.bounds[cuts]
    sums = interval_sums(sw, pos)
    v, g = sw.values.astype(float), sw.weights.astype(float)
    direct = sum(
        np.dot(g[a:b], (v[a:b] - np.dot(g[a:b], v[a:b]) / g[a:b].sum()) ** 2)
        for a, b in itertools.pairwise(pos)
    )
    assert float(sse(sw, sums, means(sw, pos, sums)).sum()) == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize(
    "method,rate",
    [
        ("hkmeans", {"k": 12}),
        ("uniform", {"target_bits": 3.0}),
        ("ecsq", {"lam": 3e-4}),
        ("hkmeans", {"k": 12, "exact": True}),
    ],
)
def test_chunked_and_blocked_paths_match_whole_arrays(monkeypatch, method, rate):
    """The paths taken at tens of millions of weights (chunks, block prefix sums, no order)."""
    import onnxhq.quantize._quantize as quantize_mod
    import onnxhq.quantize._sorted as sorted_mod

    rng = np.random.default_rng(12)
    w = rng.laplace(scale=0.1, size=30_000).astype(np.float32)
    h = rng.lognormal(size=w.size).astype(np.float32)
    pruned = np.abs(w) < 0.01
    whole = quantize(w, h, method=method, pruned=pruned, **rate)
    for module in (sorted_mod, ecsq_mod, quantize_mod):
        monkeypatch.setattr(module, "CHUNK", 1000)
    monkeypatch.setattr(sorted_mod, "PASS_CHUNK", 1000)
    monkeypatch.setattr(sorted_mod, "ORDER_MAX", 5000)
    assert sort_weights(w, h).order is None and sort_weights(w, h.astype(np.float64)).order is None
    chunked = quantize(w, h, method=method, pruned=pruned, **rate)
    assert chunked.distortion == pytest.approx(whole.distortion, rel=1e-6)
    assert chunked.entropy_bits == pytest.approx(whole.entropy_bits, abs=1e-6)
    assert np.mean(chunked.indices == whole.indices) > 0.999


def test_distinct_and_lossless_rate_across_chunks(monkeypatch):
    import onnxhq.quantize._sorted as sorted_mod

    w = np.round(np.random.default_rng(13).normal(size=5000), 1)
    _, counts = np.unique(w, return_counts=True)
    monkeypatch.setattr(sorted_mod, "CHUNK", 64)
    sw = sort_weights(w, None)
    assert sw.distinct() == counts.size
    assert sw.lossless_bits(0) == pytest.approx(entropy_bits(counts), abs=1e-12)
    assert sw.lossless_bits(17) == pytest.approx(entropy_bits(np.append(counts, 17)), abs=1e-12)
