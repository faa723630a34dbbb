"""Training: Adam lowers the loss and keeps masked weights at zero, the cosine schedule has its
ends, and a run stopped, saved and resumed equals the uninterrupted run bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from onnxhq.errors import ConfigError, DataError
from onnxhq.training.engine import GradientEngine
from onnxhq.training.train import (
    adam_init,
    adam_step,
    cosine_lr,
    load_checkpoint,
    save_checkpoint,
    start_training,
    train,
    train_steps,
)


def test_adam_training_lowers_the_loss(convnet, convnet_inputs):
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    before, _ = engine.loss_and_gradients({"input": x}, y)
    params, state = train(engine, {"input": x}, y, epochs=60, batch_size=8, lr=0.02)
    after, _ = engine.loss_and_gradients({"input": x}, y, params)
    assert after < 0.5 * before
    assert state.step == 60
    v = state.second_moment()
    assert all(np.all(v[k] >= 0) and v[k].shape == params[k].shape for k in params)


def test_adam_masks_hold_pruned_weights_at_zero():
    params = {"w": np.ones((3, 3), np.float32)}
    mask = {"w": np.eye(3, dtype=bool)}
    grads = {"w": np.ones((3, 3), np.float32)}
    new, _ = adam_step(params, grads, adam_init(params), lr=0.1, masks=mask)
    assert np.all(new["w"][~mask["w"]] == 0) and np.all(new["w"][mask["w"]] != 0)
    assert np.all(params["w"] == 1)  # inputs are not mutated


def test_cosine_schedule_starts_at_the_base_and_ends_at_the_floor():
    rate = cosine_lr(0.2, floor=0.05)
    assert rate(0.0) == pytest.approx(0.2)
    assert rate(0.5) == pytest.approx(0.2 * (0.05 + 0.95 * 0.5))
    assert rate(1.0) == pytest.approx(0.2 * 0.05)
    assert cosine_lr(1e-3)(1.0) == pytest.approx(1e-5)  # default floor 1%
    with pytest.raises(ConfigError, match="learning rate 0 must be a positive number"):
        cosine_lr(0)


def shift(feed, rng):
    """An augmentation that draws from the run's generator, so resuming must restore it."""
    return {
        "input": feed["input"] + rng.normal(0, 0.1, size=feed["input"].shape).astype(np.float32)
    }


def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(convnet, tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 20)
    engine = GradientEngine(convnet)
    masks = {"fc.weight": rng.random((4, 48)) > 0.3}
    kwargs = dict(lr=cosine_lr(0.01), masks=masks, augment=shift)
    # 20 samples in batches of 6: 3 steps an epoch, passes straddle the chunk boundary
    start = start_training(engine.values, 20, epochs=4, batch_size=6, seed=7, masks=masks)
    whole = train_steps(engine, {"input": x}, y, start, **kwargs)
    assert whole.done == whole.total == 12 and whole.finished

    first = train_steps(engine, {"input": x}, y, start, steps=5, **kwargs)
    assert first.done == 5 and not first.finished
    save_checkpoint(tmp_path / "run.npz", first)
    resumed = load_checkpoint(tmp_path / "run.npz")
    rest = train_steps(engine, {"input": x}, y, resumed, steps=100, **kwargs)

    assert rest.done == 12 and rest.adam.step == whole.adam.step == 12
    for name in whole.params:
        np.testing.assert_array_equal(rest.params[name], whole.params[name])
        np.testing.assert_array_equal(rest.adam.m[name], whole.adam.m[name])
        np.testing.assert_array_equal(rest.adam.v[name], whole.adam.v[name])
    assert rest.rng == whole.rng
    np.testing.assert_array_equal(rest.order, whole.order)
    assert np.all(rest.params["fc.weight"][~masks["fc.weight"]] == 0)


def test_train_is_one_whole_run_and_sets_the_engine_values(convnet, convnet_inputs):
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    run = train_steps(
        engine,
        {"input": x},
        y,
        start_training(engine.values, 8, epochs=3, batch_size=4, seed=2),
        lr=0.01,
    )
    params, state = train(engine, {"input": x}, y, epochs=3, batch_size=4, lr=0.01, seed=2)
    for name in params:
        np.testing.assert_array_equal(params[name], run.params[name])
        np.testing.assert_array_equal(engine.values[name], run.params[name])
    assert state.step == run.adam.step == 6


def test_a_checkpoint_round_trips_exactly(convnet, tmp_path):
    engine = GradientEngine(convnet)
    state = start_training(engine.values, 10, epochs=2, batch_size=3, seed=11)
    save_checkpoint(tmp_path / "c.npz", state)
    back = load_checkpoint(tmp_path / "c.npz")
    assert (back.done, back.total, back.samples, back.batch_size) == (0, 6, 10, 3)
    assert back.rng == state.rng and back.adam.step == 0
    for name, value in state.params.items():
        assert back.params[name].dtype == value.dtype
        np.testing.assert_array_equal(back.params[name], value)


def test_bad_checkpoints_and_mismatched_data_are_refused(convnet, convnet_inputs, tmp_path):
    np.savez(tmp_path / "junk.npz", done=np.int64(1))
    with pytest.raises(DataError, match=r"junk\.npz has no entry 'total'"):
        load_checkpoint(tmp_path / "junk.npz")
    x, y = convnet_inputs
    engine = GradientEngine(convnet)
    state = start_training(engine.values, 16, epochs=1, batch_size=4)
    with pytest.raises(ConfigError, match="started for 16 samples but the data has 8"):
        train_steps(engine, {"input": x}, y, state)
    with pytest.raises(ConfigError, match="steps=-1 must be a nonnegative integer"):
        train_steps(engine, {"input": x}, y, start_training(engine.values, 8, epochs=1), steps=-1)
