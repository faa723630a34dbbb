"""Codebook fine-tuning: train the shared values of a quantized model, its indices fixed.

After quantization each weight is ``codebook[index]``. Fine-tuning moves the codebook values to
lower the training loss (Han et al. 2016; Choi et al. 2017, Sec. 5): the gradient of a codeword is
the sum of the gradients of the weights that use it. onnxhq gets exactly that from the rewritten
graph itself: inlined, each weight is ``Gather(codebook, indices)``, and onnxruntime's gradient
builder differentiates ``Gather`` into ``GatherGrad``, a per-cluster sum. The codebook initializers
(`onnxhq.training.graph.codebook_names`) become the only trained parameters (Adam); indices and
every other tensor stay as they are.

A codeword that is exactly zero (the pruned weights' cluster) stays exactly zero, so sparsity and
the zero symbol the encoder relies on survive fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset, check_label_range
from .errors import ConfigError, DataError, ModelError
from .model import read_initializers, replace_initializers
from .training.engine import GradientEngine
from .training.graph import codebook_names
from .training.train import Augment, Rate, cosine_lr, train

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)


def finetune_codebooks(
    rewritten: onnx.ModelProto,
    data: Dataset,
    *,
    epochs: float = 1.0,
    lr: Rate = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    hold_zero: bool = True,
    output: str | None = None,
    augment: Augment | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> onnx.ModelProto:
    """Train the codebooks of a rewritten (codebook + index) model on labelled ``data``.

    Parameters
    ----------
    rewritten : a model from `onnxhq.rewrite.rewrite` (or decoded from artifacts): weights are
        ``onnxhq.Dequantize`` / ``DequantizeGrouped`` of float32 codebook initializers, shape (k,)
        or (G * k,) for channel groups.
    data : training inputs with integer labels (N,).
    epochs : passes over ``data`` (fractions allowed).
    lr : a number is the peak of a cosine decay to 1% of it (`onnxhq.training.train.cosine_lr`);
        a function gets the fraction of training done (0..1) and returns the rate. Adam moves
        every codeword by about ``lr`` per step whatever its gradient's scale, so keep it well
        below the codewords' spacing.
    hold_zero : keep codewords that are exactly 0 at exactly 0.
    augment : optional ``(feed, rng) -> feed`` applied to each training batch.
    progress : called with ("finetune", done batches, total batches).

    Returns
    -------
    model : a copy of ``rewritten`` with new codebook values; graph, indices and every other
        initializer are unchanged.
    """
    if data.labels is None:
        raise DataError(
            "codebook fine-tuning needs labels: add an integer 'labels' array to the data"
        )
    if not epochs > 0:
        raise ConfigError(f"epochs={epochs} must be positive")
    rate = lr if callable(lr) else cosine_lr(lr)
    names = codebook_names(rewritten)
    if not names:
        raise ModelError(
            "the model has no onnxhq codebooks to fine-tune; quantize and rewrite it first"
        )
    books = read_initializers(rewritten, names)
    for name, book in books.items():
        if book.dtype != np.float32:
            raise ModelError(
                f"codebook {name!r} is {book.dtype}; fine-tuning supports float32 codebooks only"
            )
    masks = {n: b != 0 for n, b in books.items()} if hold_zero else None
    engine = GradientEngine(rewritten, params=names, output=output)
    # out-of-range labels crash onnxruntime's loss: check them first
    check_label_range(data, engine.logits(data.head(1).inputs).shape[-1])
    losses: list[float] = []

    def track(done: int, total: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress("finetune", done, total)

    params, _ = train(
        engine,
        data.inputs,
        data.labels,
        epochs=epochs,
        batch_size=batch_size,
        lr=rate,
        seed=seed,
        masks=masks,
        augment=augment,
        progress=track,
    )
    if losses:
        tenth = max(1, len(losses) // 10)
        log.info(
            "fine-tuned %d codebooks over %d batches; mean loss %.4f in the first tenth, "
            "%.4f in the last",
            len(names),
            len(losses),
            float(np.mean(losses[:tenth])),
            float(np.mean(losses[-tenth:])),
        )
    return replace_initializers(rewritten, params)
