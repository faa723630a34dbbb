"""tools.reproduce_table's polish runs on the library's resumable training: killed after a
checkpoint, a rerun ends where an uninterrupted polish ends, bit for bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import tools.reproduce_table as table
from onnxhq.model import quantizable_weights, read_initializers
from tools.table_nets import smoke_net


class Killed(Exception):
    pass


def polished(tmp_path, *, kill_after: int | None, monkeypatch) -> tuple[dict, int]:
    """The polished weights, and the steps the last polish call took (killed after
    ``kill_after`` chunks of one step, then run again, if given)."""
    net = replace(smoke_net(), polish_epochs=1.5, polish_chunk=0.5, augment=None)
    train, test = net.train(), net.test()
    train, test = train.subset(np.arange(128)), test.subset(np.arange(32))  # 2 steps an epoch
    cache = table.Cache("lenet5", tmp_path)
    if kill_after is not None:
        real, calls = table.train_steps, []

        def dying(*args, **kwargs):
            if len(calls) == kill_after:
                raise Killed
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(table, "train_steps", dying)
        with pytest.raises(Killed):
            table.polish(net, cache, net.model(), train, test)
        monkeypatch.setattr(table, "train_steps", real)
        assert (cache.dir / "polish_run.npz").is_file()
    real, taken = table.train_steps, []

    def counted(engine, inputs, labels, run, **kwargs):
        after = real(engine, inputs, labels, run, **kwargs)
        taken.append(after.done - run.done)
        return after

    monkeypatch.setattr(table, "train_steps", counted)
    model = table.polish(net, cache, net.model(), train, test)
    return read_initializers(model, [w.name for w in quantizable_weights(model)]), sum(taken)


def test_a_killed_polish_resumes_to_the_same_weights(tmp_path, monkeypatch, bundled_model):
    whole, steps = polished(tmp_path / "whole", kill_after=None, monkeypatch=monkeypatch)
    resumed, rest = polished(tmp_path / "resumed", kill_after=1, monkeypatch=monkeypatch)
    assert (steps, rest) == (3, 2)  # the rerun takes only the steps left
    assert whole.keys() == resumed.keys()
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_compensated_rows_pair_the_curve_points_and_resume(tmp_path, monkeypatch, bundled_model):
    """The compensate stage runs every curve rate with and without --compensate (same rate and
    scope), the report pairs them row by row, and a rerun computes nothing."""
    import tools.table_compensate as comp
    from tools.table_report import compensation_rows

    net = smoke_net()
    train, test = net.train(), net.test()
    calib, test = train.subset(np.arange(64)), test.subset(np.arange(200))
    cache = table.Cache("lenet5", tmp_path)
    models, diags = {"dense": net.model()}, {"dense": {}}
    data = (calib, test)
    comp.compensate_stage(net, cache, models, diags, data, ["k-means"], "layer", lambda _: None)
    rates = [f"{r[0]}={r[1]}" for r in net.rates("k-means", "dense")]
    for rate in rates:
        plain = cache.get(f"curve/dense@layer/k-means/{rate}")
        compensated = cache.get(f"compensated/dense@layer/k-means/{rate}")
        assert (plain["compensate"], compensated["compensate"]) == (False, True)
        assert 0 <= compensated["accuracy"] <= 1 and compensated["ratio"] > 1
    rows = compensation_rows(cache)
    assert [r.split(" | ")[2] for r in rows[2:]] == rates  # one row per rate, in rate order
    assert all(r.count("%") == 2 for r in rows[2:])  # both accuracies on each row

    def fail(*args, **kwargs):
        raise AssertionError("a cached point was computed again")

    monkeypatch.setattr(comp, "point", fail)
    monkeypatch.setattr(comp, "layer_statistics", fail)
    comp.compensate_stage(net, cache, models, diags, data, ["k-means"], "layer", lambda _: None)


def test_layer_statistics_round_trip(tmp_path, bundled_model):
    """save_layers / load_layers give back every field of each LayerHessian exactly."""
    from onnxhq.importances import quantized_names
    from onnxhq.layer_inputs import layer_hessians
    from onnxhq.model import load_model
    from tools.table_compensate import load_layers, save_layers

    model = load_model(bundled_model)
    names = quantized_names(model, include_biases=True)
    layers = layer_hessians(model, smoke_net().train().inputs, names, samples=16)
    assert layers and all(lh.mean is not None for lh in layers.values())
    save_layers(tmp_path / "layers.npz", layers)
    back = load_layers(tmp_path / "layers.npz")
    assert back.keys() == layers.keys()
    for name, lh in layers.items():
        got = back[name]
        assert (got.transpose, got.groups, got.samples) == (lh.transpose, lh.groups, lh.samples)
        assert len(got.blocks) == len(lh.blocks)
        for a, b in zip(got.blocks, lh.blocks):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got.mean, lh.mean)
