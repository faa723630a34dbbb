"""`onnxhq.quantize.quantize`: the result's contract, invariances, pruning, rates and errors."""

from __future__ import annotations

import numpy as np
import pytest

from onnxhq.errors import ConfigError, DataError, OnnxhqError
from onnxhq.quantize import METHODS, Quantization, entropy_bits, quantize

RATES = {"kmeans": {"k": 8}, "hkmeans": {"k": 8}, "uniform": {"k": 8}, "ecsq": {"target_bits": 2.5}}


def laplace(n=2000, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.laplace(scale=0.1, size=n).astype(dtype), rng.lognormal(size=n).astype(dtype)


def check_contract(q: Quantization, w, h=None, pruned=None):
    """Everything a Quantization promises, recomputed from scratch."""
    assert q.codebook.dtype == np.float64 and q.codebook.ndim == 1
    assert np.all(np.diff(q.codebook) > 0), "codebook must be ascending and unique"
    assert q.indices.dtype == np.int32 and q.indices.shape == w.shape
    assert q.indices.min() >= 0 and q.indices.max() < q.codebook.size
    hh = np.ones(w.size) if h is None else np.asarray(h, np.float64)
    direct = float(np.sum(hh * (np.asarray(w, np.float64) - q.codebook[q.indices]) ** 2))
    assert q.distortion == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert q.entropy_bits == pytest.approx(entropy_bits(np.bincount(q.indices)), abs=1e-12)
    if pruned is not None and pruned.any():
        zero = np.flatnonzero(q.codebook == 0.0)
        assert zero.size == 1 and np.signbit(q.codebook[zero[0]]) == False  # noqa: E712 (+0.0, not -0.0)
        assert np.all(q.indices[pruned] == zero[0])
        assert np.all(q.codebook[q.indices[pruned]] == 0.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_method_keeps_the_contract(method, dtype):
    w, h = laplace(dtype=dtype)
    q = quantize(w, h, method=method, **RATES[method])
    check_contract(q, w, h)
    if "k" in RATES[method]:
        assert q.codebook.size <= RATES[method]["k"]


@pytest.mark.parametrize("method", METHODS)
def test_pruned_weights_stay_exactly_zero_and_move_no_center(method):
    w, h = laplace(seed=1)
    pruned = np.random.default_rng(2).random(w.size) < 0.6
    w = np.where(pruned, 0.0, w)
    q = quantize(w, h, method=method, pruned=pruned, **RATES[method])
    check_contract(q, w, h, pruned)
    # The other codewords are what the unpruned weights alone give (pruned ones take k's last slot).
    # (A fixed lam, not a target: a target counts the pruned symbol, so it means another lam.)
    rate = {"lam": 1e-3} if method == "ecsq" else dict(RATES[method], k=RATES[method]["k"] - 1)
    q = quantize(
        w, h, method=method, pruned=pruned, **({"lam": 1e-3} if method == "ecsq" else RATES[method])
    )
    alone = quantize(w[~pruned], h[~pruned], method=method, **rate)
    np.testing.assert_allclose(np.setdiff1d(q.codebook, [0.0]), alone.codebook, rtol=1e-12)


def test_pruned_weights_that_are_not_zero_are_still_set_to_zero():
    w, h = laplace(n=500)
    pruned = np.abs(w) < 0.05
    q = quantize(w, h, method="hkmeans", k=6, pruned=pruned)
    check_contract(q, w, h, pruned)
    assert q.codebook.size == 6


def test_everything_pruned_gives_the_zero_codeword_alone():
    w = np.zeros(10)
    q = quantize(w, method="hkmeans", k=4, pruned=np.ones(10, bool))
    assert q.codebook.tolist() == [0.0] and q.indices.tolist() == [0] * 10 and q.entropy_bits == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(method):
    w, h = laplace(seed=3)
    a = quantize(w, h, method=method, seed=7, **RATES[method])
    b = quantize(w, h, method=method, seed=7, **RATES[method])
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_k_means_plus_plus_init_is_seeded():
    w, h = laplace(n=5000, seed=4)
    runs = [
        quantize(w, h, method="hkmeans", k=12, init="k-means++", seed=s) for s in (0, 0, 1, 2, 3)
    ]
    np.testing.assert_array_equal(runs[0].indices, runs[1].indices)
    assert len({r.codebook.tobytes() for r in runs[1:]}) > 1, (
        "different seeds should differ somewhere"
    )


@pytest.mark.parametrize(
    "method,rate",
    [
        ("hkmeans", {"k": 10}),
        ("uniform", {"k": 10}),
        ("hkmeans", {"target_bits": 2.0}),
        ("uniform", {"target_bits": 2.0}),
        ("ecsq", {"target_bits": 2.0}),
    ],
)
def test_scaling_all_importances_changes_nothing(method, rate):
    w, h = laplace(seed=5)
    a = quantize(w, h, method=method, **rate)
    b = quantize(w, h * 1024.0, method=method, **rate)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.codebook, b.codebook, rtol=1e-12)
    assert b.distortion == pytest.approx(1024.0 * a.distortion, rel=1e-9)


@pytest.mark.parametrize("method", ["hkmeans", "uniform", "ecsq"])
def test_unit_importances_equal_no_importances(method):
    w, _ = laplace(seed=6, dtype=np.float32)
    a = quantize(w, None, method=method, **RATES[method])
    b = quantize(w, np.ones_like(w), method=method, **RATES[method])
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.codebook, b.codebook)


def test_plain_kmeans_ignores_importances_but_reports_weighted_distortion():
    w, h = laplace(seed=7)
    plain = quantize(w, h, method="kmeans", k=8)
    unweighted = quantize(w, None, method="hkmeans", k=8)
    np.testing.assert_array_equal(plain.indices, unweighted.indices)
    check_contract(plain, w, h)
    assert plain.distortion >= quantize(w, h, method="hkmeans", k=8, exact=True).distortion


def test_inputs_are_not_mutated():
    w, h = laplace(seed=8, dtype=np.float32)
    pruned = np.abs(w) < 0.01
    copies = w.copy(), h.copy(), pruned.copy()
    for method in METHODS:
        quantize(w, h, method=method, pruned=pruned, **RATES[method])
    for before, after in zip(copies, (w, h, pruned)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [1.0, 2.5, 4.0])
def test_target_bits_is_met_from_below(method, target):
    w, h = laplace(n=20000, seed=9, dtype=np.float32)
    q = quantize(w, h, method=method, target_bits=target)
    # k-means moves in whole clusters (about log2((k+1)/k) bits apart); the others within 0.01 bits.
    slack = 0.35 if method in ("kmeans", "hkmeans") else 0.01
    assert target - slack <= q.entropy_bits <= target + 1e-12


def test_target_bits_counts_the_pruned_symbol():
    w, h = laplace(n=20000, seed=10)
    pruned = np.random.default_rng(0).random(w.size) < 0.5
    q = quantize(w, h, method="uniform", target_bits=2.0, pruned=pruned)
    assert 1.99 <= q.entropy_bits <= 2.0
    assert q.entropy_bits == pytest.approx(entropy_bits(np.bincount(q.indices)))


def test_target_bits_above_the_lossless_rate_keeps_every_value():
    w = np.repeat(np.arange(4.0), 10)
    q = quantize(w, method="hkmeans", target_bits=3.0)
    assert q.distortion == 0.0 and q.codebook.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_bits_means_k_is_two_to_the_bits():
    w, h = laplace(seed=11)
    np.testing.assert_array_equal(
        quantize(w, h, method="hkmeans", bits=3).indices,
        quantize(w, h, method="hkmeans", k=8).indices,
    )


def test_k_equal_to_the_distinct_values_is_lossless():
    w = np.array([3.0, 1.0, 2.0, 1.0, 3.0])
    q = quantize(w, method="hkmeans", k=3)
    assert q.distortion == 0.0 and q.codebook.tolist() == [1.0, 2.0, 3.0]


def test_uniform_grid_values_are_multiples_of_one_step():
    w, h = laplace(seed=12)
    q = quantize(w, h, method="uniform", k=9, cell_value="grid")
    step = np.min(np.diff(q.codebook))
    np.testing.assert_allclose(q.codebook / step, np.round(q.codebook / step), atol=1e-9)
    assert 0.0 in q.codebook  # the grid runs through 0


def test_uniform_mean_values_beat_grid_values():
    w, h = laplace(seed=13)
    mean = quantize(w, h, method="uniform", k=9)
    grid = quantize(w, h, method="uniform", k=9, cell_value="grid")
    np.testing.assert_array_equal(mean.indices, grid.indices)
    assert mean.distortion <= grid.distortion


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "median"}, "unknown method 'median'"),
        ({"method": "hkmeans"}, "exactly one of k, bits, lam, target_bits; got none"),
        ({"method": "hkmeans", "k": 4, "bits": 2}, "got k, bits"),
        ({"method": "hkmeans", "lam": 0.1}, "lam=0.1 is ECSQ's multiplier"),
        ({"method": "ecsq", "k": 8}, "not k=8"),
        ({"method": "ecsq", "bits": 3}, "not bits=3"),
        ({"method": "hkmeans", "k": 0}, "k=0 must be an integer >= 1"),
        ({"method": "hkmeans", "k": 2.5}, "k=2.5 must be an integer"),
        ({"method": "hkmeans", "bits": 2.5}, "bits=2.5 must be a whole number"),
        ({"method": "ecsq", "lam": -1.0}, "lam=-1.0 must be a finite number >= 0"),
        ({"method": "uniform", "target_bits": -1}, "target_bits=-1"),
        ({"method": "uniform", "k": 4, "exact": True}, "method 'uniform' has no DP solver"),
        ({"method": "hkmeans", "k": 4, "seed": -1}, "seed=-1"),
        ({"method": "hkmeans", "k": 4, "max_iter": 0}, "max_iter=0"),
        ({"method": "hkmeans", "k": 4, "init": "random"}, "init='random'"),
        ({"method": "uniform", "k": 4, "cell_value": "median"}, "cell_value='median'"),
        ({"method": "hkmeans", "k": 300}, "k=300 exceeds the 256 distinct unpruned weights"),
    ],
)
def test_bad_options_raise_config_error_with_the_numbers(kwargs, match):
    w = np.linspace(-1, 1, 256)
    with pytest.raises(ConfigError, match=match):
        quantize(w, **kwargs)


def test_k_counts_the_pruned_codeword():
    w = np.array([0.0, 0.0, 1.0, 2.0])
    pruned = w == 0
    assert quantize(w, method="hkmeans", k=3, pruned=pruned).codebook.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match=r"k=4 exceeds the 2 distinct unpruned weights \(plus 1"):
        quantize(w, method="hkmeans", k=4, pruned=pruned)
    with pytest.raises(ConfigError, match="k=1 leaves no codeword"):
        quantize(w, method="hkmeans", k=1, pruned=pruned)


def test_unreachable_target_raises():
    w = np.linspace(-1, 1, 100)
    pruned = np.arange(100) < 50
    with pytest.raises(ConfigError, match=r"target_bits=0.5 is below 1.0000 bits/weight"):
        quantize(w, method="uniform", target_bits=0.5, pruned=pruned)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((2, 3)),), r"w must be 1-D, got shape \(2, 3\)"),
        ((np.zeros(0),), "w is empty"),
        ((np.array([1.0, np.nan]),), "1 non-finite values"),
        ((np.array(["a", "b"]),), "expected floating-point"),
        ((np.zeros(3), np.ones(4)), r"importances of w have shape \(4,\), the weights \(3,\)"),
        (
            (np.arange(3.0), np.array([1.0, -1.0, 1.0])),
            r"finite and >= 0; 1 are not \(the first, at index 1, is -1.0\)",
        ),
        ((np.arange(3.0), np.array([1.0, np.inf, 1.0])), "finite and >= 0"),
        ((np.arange(3.0), np.zeros(3)), "all 3 importances of the unpruned weights are 0"),
    ],
)
def test_bad_arrays_raise_data_error(args, match):
    with pytest.raises(DataError, match=match):
        quantize(*args, method="hkmeans", k=2)


def test_bad_pruned_mask_raises():
    with pytest.raises(DataError, match="pruned mask of w must be bool"):
        quantize(np.arange(4.0), method="hkmeans", k=2, pruned=np.array([0, 1, 0, 1]))


def test_errors_belong_to_the_onnxhq_family():
    assert issubclass(ConfigError, OnnxhqError) and issubclass(DataError, OnnxhqError)
