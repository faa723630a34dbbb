"""Pruning masks hit their sparsity exactly, rank by the right score, and retraining keeps zeros
at zero."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import small_convnet

from onnxhq.data import Dataset
from onnxhq.errors import ConfigError, DataError
from onnxhq.layerwise import LayerHessian
from onnxhq.model import read_initializers
from onnxhq.options import OptionError
from onnxhq.options.pruning import check_prune_options
from onnxhq.prune import (
    apply_masks,
    obs_prune,
    prune_masks,
    prune_model,
    sparsity_of,
    sparsity_schedule,
)
from onnxhq.training.engine import GradientEngine


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(0, 1.0, (6, 5)).astype(np.float32),
        "b": rng.normal(0, 0.1, (40,)).astype(np.float32),
    }


def test_global_magnitude_prunes_exactly_the_smallest():
    weights = random_weights()
    masks = prune_masks(weights, sparsity=0.5, criterion="magnitude")
    assert sparsity_of(masks) == pytest.approx(0.5)
    kept = np.concatenate([np.abs(weights[n][masks[n]]) for n in weights])
    dropped = np.concatenate([np.abs(weights[n][~masks[n]]) for n in weights])
    assert kept.min() >= dropped.max()
    assert (
        masks["b"].mean() < masks["a"].mean()
    )  # the small-scale layer loses more under one global threshold


def test_layer_scope_prunes_each_tensor_to_its_own_fraction():
    weights = random_weights()
    masks = prune_masks(weights, sparsity=0.3, scope="layer")
    assert (~masks["a"]).sum() == round(0.3 * 30) and (~masks["b"]).sum() == round(0.3 * 40)
    per_layer = prune_masks(weights, sparsity={"a": 0.5})
    assert (~per_layer["a"]).sum() == 15 and per_layer["b"].all()


def test_saliency_ranks_by_hessian_times_square():
    weights = {"w": np.array([1.0, -2.0, 0.5, 3.0], np.float32)}
    h = {"w": np.array([10.0, 0.1, 1.0, 0.01], np.float32)}  # saliencies 10, 0.4, 0.25, 0.09
    masks = prune_masks(weights, sparsity=0.5, criterion="saliency", importances=h)
    np.testing.assert_array_equal(masks["w"], [True, True, False, False])
    by_magnitude = prune_masks(weights, sparsity=0.5)
    np.testing.assert_array_equal(by_magnitude["w"], [False, True, False, True])


def test_unit_importances_equal_magnitude_and_scaling_changes_nothing():
    weights = random_weights(3)
    ones = {n: np.ones_like(w) for n, w in weights.items()}
    tens = {n: 10 * np.ones_like(w) for n, w in weights.items()}
    want = prune_masks(weights, sparsity=0.7)
    for imp in (ones, tens):
        got = prune_masks(weights, sparsity=0.7, criterion="saliency", importances=imp)
        for n in weights:
            np.testing.assert_array_equal(got[n], want[n])


def test_inputs_are_not_mutated_and_zeros_go_first():
    weights = random_weights()
    weights["a"][0, :3] = 0.0
    copies = {n: w.copy() for n, w in weights.items()}
    masks = prune_masks(weights, sparsity=0.05)
    for n in weights:
        np.testing.assert_array_equal(weights[n], copies[n])
    assert not masks["a"][0, :3].any()
    pruned = apply_masks(weights, masks)
    assert sum(int((w == 0).sum()) for w in pruned.values()) == round(0.05 * 70)


def test_masks_nest_when_pruning_further():
    weights = random_weights(5)
    first = prune_masks(weights, sparsity=0.4)
    second = prune_masks(apply_masks(weights, first), sparsity=0.8)
    for n in weights:
        assert not (second[n] & ~first[n]).any()


def test_cubic_schedule_ends_at_the_target():
    s = sparsity_schedule(0.9, 4)
    assert s[-1] == pytest.approx(0.9) and all(a < b for a, b in itertools.pairwise(s))
    assert s[0] > 0.9 / 4  # front-loaded
    assert sparsity_schedule(0.6, 1) == [0.6]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sparsity=1.0), OptionError, r"sparsity=1\.0 is outside \[0, 1\)"),
        (dict(sparsity=-0.1), OptionError, "outside"),
        (dict(sparsity={"a": 0.5, "b": 1}), OptionError, r"sparsity 1 of 'b' is outside \[0, 1\)"),
        (dict(sparsity={"nope": 0.5}), OptionError, "'nope'"),
        (dict(sparsity={"a": 0.5}, scope="global"), OptionError, "scope='layer'"),
        (dict(sparsity=0.5, scope="row"), OptionError, "'row'"),
        (dict(sparsity=0.5, criterion="random"), OptionError, "'random'"),
        (dict(sparsity=0.5, criterion="saliency"), ConfigError, "needs importances"),
        (
            dict(
                sparsity=0.5,
                criterion="saliency",
                importances={"a": np.ones((6, 5)), "b": np.ones(3)},
            ),
            DataError,
            r"'b' has shape \(3,\)",
        ),
        (
            dict(
                sparsity=0.5,
                criterion="saliency",
                importances={"a": -np.ones((6, 5)), "b": np.ones(40)},
            ),
            DataError,
            "nonnegative",
        ),
    ],
)
def test_bad_arguments_raise_named_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_masks(random_weights(), **kwargs)


@pytest.mark.parametrize(
    "keywords, message, field",
    [
        ({"sparsity": 1.5}, "sparsity=1.5 is outside [0, 1); it is the fraction of the weights set "
         "to zero", "sparsity"),
        ({"sparsity": float("nan")}, "sparsity=nan is outside [0, 1); it is the fraction of the "
         "weights set to zero", "sparsity"),
        ({"sparsity": True}, "sparsity=True is outside [0, 1); it is the fraction of the weights "
         "set to zero", "sparsity"),
        ({"criterion": "random"}, "unknown criterion='random'; choose one of magnitude, saliency, "
         "obs", "criterion"),
        ({"scope": "row"}, "unknown scope='row'; choose one of global, layer", "scope"),
        ({"steps": 0}, "steps=0 must be an integer >= 1", "steps"),
        ({"steps": 2.5}, "steps=2.5 must be an integer >= 1", "steps"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1", "batch_size"),
        ({"hessian_samples": -4}, "hessian_samples=-4 must be an integer >= 1", "hessian_samples"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0", "seed"),
        ({"retrain_epochs": -1.0}, "retrain_epochs=-1.0 must be a number >= 0 (0: no retraining)",
         "retrain_epochs"),
        ({"retrain_epochs": float("inf")}, "retrain_epochs=inf must be a number >= 0 (0: no "
         "retraining)", "retrain_epochs"),
        ({"lr": 0.0}, "lr=0.0 must be a positive number (e.g. 3e-4)", "lr"),
        ({"lr": float("nan")}, "lr=nan must be a positive number (e.g. 3e-4)", "lr"),
    ],
)  # fmt: skip
def test_each_bad_prune_option_is_a_usage_error_naming_it(keywords, message, field):
    """`prune_model` checks these first, before the model or the data is touched."""
    with pytest.raises(OptionError) as info:
        check_prune_options(**{"sparsity": 0.5, **keywords})
    assert str(info.value) == message and info.value.fields == (field,)
    with pytest.raises(OptionError) as info:
        prune_model(b"not a model", Dataset({}), **{"sparsity": 0.5, **keywords})
    assert str(info.value) == message


def test_good_prune_options_pass_the_check():
    check_prune_options(sparsity={"a": 0.0, "b": 0.99}, lr=lambda f: 1e-3, retrain_epochs=0)
    check_prune_options(sparsity=0.5, scope="layer", steps=1, seed=0, hessian_samples=1)


def classification_data(seed=0, n=256):
    """Labels from a fixed teacher convnet, so the student can learn them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 6, 6)).astype(np.float32)
    teacher = GradientEngine(small_convnet(seed=7))
    return Dataset({"input": x}, teacher.logits({"input": x}).argmax(axis=1).astype(np.int64))


@pytest.mark.parametrize("criterion", ["magnitude", "saliency", "obs"])
def test_prune_model_reaches_the_target_and_keeps_pruned_weights_at_zero(criterion):
    model = small_convnet(seed=7)
    data = classification_data()
    stages = []
    pruned, masks = prune_model(
        model,
        data,
        sparsity=0.6,
        criterion=criterion,
        steps=2,
        retrain_epochs=2,
        lr=0.01,
        batch_size=32,
        hessian_samples=64,
        progress=lambda stage, done, total: stages.append((stage, done, total)),
    )
    assert set(masks) == {"conv.weight", "fc.weight"}  # biases are never pruned
    assert sparsity_of(masks) == pytest.approx(0.6, abs=1e-2)
    values = read_initializers(pruned, ["conv.weight", "fc.weight", "conv.bias", "fc.bias"])
    for name, mask in masks.items():
        assert np.all(values[name][~mask] == 0)
        assert np.all(values[name][mask] != 0)
    assert stages[-1] == ("retrain", 32, 32)
    assert ("hessian" in {s for s, _, _ in stages}) == (criterion == "saliency")
    original = read_initializers(model, ["conv.bias"])["conv.bias"]
    assert not np.array_equal(values["conv.bias"], original)  # biases were retrained
    np.testing.assert_array_equal(
        read_initializers(model, ["conv.bias"])["conv.bias"], original
    )  # input untouched


def test_retraining_recovers_accuracy():
    model = small_convnet(seed=7)
    data = classification_data(n=512)

    def acc(m):
        return float(np.mean(GradientEngine(m).logits(data.inputs).argmax(1) == data.labels))

    one_shot, _ = prune_model(model, data, sparsity=0.8, steps=1, retrain_epochs=0)
    retrained, _ = prune_model(
        model, data, sparsity=0.8, steps=2, retrain_epochs=3, lr=0.01, batch_size=32
    )
    assert acc(retrained) > acc(one_shot) + 0.05


def test_retraining_needs_labels():
    data = classification_data()
    with pytest.raises(DataError, match="labels"):
        prune_model(small_convnet(), Dataset(data.inputs), sparsity=0.5)
    _, masks = prune_model(
        small_convnet(), Dataset(data.inputs), sparsity=0.5, retrain_epochs=0, steps=1
    )
    assert sparsity_of(masks) == pytest.approx(0.5, abs=1e-2)


def _layer(rows=6, d=10, n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.7 * rng.standard_normal((d, d)))
    w = rng.standard_normal((rows, d))
    return w, x, LayerHessian(False, 1, ((x.T @ x / n)[None],), n)


def _error(w, q, x):
    return float(np.sum(np.square(x @ (w - q).T)))


def test_obs_prune_beats_masking_and_hits_the_target():
    w, x, lh = _layer()
    new, masks = obs_prune({"w": w}, {"w": lh}, sparsity=0.5, damp=0.0)
    assert masks["w"].sum() == 30 and np.all(new["w"][~masks["w"]] == 0)
    magnitude = apply_masks({"w": w}, prune_masks({"w": w}, sparsity=0.5))["w"]
    same_mask = np.where(masks["w"], w, 0.0)
    assert _error(w, new["w"], x) < _error(w, same_mask, x)
    assert _error(w, new["w"], x) < _error(w, magnitude, x)


def test_obs_prune_of_a_first_column_is_the_exact_least_squares_update():
    """Pruning column 0 only, the survivors move to the OBS optimum w_1 + H11^-1 H10 w_0."""
    w, x, lh = _layer(rows=3, d=5, seed=1)
    h = x.T @ x / len(x)
    keep = np.ones(w.shape, bool)
    keep[:, 0] = False
    new, masks = obs_prune({"w": w}, {"w": lh}, sparsity=0.0, keep={"w": keep}, damp=0.0)
    np.testing.assert_array_equal(masks["w"], keep)
    best = w[:, 1:] + np.linalg.solve(h[1:, 1:], h[1:, :1] @ w[:, :1].T).T
    np.testing.assert_allclose(new["w"][:, 1:], best, rtol=1e-9, atol=1e-12)


def test_obs_prune_keeps_earlier_masks_and_falls_back_to_magnitude():
    w, _, lh = _layer(seed=2)
    other = np.arange(1.0, 21.0).reshape(4, 5)
    first, masks = obs_prune({"w": w, "o": other}, {"w": lh}, sparsity=0.3, scope="layer")
    assert np.array_equal(np.flatnonzero(~masks["o"]), np.arange(6))  # the 6 smallest |w|
    _, later = obs_prune(first, {"w": lh}, sparsity=0.6, scope="layer", keep=masks)
    assert np.all(later["w"] <= masks["w"]) and np.all(later["o"] <= masks["o"])
    with pytest.raises(ConfigError, match="criterion 'obs' also updates the surviving weights"):
        prune_masks({"w": w}, sparsity=0.5, criterion="obs")
