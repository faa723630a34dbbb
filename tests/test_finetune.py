"""Codebook fine-tuning: GatherGrad gives per-cluster summed gradients; training lowers the loss and
changes nothing but the codebook values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import small_convnet, with_dequantized_weights

from onnxhq.data import Dataset
from onnxhq.errors import DataError, ModelError
from onnxhq.finetune import finetune_codebooks
from onnxhq.model import read_initializers, replace_initializers
from onnxhq.rewrite import rewrite
from onnxhq.training.engine import GradientEngine
from onnxhq.training.graph import codebook_names

WEIGHTS = ["conv.weight", "fc.weight"]


def nearest_codes(model, k=6, grouped=False):
    """Codebooks from weight quantiles plus an exact zero codeword, and nearest-codeword indices."""
    weights = read_initializers(model, WEIGHTS)

    def book_for(values):
        return np.sort(
            np.concatenate([[0.0], np.quantile(values, np.linspace(0.05, 0.95, k - 1))])
        ).astype(np.float32)

    def nearest(values, book):
        return np.abs(values[..., None] - book).argmin(axis=-1)

    if not grouped:
        book = book_for(np.concatenate([w.ravel() for w in weights.values()]))
        tensors = {
            n: SimpleNamespace(codebook="shared", indices=nearest(w, book), group_size=None)
            for n, w in weights.items()
        }
        return {"shared": book}, tensors
    sizes = {"conv.weight": 1, "fc.weight": 2}
    books, tensors = {}, {}
    for name, w in weights.items():
        rows = w.reshape(-1, sizes[name], *w.shape[1:])  # (groups, group_size, ...)
        books[name] = np.stack([book_for(r) for r in rows])
        idx = np.stack([nearest(r, b) for r, b in zip(rows, books[name])]).reshape(w.shape)
        tensors[name] = SimpleNamespace(codebook=name, indices=idx, group_size=sizes[name])
    return books, tensors


def teacher_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 6, 6)).astype(np.float32)
    labels = (
        GradientEngine(small_convnet(seed=7)).logits({"input": x}).argmax(axis=1).astype(np.int64)
    )
    return Dataset({"input": x}, labels)


def mean_loss(model, data):
    return GradientEngine(model).loss_and_gradients(data.inputs, data.labels)[0]


def initializer_names(model):
    return [t.name for t in model.graph.initializer]


@pytest.mark.parametrize("grouped", [False, True])
def test_codebook_gradient_is_the_per_cluster_sum_of_weight_gradients(grouped, convnet_inputs):
    model = small_convnet(seed=7)
    books, tensors = nearest_codes(model, grouped=grouped)
    rewritten = rewrite(model, books, tensors)
    x, y = convnet_inputs
    names = codebook_names(rewritten)
    _, book_grads = GradientEngine(rewritten, params=names).loss_and_gradients({"input": x}, y)
    _, weight_grads = GradientEngine(
        with_dequantized_weights(model, books, tensors), params=WEIGHTS
    ).loss_and_gradients({"input": x}, y)
    want = {n: np.zeros(book_grads[n].shape, np.float64) for n in names}
    for weight, c in tensors.items():
        book = books[c.codebook]
        k = book.shape[-1]
        rows = (
            0
            if c.group_size is None
            else (np.arange(c.indices.shape[0]) // c.group_size * k)[:, None]
        )
        flat = (c.indices.reshape(c.indices.shape[0], -1) + rows).ravel()
        cb_name = next(n for n in names if n.endswith("." + c.codebook))
        np.add.at(want[cb_name], flat, weight_grads[weight].ravel())
    for n in names:
        np.testing.assert_allclose(book_grads[n], want[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grouped", [False, True])
def test_finetuning_lowers_the_loss_and_changes_only_codebook_values(grouped):
    model = small_convnet(seed=7)
    rng = np.random.default_rng(3)
    noisy = replace_initializers(
        model,
        {
            n: w + rng.normal(0, 0.3, w.shape).astype(np.float32)
            for n, w in read_initializers(model, WEIGHTS).items()
        },
    )
    books, tensors = nearest_codes(noisy, grouped=grouped)
    rewritten = rewrite(noisy, books, tensors)
    data = teacher_data()
    seen = []
    tuned = finetune_codebooks(
        rewritten,
        data,
        epochs=4,
        lr=0.01,
        batch_size=32,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert seen[-1] == ("finetune", 32, 32)
    assert mean_loss(tuned, data) < 0.9 * mean_loss(rewritten, data)
    names = set(codebook_names(rewritten))
    old, new = (read_initializers(m, initializer_names(m)) for m in (rewritten, tuned))
    assert old.keys() == new.keys()
    for name in old:
        if name in names:
            assert not np.array_equal(old[name], new[name])
            np.testing.assert_array_equal(
                new[name][old[name] == 0], 0.0
            )  # the zero codeword stays exactly 0
        else:
            np.testing.assert_array_equal(old[name], new[name])  # indices, biases: untouched
    assert list(tuned.graph.node) == list(rewritten.graph.node)
    onnx.checker.check_model(tuned, full_check=True)


def test_input_model_is_not_mutated_and_zero_can_be_released():
    model = small_convnet(seed=7)
    books, tensors = nearest_codes(model)
    rewritten = rewrite(model, books, tensors)
    before = rewritten.SerializeToString()
    tuned = finetune_codebooks(
        rewritten, teacher_data(64), epochs=1, lr=0.01, batch_size=32, hold_zero=False
    )
    assert rewritten.SerializeToString() == before
    book = read_initializers(tuned, codebook_names(tuned))["onnxhq.codebook.shared"]
    assert np.all(book != 0)


def test_errors_name_the_problem(convnet):
    with pytest.raises(ModelError, match="no onnxhq codebooks"):
        finetune_codebooks(convnet, teacher_data(32))
    books, tensors = nearest_codes(convnet)
    with pytest.raises(DataError, match="labels"):
        finetune_codebooks(rewrite(convnet, books, tensors), Dataset(teacher_data(32).inputs))
