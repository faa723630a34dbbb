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
