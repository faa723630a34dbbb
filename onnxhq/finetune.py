"""Codebook fine-tuning: train the shared values of a quantized model, its indices fixed.

After quantization each weight is ``codebook[index]``. Fine-tuning moves the codebook values to
lower the training loss (Han et al. 2016; Choi et al. 2017, Sec. 5): the gradient of a codeword is
the sum of the gradients of the weights that use it. onnxhq gets exactly that from the rewritten
graph itself: inlined, each weight is ``Gather(codebook, indices)``, and onnxruntime's gradient
builder differentiates ``Gather`` into ``GatherGrad``, a per-cluster sum. The codebook initializers
become the only trained parameters (Adam); indices and every other tensor stay as they are.

A codeword that is exactly zero (the pruned weights' cluster) stays exactly zero, so sparsity and
the zero symbol the encoder relies on survive fine-tuning.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from . import naming
from .data import Dataset
from .errors import ConfigError, DataError, ModelError
from .gradients import GradientEngine, train
from .model import initializer_map, read_initializers, replace_initializers

log = logging.getLogger(__name__)


def codebook_names(rewritten: onnx.ModelProto) -> list[str]:
    """Initializers read as codebooks (input 0) by the model's ``onnxhq`` dequantize nodes, in graph order."""
    inits = initializer_map(rewritten)
    names: list[str] = []
    for node in rewritten.graph.node:
        if node.domain == naming.DOMAIN and node.input and node.input[0] in inits and node.input[0] not in names:
            names.append(node.input[0])
    return names


def finetune_codebooks(rewritten: onnx.ModelProto, data: Dataset, *, epochs: float = 1.0,
                       lr: float | Callable[[float], float] = 1e-4, batch_size: int = 64, seed: int = 0,
                       hold_zero: bool = True, output: str | None = None,
                       augment: Callable[[dict, np.random.Generator], dict] | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> onnx.ModelProto:
    """Train the codebooks of a rewritten (codebook + index) model on labelled ``data``.

    Parameters
    ----------
    rewritten : a model from `onnxhq.rewrite.rewrite` (or decoded from artifacts): weights are
        ``onnxhq.Dequantize`` / ``DequantizeGrouped`` of float32 codebook initializers, shape (k,)
        or (G * k,) for channel groups.
    data : training inputs with integer labels (N,).
    epochs : passes over ``data`` (fractions allowed).
    lr : a number is the peak of a cosine decay to 1% of it; a function gets the fraction of
        training done (0..1) and returns the rate. Adam moves every codeword by about ``lr`` per
        step whatever its gradient's scale, so keep it well below the codewords' spacing.
    hold_zero : keep codewords that are exactly 0 at exactly 0.
    augment : optional ``(feed, rng) -> feed`` applied to each training batch.
    progress : called with ("finetune", done batches, total batches).

    Returns
    -------
    model : a copy of ``rewritten`` with new codebook values; graph, indices and every other
        initializer are unchanged.
    """
    if data.labels is None:
        raise DataError("codebook fine-tuning needs labels: add an integer 'labels' array to the data")
    if not epochs > 0:
        raise ConfigError(f"epochs={epochs} must be positive")
    names = codebook_names(rewritten)
    if not names:
        raise ModelError("the model has no onnxhq codebooks to fine-tune; quantize and rewrite it first")
    inits = initializer_map(rewritten)
    for name in names:
        if inits[name].data_type != TensorProto.FLOAT:
            raise ModelError(f"codebook {name!r} is {TensorProto.DataType.Name(inits[name].data_type)}; "
                             "fine-tuning supports float32 codebooks only")
    books = read_initializers(rewritten, names)
    masks = {n: b != 0 for n, b in books.items()} if hold_zero else None
    engine = GradientEngine(rewritten, params=names, output=output)
    rate = lr if callable(lr) else (lambda f: lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * f))))
    losses: list[float] = []

    def track(done: int, total: int, loss: float) -> None:
        losses.append(loss)
        if progress is not None:
            progress("finetune", done, total)

    params, _ = train(engine, data.inputs, data.labels, epochs=epochs, batch_size=batch_size, lr=rate, seed=seed,
                      masks=masks, augment=augment, progress=track)
    if losses:
        tenth = max(1, len(losses) // 10)
        log.info("fine-tuned %d codebooks over %d batches; mean loss %.4f in the first tenth, %.4f in the last",
                 len(names), len(losses), float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])))
    return replace_initializers(rewritten, params)

