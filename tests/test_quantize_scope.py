"""`quantize_weights`: scopes, dequantize round trips, pruning, order independence, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnxhq.errors import ConfigError, DataError
from onnxhq.quantize import (
    SCOPES,
    QuantizedWeights,
    TensorCodes,
    coded_bits,
    quantize,
    quantize_weights,
)

GROUPS = {"network": None, "layer": None, "channel-group": 3}
#: The scopes every method and rate takes ("allocated" is uniform at target_bits only: its own
#: tests are in test_search_allocate.py).
ANY_RATE_SCOPES = tuple(s for s in SCOPES if s != "allocated")


def model(seed=0):
    rng = np.random.default_rng(seed)
    weights = {
        "conv.weight": rng.laplace(scale=0.2, size=(8, 3, 3, 3)).astype(np.float32),
        "fc.weight": rng.laplace(scale=0.05, size=(10, 64)).astype(np.float32),
        "fc.bias": rng.normal(scale=0.1, size=10).astype(np.float32),
    }
    importances = {n: rng.lognormal(size=w.shape).astype(np.float32) for n, w in weights.items()}
    pruned = {"fc.weight": rng.random((10, 64)) < 0.7}
    weights["fc.weight"][pruned["fc.weight"]] = 0.0
    return weights, importances, pruned


@pytest.mark.parametrize("scope", ANY_RATE_SCOPES)
@pytest.mark.parametrize(
    "method,rate",
    [
        ("hkmeans", {"k": 8}),
        ("uniform", {"bits": 3}),
        ("ecsq", {"target_bits": 2.0}),
        ("kmeans", {"k": 4}),
    ],
)
def test_each_scope_round_trips_through_dequantize(scope, method, rate):
    weights, importances, pruned = model()
    qw = quantize_weights(
        weights,
        importances,
        scope=scope,
        group_size=GROUPS[scope],
        method=method,
        pruned=pruned,
        **rate,
    )
    assert set(qw.tensors) == set(weights)
    out = qw.dequantize_all()
    for name, w in weights.items():
        codes = qw.tensors[name]
        assert codes.indices.dtype == np.int32 and codes.indices.shape == w.shape
        assert out[name].dtype == np.float32 and out[name].shape == w.shape
        book = qw.codebooks[codes.codebook]
        assert book.dtype == np.float32
        if name in qw.guarded:  # the guard gave it a codebook of its own: as at layer scope
            assert codes.codebook == name and codes.group_size is None
        if scope == "channel-group" and name not in qw.guarded:
            assert codes.group_size == 3 and book.shape[0] == -(-w.shape[0] // 3)
            rows = np.arange(w.shape[0]) // 3
            expected = book[rows.reshape((-1,) + (1,) * (w.ndim - 1)), codes.indices]
        else:
            assert codes.group_size is None and book.ndim == 1
            expected = book[codes.indices]
        np.testing.assert_array_equal(out[name], expected)
        if "k" in rate or "bits" in rate:
            assert book.shape[-1] <= rate.get("k", 2 ** rate.get("bits", 0))
    assert np.all(out["fc.weight"][pruned["fc.weight"]] == 0.0)
    keys = {"network": {"shared"}, "layer": set(weights), "channel-group": set(weights)}[scope]
    assert set(qw.codebooks) == keys | set(qw.guarded) and qw.flagged == ()


def test_network_scope_is_quantize_on_the_concatenation():
    weights, importances, pruned = model(1)
    names = sorted(weights)
    qw = quantize_weights(weights, importances, method="hkmeans", k=16, pruned=pruned, guard="off")
    flat = quantize(
        np.concatenate([weights[n].ravel() for n in names]),
        np.concatenate([importances[n].ravel() for n in names]),
        method="hkmeans",
        k=16,
        pruned=np.concatenate(
            [pruned.get(n, np.zeros(weights[n].shape, bool)).ravel() for n in names]
        ),
    )
    np.testing.assert_array_equal(qw.codebooks["shared"], flat.codebook.astype(np.float32))
    np.testing.assert_array_equal(
        np.concatenate([qw.tensors[n].indices.ravel() for n in names]), flat.indices
    )
    # The guard leaves the shared codebook and the other tensors' indices as they were.
    guarded = quantize_weights(weights, importances, method="hkmeans", k=16, pruned=pruned)
    np.testing.assert_array_equal(guarded.codebooks["shared"], qw.codebooks["shared"])
    for n in names:
        if n not in guarded.guarded:
            np.testing.assert_array_equal(guarded.tensors[n].indices, qw.tensors[n].indices)


def test_layer_scope_is_quantize_per_tensor():
    weights, importances, _ = model(2)
    qw = quantize_weights(weights, importances, scope="layer", method="uniform", k=6)
    for name, w in weights.items():
        alone = quantize(w.ravel(), importances[name].ravel(), method="uniform", k=6)
        np.testing.assert_array_equal(qw.tensors[name].indices.ravel(), alone.indices)


@pytest.mark.parametrize("scope", ANY_RATE_SCOPES)
def test_result_does_not_depend_on_the_mappings_order(scope):
    weights, importances, _pruned = model(3)
    flipped = dict(reversed(list(weights.items())))
    a = quantize_weights(
        weights, importances, scope=scope, group_size=GROUPS[scope], method="hkmeans", k=8
    )
    b = quantize_weights(
        flipped,
        dict(reversed(list(importances.items()))),
        scope=scope,
        group_size=GROUPS[scope],
        method="hkmeans",
        k=8,
    )
    for name in weights:
        np.testing.assert_array_equal(a.dequantize(name), b.dequantize(name))


def test_channel_groups_pad_short_rows_with_their_last_value():
    w = np.array([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 6.0]], np.float32)
    qw = quantize_weights({"w": w}, scope="channel-group", group_size=1, method="hkmeans", k=4)
    book = qw.codebooks["w"]
    assert book.shape == (2, 4)
    np.testing.assert_array_equal(book[1], [5.0, 6.0, 6.0, 6.0])
    np.testing.assert_array_equal(qw.dequantize("w"), w)


def test_more_codewords_than_distinct_weights_keep_them_all_with_one_warning(caplog):
    weights = {
        "a": np.array([1.0, 2.0, 2.0], np.float32),
        "b": np.linspace(-1, 1, 50, dtype=np.float32),
    }
    with caplog.at_level(logging.WARNING, logger="onnxhq.quantize"):
        qw = quantize_weights(weights, scope="layer", method="hkmeans", k=4)
    np.testing.assert_array_equal(qw.dequantize("a"), weights["a"])
    assert qw.codebooks["b"].size == 4
    assert caplog.text.count("keep them all") == 1 and "1 of 2 codebooks" in caplog.text


def test_all_zero_importances_fall_back_to_unit_ones_with_a_warning(caplog):
    weights, importances, _ = model(4)
    importances["fc.bias"] = np.zeros_like(importances["fc.bias"])
    with caplog.at_level(logging.WARNING, logger="onnxhq.quantize"):
        qw = quantize_weights(weights, importances, scope="layer", method="hkmeans", k=4)
    alone = quantize(weights["fc.bias"], method="hkmeans", k=4)
    np.testing.assert_array_equal(qw.tensors["fc.bias"].indices, alone.indices)
    assert "all-zero importances" in caplog.text


def test_coded_bits_counts_indices_and_codebook_values():
    weights, importances, _ = model(5)
    shared = quantize_weights(weights, importances, method="hkmeans", k=8, guard="off")
    n = sum(w.size for w in weights.values())
    book = shared.codebooks["shared"]
    idx = np.concatenate([c.indices.ravel() for c in shared.tensors.values()])
    p = np.bincount(idx) / n
    p = p[p > 0]
    assert coded_bits(shared) == pytest.approx(-n * np.sum(p * np.log2(p)) + 32 * book.size)
    per_group = quantize_weights(
        weights, importances, scope="channel-group", group_size=1, method="hkmeans", k=8
    )
    assert coded_bits(per_group) > coded_bits(shared)  # many small codebooks cost their values


def test_results_are_frozen_dataclasses():
    qw = quantize_weights({"w": np.arange(6, dtype=np.float32)}, method="uniform", k=2)
    assert isinstance(qw, QuantizedWeights) and isinstance(qw.tensors["w"], TensorCodes)
    with pytest.raises(AttributeError):
        qw.codebooks = {}


U2 = {"method": "uniform", "k": 2}


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({**U2, "scope": "block"}, ConfigError, "unknown scope 'block'"),
        ({**U2, "scope": "channel-group"}, ConfigError, "needs group_size >= 1"),
        ({**U2, "scope": "channel-group", "group_size": 0}, ConfigError, "needs group_size >= 1"),
        (
            {**U2, "scope": "layer", "group_size": 4},
            ConfigError,
            "group_size=4 applies to scope 'channel-group' only",
        ),
        ({"method": "hkmeans"}, ConfigError, "exactly one of"),
        (
            {**U2, "importances": {"a": np.ones(3)}},
            DataError,
            "importances have no entry for weight 'b'",
        ),
        (
            {**U2, "importances": {"a": np.ones(4), "b": np.ones(2)}},
            DataError,
            r"importances of 'a' have shape \(4,\)",
        ),
        ({**U2, "pruned": {"c": np.zeros(3, bool)}}, DataError, "pruned mask given for 'c'"),
        ({**U2, "pruned": {"a": np.zeros(3, int)}}, DataError, "pruned mask of 'a' must be bool"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    weights = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([4.0, 5.0])}
    kwargs = dict(kwargs)
    importances = kwargs.pop("importances", None)
    with pytest.raises(error, match=match):
        quantize_weights(weights, importances, **kwargs)


def test_unknown_tensor_name_on_dequantize():
    qw = quantize_weights({"w": np.arange(4.0)}, method="uniform", k=2)
    with pytest.raises(ConfigError, match="no quantized tensor named 'v'"):
        qw.dequantize("v")
