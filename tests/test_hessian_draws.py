"""The samples an estimator draws depend only on ``samples``, ``seed`` and the data size, so a
data file is read only where the draws fall, with the same estimate as from all the data."""

from __future__ import annotations

import numpy as np
import pytest
from training_support import needs_training

import onnxhq.npz
from onnxhq.data import load_data
from onnxhq.hessian import Draws
from onnxhq.importances import estimate_hessian
from onnxhq.model import load_model


def test_the_draws_read_each_drawn_sample_once_in_file_order():
    draws = Draws(samples=250, batch_size=7, seed=3)
    order = draws.order(100)  # three passes over 100 samples, the last one partial
    assert len(order) == 250
    assert all(sorted(order[i : i + 100]) == list(range(100)) for i in (0, 100))
    assert list(draws.rows(100)) == list(range(100))
    few = Draws(samples=30, seed=3)
    assert list(few.rows(100)) == sorted(few.order(100)) and len(set(few.order(100))) == 30
    assert np.array_equal(Draws(samples=30, batch_size=1, seed=3).order(100), few.order(100))


@pytest.mark.parametrize(
    "method",
    [
        "activations",
        pytest.param("fisher", marks=needs_training),
        pytest.param("gauss-newton", marks=needs_training),
        pytest.param("hutchinson", marks=needs_training),
    ],
)
def test_an_estimate_from_a_file_reads_only_the_samples_it_draws(
    method, bundled_model, bundled_sample, monkeypatch
):
    """2,000 MNIST images (6.3 MB) under a 2 MB memory cap: 300 drawn samples read, and the
    estimate is the one from all the data in memory."""
    proto = load_model(bundled_model)
    everything = load_data(bundled_sample, proto)
    expected = estimate_hessian(proto, everything, method=method, samples=300, seed=5)
    read: list[int] = []
    real = onnxhq.npz._read_rows
    monkeypatch.setattr(onnxhq.npz, "available_memory", lambda: 2 * 2**20)
    monkeypatch.setattr(
        onnxhq.npz, "_read_rows", lambda f, take, *a: read.append(len(take)) or real(f, take, *a)
    )
    got = estimate_hessian(proto, bundled_sample, method=method, samples=300, seed=5)
    assert read and max(read) == len(Draws(300, seed=5).rows(len(everything))) == 300
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])


def test_a_few_draws_from_huge_data_need_memory_for_them_alone():
    """2^26 samples: no 512 MiB permutation of them for 1,000 draws."""
    import tracemalloc

    tracemalloc.start()
    try:
        rows = Draws(samples=1000, seed=1).rows(2**26)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 1000 and rows[0] >= 0 and rows[-1] < 2**26
    assert peak < 2**20, f"{peak / 2**20:.0f} MiB"
