"""Scope ``allocated``: per-tensor grids whose steps follow one Hessian-weighted slope, and the
target search that tries it. Tensors are random arrays; the model is the tests' small convnet."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_convnet

import onnxhq
from onnxhq.data import Dataset
from onnxhq.numeric import entropy_bits
from onnxhq.options import CompressOptions, OptionError
from onnxhq.quantize import coded_bits, quantize_weights
from onnxhq.quantize.allocate import STEP_RATIO
from onnxhq.streamed import streamable


def tensors(seed: int, scales=(1.0, 30.0, 1000.0), rows: int = 32) -> tuple[dict, dict]:
    """Weights of unlike spread and size, importances of unlike mean (``scales``)."""
    rng = np.random.default_rng(seed)
    w, h = {}, {}
    for i, s in enumerate(scales):
        shape = (rows * (i + 1), 24)
        w[f"t{i}"] = (rng.standard_t(5, size=shape) * 0.1 * (i + 1)).astype(np.float32)
        h[f"t{i}"] = (s * rng.gamma(2.0, 0.5, size=shape)).astype(np.float32)
    return w, h


def weighted_error(w, h, qw) -> float:
    total = 0.0
    for n in w:
        codes = qw.tensors[n]
        q = qw.codebooks[codes.codebook].reshape(-1)[codes.indices]
        total += float(np.sum(h[n] * (w[n].astype(np.float64) - q) ** 2))
    return total


def rate(w, qw) -> float:
    """Entropy of each tensor's indices, averaged over all weights (bits per weight)."""
    bits = sum(entropy_bits(np.bincount(qw.tensors[n].indices.ravel())) * w[n].size for n in w)
    return bits / sum(a.size for a in w.values())


def coded_rate(w, qw) -> float:
    """Bits per weight with the codebook values (32 bits each): what allocation budgets."""
    return coded_bits(qw) / sum(a.size for a in w.values())


def test_large_tensors_take_steps_of_one_constant_over_the_root_mean_importance():
    """Where codebook values cost next to nothing (large tensors, high rate) the choice is the
    high-rate optimum: every step ``c / sqrt(mean h)``, one ``c``, to the ladder's spacing."""
    w, h = tensors(0, scales=(1.0, 4.0, 16.0), rows=2000)
    qw = quantize_weights(w, h, scope="allocated", target_bits=5.0, cell_value="grid")
    steps = {n: float(np.min(np.diff(qw.codebooks[n]))) for n in w}  # grid points j * step
    slope = np.array([steps[n] * np.sqrt(np.mean(h[n], dtype=np.float64)) for n in w])
    assert slope.max() / slope.min() <= STEP_RATIO * (1 + 1e-6)
    assert steps["t2"] < steps["t1"] < steps["t0"]  # more important: finer


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [2.0, 4.0])
def test_allocation_beats_equal_rates_and_one_grid_at_the_same_rate(seed, bits):
    w, h = tensors(seed)
    allocated = quantize_weights(w, h, scope="allocated", target_bits=bits)
    layer = quantize_weights(w, h, scope="layer", target_bits=bits)
    network = quantize_weights(w, h, scope="network", target_bits=bits, guard="off")
    # at most the target over all weights, codebooks too; short of it by less than one tensor's
    # step on the ladder (1/4 bit on the largest tensor, half the weights)
    assert bits - 0.25 <= coded_rate(w, allocated) <= bits
    assert rate(w, layer) <= bits + 1e-9 and coded_rate(w, layer) > bits
    assert weighted_error(w, h, allocated) < weighted_error(w, h, layer)
    assert weighted_error(w, h, allocated) < weighted_error(w, h, network)
    assert len({rate({n: w[n]}, allocated) for n in w}) == len(w)  # the tensors' rates differ


def test_scaling_every_importance_changes_nothing():
    w, h = tensors(3)
    a = quantize_weights(w, h, scope="allocated", target_bits=3.0)
    b = quantize_weights(w, {n: 64.0 * v for n, v in h.items()}, scope="allocated", target_bits=3.0)
    for n in w:
        assert np.array_equal(a.tensors[n].indices, b.tensors[n].indices)
        assert np.allclose(a.codebooks[n], b.codebooks[n], rtol=1e-6)


def test_codes_round_trip_and_do_not_depend_on_the_mappings_order():
    w, h = tensors(6)
    a = quantize_weights(w, h, scope="allocated", target_bits=3.0)
    flip = dict(reversed(list(w.items())))
    b = quantize_weights(flip, dict(reversed(list(h.items()))), scope="allocated", target_bits=3.0)
    for n in w:
        q = a.dequantize(n)
        assert q.shape == w[n].shape and np.array_equal(q, b.dequantize(n))
        assert np.array_equal(q, a.codebooks[n][a.tensors[n].indices])


def test_pruned_weights_keep_zero_and_count_in_the_rate():
    w, h = tensors(4)
    w["t1"][:, :12] = 0.0
    pruned = {"t1": w["t1"] == 0}
    qw = quantize_weights(w, h, scope="allocated", target_bits=2.5, pruned=pruned)
    codes = qw.tensors["t1"]
    assert np.all(qw.codebooks["t1"][codes.indices[pruned["t1"]]] == 0.0)
    assert coded_rate(w, qw) <= 2.5


def test_without_importances_large_tensors_take_one_step():
    w, _ = tensors(5, rows=2000)
    qw = quantize_weights(w, None, scope="allocated", target_bits=4.0, cell_value="grid")
    steps = [float(np.min(np.diff(qw.codebooks[n]))) for n in w]
    assert max(steps) / min(steps) <= STEP_RATIO * (1 + 1e-6)


def test_a_small_tensor_pays_for_its_codebook():
    """Counting 32 bits per codebook value, a tiny tensor takes a coarser grid than the slope
    alone would give it: its codebook would cost more than its indices."""
    w, h = tensors(8, scales=(1.0, 1.0), rows=2000)
    w["tiny"], h["tiny"] = w["t0"][:4].copy(), h["t0"][:4].copy()  # 96 weights, same importance
    qw = quantize_weights(w, h, scope="allocated", target_bits=5.0)
    assert qw.codebooks["tiny"].size * 32 < 96 * 5.0  # its codebook: under 5 bits a weight
    assert qw.codebooks["tiny"].size < qw.codebooks["t0"].size / 4


@pytest.mark.parametrize("keywords", [{"method": "kmeans"}, {"k": 16}, {"method": "ecsq"}])
def test_allocated_takes_uniform_at_a_target_rate_only(keywords):
    with pytest.raises(OptionError, match=r"^scope 'allocated' sets each tensor's grid step"):
        CompressOptions.from_keywords(scope="allocated", **keywords)


def test_an_allocated_compression_runs_and_is_not_streamed():
    options = CompressOptions.from_keywords(scope="allocated", target_bits=3.0, hessian="none")
    assert not streamable(options)
    model = small_convnet()
    x = np.random.default_rng(0).normal(size=(40, 1, 6, 6)).astype(np.float32)
    result = onnxhq.compress(model, options=options, eval_data=Dataset({"input": x}))
    assert set(result.quantized.codebooks) == set(result.quantized.tensors)  # one per tensor
    assert result.report.settings["scope"] == "allocated"
    (metrics,) = result.report.fidelity.values()
    assert metrics["agreement"] > 0.5


def test_the_search_tries_allocated_for_uniform_only():
    rng = np.random.default_rng(3)
    data = Dataset({"input": rng.normal(size=(200, 1, 6, 6)).astype(np.float32)})
    uniform = onnxhq.compress(
        small_convnet(), data, eval_data=data, min_fidelity="agreement=0.9", hessian="none"
    )
    assert "allocated" in {p.scope for p in uniform.report.search}
    kmeans = onnxhq.compress(
        small_convnet(), data, eval_data=data, min_fidelity="agreement=0.9", method="kmeans"
    )
    assert "allocated" not in {p.scope for p in kmeans.report.search}


def test_a_far_more_important_tensor_gets_no_more_cells_than_a_codebook_holds():
    rng = np.random.default_rng(7)
    w = {"big": rng.normal(size=200_000).astype(np.float32), "small": rng.normal(size=999)}
    h = {"big": np.full(200_000, 1e8, np.float32), "small": np.ones(999)}
    qw = quantize_weights(w, h, scope="allocated", target_bits=16.0)
    assert qw.codebooks["big"].size <= 65_536 and qw.codebooks["small"].size > 1
