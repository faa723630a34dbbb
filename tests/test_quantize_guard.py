"""Quantizers that never wreck a layer: extreme rows, vanishing importances, errors, the guard.

Every test here runs with RuntimeWarnings as errors: an overflow, a division by ~0 or an invalid
cast in the step and cell searches fails it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from onnxhq.errors import ConfigError
from onnxhq.quantize import (
    GUARDS,
    METHODS,
    QuantizedWeights,
    TensorError,
    measure_errors,
    quantize,
    quantize_weights,
    tensor_error,
)
from onnxhq.quantize._sorted import sort_weights
from onnxhq.quantize.rate import search_falling
from onnxhq.quantize.uniform import finest_step, occupied_cells

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

RATES = {
    "uniform": {"target_bits": 2.0},
    "ecsq": {"target_bits": 2.0},
    "kmeans": {"k": 4},
    "hkmeans": {"k": 4},
}


def gauss(n=256, seed=0):
    return np.random.default_rng(seed).standard_normal(n)


def rows():
    """Rows of 256 weights that broke (or could break) the step and cell searches."""
    g, rng = gauss(), np.random.default_rng(1)
    return {
        # the issue's row: one codebook row of a real recognizer held weights in [-1.1e-8, 5.6e-11]
        "tiny-range": rng.uniform(-1.1e-8, 5.6e-11, 256).astype(np.float32),
        # magnitudes spread over 37 decades: a uniform grid would need cells numbered beyond int64
        "decades": (np.sign(g) * 1e-8 * 10.0 ** -rng.uniform(0, 37, 256)).astype(np.float32),
        "denormal": (g * 1e-40).astype(np.float32),
        "denormal-f64": g * 1e-310,
        "huge": (g * 1e30).astype(np.float32),
        "huge-f64": g * 1e300,
        "constant": np.full(256, 0.37, np.float32),
        "near-constant": (0.37 + 1e-7 * g).astype(np.float32),
    }


def rel_error(w, q) -> float:
    return tensor_error(w, q).rel_error


def twin(w):
    """``w`` times a power of two that brings it to unit magnitude, exactly (in float64)."""
    top = float(np.max(np.abs(w)))
    return np.ldexp(w.astype(np.float64), -int(np.frexp(top)[1])) if top else w.astype(np.float64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(rows()))
def test_extreme_rows_quantize_like_their_unit_scale_twins(kind, method):
    w = rows()[kind]
    h = np.random.default_rng(2).lognormal(size=w.size)
    q = quantize(w, h, method=method, target_bits=2.0)
    assert np.all(np.isfinite(q.codebook)) and q.indices.min() >= 0
    err = rel_error(w, q.codebook[q.indices])
    if np.unique(w).size == 1:
        assert err == 0.0
        return
    t = twin(w)
    ref = quantize(t, h, method=method, target_bits=2.0)
    # at most a little worse than the same weights at unit scale (often equal: power-of-two
    # scaling is exact), and never a collapse
    assert err <= 1.25 * rel_error(t, ref.codebook[ref.indices]) + 1e-6
    assert err < 0.7


@pytest.mark.parametrize("kind", ["tiny-range", "decades", "denormal", "huge"])
def test_cells_fit_int64_at_the_finest_step(kind):
    sw = sort_weights(rows()[kind], None)
    for step in (finest_step(sw), 4 * finest_step(sw)):
        cells, thresholds = occupied_cells(sw, step)
        assert cells.dtype == np.int64 and np.all(np.diff(cells) > 0)
        assert np.max(np.abs(cells)) < 2**53
        assert np.all(np.diff(thresholds.astype(np.float64)) > 0)


def test_the_issues_row_keeps_its_largest_weights_apart():
    """Before, the step search went down to 1e-33 and cells overflowed: 9.7e-9 and 3.6e-9 merged."""
    w = rows()["decades"]
    for method in ("uniform", "ecsq"):
        q = quantize(w, method=method, target_bits=4.0)
        assert rel_error(w, q.codebook[q.indices]) < 1e-3


def test_a_weight_just_below_its_cell_edge_stays_in_its_cell():
    # (c + 0.5) * step lies 1e-12 above v, so rounded to float32 it would be v itself: v would
    # leave its cell, emptying it, and join the next occupied one, 0.09
    v, c = np.float32(0.0495), 1000
    step = float(v) / (c + 0.5) * (1 + 1e-12)
    sw = sort_weights(np.array([v, 0.09], np.float32), None)
    cells, thresholds = occupied_cells(sw, step)
    assert cells[0] == c and cells.size == 2
    assert v < thresholds[0] <= np.nextafter(v, np.float32(1))


def test_rows_of_denormals_and_small_weights_keep_every_weight_near_its_value():
    """Rows like a real recognizer's: half normal weights, half down to 1e-41 (float32 denormal).

    The finest grids these rows reach put edges within an ulp of weights; edges rounded to
    nearest used to merge such a weight with a distant cell (relative errors up to 0.16).
    """
    rng = np.random.default_rng(0)
    for _ in range(40):
        tiny = rng.choice([-1, 1], 30) * 10.0 ** -rng.uniform(17, 41, 30)
        row = np.concatenate([rng.normal(scale=0.01, size=30), tiny]).astype(np.float32)
        q = quantize(row, method="uniform", target_bits=4.0)
        assert rel_error(row, q.codebook[q.indices]) < 1e-6


def test_a_rate_search_stops_at_its_lowest_knob():
    calls = []

    def fit(x):
        calls.append(x)
        return min(3.0, -math.log2(x)), x  # the rate saturates at 3 bits below x = 1/8

    assert search_falling(fit, 5.0, 1.0, lowest_x=1e-6) == 1e-6
    assert min(calls) == 1e-6 and len(calls) < 15


@pytest.mark.parametrize("method", METHODS)
def test_channel_groups_of_one_row_each_take_extreme_rows(method):
    kinds = ["tiny-range", "decades", "denormal", "constant", "near-constant"]
    table = rows()
    w = np.stack([gauss(seed=3).astype(np.float32)] + [table[k] for k in kinds])
    rate = RATES[method]
    qw = quantize_weights({"w": w}, scope="channel-group", group_size=1, method=method, **rate)
    out = qw.dequantize("w")
    normal = rel_error(w[0], out[0])
    for i, kind in enumerate(kinds, start=1):
        err = rel_error(w[i], out[i])
        if kind == "constant":
            assert err == 0.0
        elif kind == "near-constant":
            assert err < 1e-6
        else:
            assert err <= 1.25 * normal, kind  # comparable to a normal row at the same rate
    assert qw.errors["w"] == tensor_error(w, out)


@pytest.mark.parametrize("scope", ["network", "layer"])
@pytest.mark.parametrize("method", METHODS)
def test_extreme_tensors_at_network_and_layer_scope(scope, method):
    table = rows()
    weights = {k: table[k] for k in ("tiny-range", "decades", "denormal", "constant", "huge")}
    weights["normal"] = gauss(seed=4).astype(np.float32)
    qw = quantize_weights(weights, scope=scope, method=method, **RATES[method])
    for name, w in weights.items():
        err = qw.errors[name]
        assert err == tensor_error(w, qw.dequantize(name))
        assert err.rel_error < 0.7, name
    assert qw.errors["constant"] == TensorError(0.0, math.inf)


def test_errors_are_relative_error_and_sqnr():
    w = np.array([3.0, 4.0], np.float32)
    e = tensor_error(w, np.array([3.0, 3.0], np.float32))
    assert e.rel_error == pytest.approx(0.2) and e.sqnr_db == pytest.approx(20 * math.log10(5.0))
    assert tensor_error(w, w) == TensorError(0.0, math.inf)
    assert tensor_error(np.zeros(3), np.ones(3)) == TensorError(math.inf, -math.inf)
    denormal = np.ldexp(w, -140)  # exact: 3 and 4 need few bits
    assert tensor_error(
        denormal, np.ldexp(np.float32([3.0, 3.0]), -140)
    ).rel_error == pytest.approx(0.2)
    big = np.array([3e300, 4e300])
    assert tensor_error(big, big * 0.5).rel_error == pytest.approx(0.5)


def test_measure_errors_follows_changed_codebooks():
    weights = {"a": gauss(seed=5).astype(np.float32)}
    qw = quantize_weights(weights, method="uniform", k=4)
    assert measure_errors(weights, qw) == qw.errors
    moved = QuantizedWeights({"shared": qw.codebooks["shared"] * 2}, qw.tensors)
    assert measure_errors(weights, moved)["a"].rel_error > qw.errors["a"].rel_error


def small_in_big():
    """A tensor whose range is a thousandth of the other's: one network grid has no room for it."""
    return {
        "big": gauss(4000, seed=6).astype(np.float32),
        "small": (1e-3 * gauss(300, seed=7)).astype(np.float32),
    }


def test_a_tiny_range_tensor_gets_its_own_codebook_by_default(caplog):
    weights = small_in_big()
    with caplog.at_level(logging.WARNING, logger="onnxhq.quantize"):
        qw = quantize_weights(weights, method="uniform", target_bits=4.0)
    layer = quantize_weights(weights, scope="layer", method="uniform", target_bits=4.0)
    assert qw.guarded == ("small",) and qw.flagged == ()
    assert set(qw.codebooks) == {"shared", "small"} and qw.tensors["small"].codebook == "small"
    np.testing.assert_array_equal(qw.dequantize("small"), layer.dequantize("small"))
    assert qw.errors["small"] == layer.errors["small"] and qw.errors["small"].rel_error < 0.1
    assert "in a codebook of their own, and now have one: small (" in caplog.text


def test_warn_flags_and_off_leaves_the_network_codebook_alone(caplog):
    weights = small_in_big()
    with caplog.at_level(logging.WARNING, logger="onnxhq.quantize"):
        warned = quantize_weights(weights, method="uniform", target_bits=4.0, guard="warn")
    assert warned.flagged == ("small",) and warned.guarded == ()
    assert warned.errors["small"].rel_error > 0.5 and "(left as they are): small (" in caplog.text
    off = quantize_weights(weights, method="uniform", target_bits=4.0, guard="off")
    assert off.flagged == off.guarded == () and set(off.codebooks) == {"shared"}
    flat = np.concatenate([weights["big"], weights["small"]])
    alone = quantize(flat, method="uniform", target_bits=4.0)
    np.testing.assert_array_equal(off.codebooks["shared"], alone.codebook.astype(np.float32))
    for name in weights:
        np.testing.assert_array_equal(off.dequantize(name), warned.dequantize(name))


def test_a_tensor_named_shared_cannot_leave_the_shared_codebook():
    weights = small_in_big()
    weights["shared"] = weights.pop("small")
    qw = quantize_weights(weights, method="uniform", target_bits=4.0)
    assert qw.flagged == ("shared",) and qw.guarded == () and set(qw.codebooks) == {"shared"}
    per_group = quantize_weights(
        weights, scope="channel-group", group_size=1, method="uniform", target_bits=4.0
    )
    assert per_group.flagged == per_group.guarded == ()


@pytest.mark.parametrize(
    "method,rate",
    [
        ("ecsq", {"target_bits": 2.0}),
        ("ecsq", {"lam": 1e-3}),
        ("hkmeans", {"k": 8}),
        ("uniform", {"target_bits": 3.0}),
    ],
)
def test_a_tensor_with_vanishing_importances_keeps_a_bounded_error(method, rate):
    weights = {
        "a": gauss(3000, seed=8).astype(np.float32),
        "b": (0.05 * gauss(1000, seed=9)).astype(np.float32),
    }
    importances = {"a": np.ones(3000, np.float32), "b": np.full(1000, 1e-12, np.float32)}
    off = quantize_weights(weights, importances, method=method, guard="off", **rate)
    qw = quantize_weights(weights, importances, method=method, **rate)
    assert off.errors["b"].rel_error > 0.9  # the shared codebook wrecks b ...
    assert qw.guarded == ("b",) and qw.flagged == ()  # ... so by default b gets its own
    assert qw.errors["b"].rel_error < 0.4


def test_importances_are_floored_relative_to_their_own_tensor():
    """Scaling one tensor's importances (zeros included) changes nothing: the floor scales along."""
    w = gauss(500, seed=10).astype(np.float32)
    h = np.random.default_rng(11).lognormal(size=500).astype(np.float32)
    h[:100] = 0.0
    a = quantize_weights({"w": w}, {"w": h}, scope="layer", method="ecsq", target_bits=2.0)
    b = quantize_weights(
        {"w": w}, {"w": h * np.float32(2.0**-40)}, scope="layer", method="ecsq", target_bits=2.0
    )
    np.testing.assert_array_equal(a.dequantize("w"), b.dequantize("w"))
    floored = np.maximum(h, np.float32(1e-6 * h.mean(dtype=np.float64)))
    c = quantize_weights({"w": w}, {"w": floored}, scope="layer", method="ecsq", target_bits=2.0)
    np.testing.assert_array_equal(a.dequantize("w"), c.dequantize("w"))


def test_a_wrecked_channel_group_tensor_falls_back_to_its_layer_codebook(monkeypatch):
    import onnxhq.quantize.scope as scope_mod

    def wrecked(name, w, h, p, group_size, task, notes):  # every row collapsed to one value
        rows = -(-w.shape[0] // group_size)
        return np.zeros((rows, 1), np.float32), np.zeros(w.shape, np.int32)

    weights = {
        "w": gauss(400, seed=12).astype(np.float32).reshape(10, 40),
        "v": gauss(400, seed=13).astype(np.float32).reshape(10, 40),
    }
    layer = quantize_weights(weights, scope="layer", method="hkmeans", k=8)
    monkeypatch.setattr(scope_mod, "_groups", wrecked)
    qw = quantize_weights(weights, scope="channel-group", group_size=1, method="hkmeans", k=8)
    assert qw.guarded == ("v", "w")
    for name in weights:
        assert qw.tensors[name].group_size is None and qw.codebooks[name].shape == (8,)
        np.testing.assert_array_equal(qw.dequantize(name), layer.dequantize(name))


def test_unknown_guard_raises():
    with pytest.raises(ConfigError, match="unknown guard 'always'; choose one of requantize, warn"):
        quantize_weights({"w": np.arange(4.0)}, method="uniform", k=2, guard="always")
    assert GUARDS == ("requantize", "warn", "off")


REAL = Path(os.environ.get("ONNXHQ_SHARED", Path(__file__).parents[2] / "shared")) / "models/real"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uniform", "ecsq"])
def test_the_recognizers_row_of_denormals_at_channel_group_scope(method):
    """The issue's case: PP-OCRv4's ``conv2d_107.w_0`` with one codebook per output channel.

    148 of its 240 channels collapsed to two values (relative error 0.86) and cells overflowed.
    """
    path = REAL / "ch_PP-OCRv4_rec_infer.onnx"
    if not path.exists():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    node = next(
        n for n in graph.node if n.op_type == "Constant" and n.output[0] == "conv2d_107.w_0"
    )
    w = numpy_helper.to_array(node.attribute[0].t)
    qw = quantize_weights(
        {"w": w}, scope="channel-group", group_size=1, method=method, target_bits=4.0
    )
    out = qw.dequantize("w")
    worst = max(rel_error(w[i], out[i]) for i in range(w.shape[0]))
    assert worst < 1e-3 and qw.errors["w"].rel_error < 1e-3 and qw.guarded == ()


@pytest.mark.slow
@pytest.mark.parametrize("method,rate", [("uniform", {"target_bits": 4.0}), ("kmeans", {"k": 16})])
def test_one_network_codebook_for_the_recognizer_wrecks_no_layer(method, rate):
    """The issue's case: one codebook for PP-OCRv4's recognizer left its squeeze-excitation
    layers at 0.7-1.3 bits per weight (and the model at 0 % identical strings)."""
    path = REAL / "ch_PP-OCRv4_rec_infer.onnx"
    if not path.exists():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"}
    names = {
        n.input[1] for n in graph.node if n.op_type in ("Conv", "MatMul") and n.input[1] in consts
    }
    weights = {name: numpy_helper.to_array(consts[name]) for name in sorted(names)}
    weights = {name: w for name, w in weights.items() if w.dtype == np.float32 and w.size >= 16}
    shared = quantize_weights(weights, method=method, guard="warn", **rate)
    assert min(e.sqnr_db for e in shared.errors.values()) < 10.0 and shared.flagged
    qw = quantize_weights(weights, method=method, **rate)
    assert qw.flagged == () and qw.guarded == shared.flagged
    assert min(e.sqnr_db for e in qw.errors.values()) >= 10.0
