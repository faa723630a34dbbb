"""How many samples the Hessian draws unless told: as many as a fixed budget of multiply-adds
buys on this model, between a floor and a cap.

One sample's cost is the multiply-adds of the nodes that read the weights (`multiply_adds`):
each weight's size times the positions it is applied at in one sample (a MatMul's rows, a
Conv's output pixels, a Gather's lookups per table row; `node_multiply_adds`), measured with one
forward pass of plain onnxruntime on one sample. `weight_matrix`, the weight as the matrix its
node multiplies, also sizes `onnxhq.layer_inputs.compensation_cost`. The Fisher costs about
three times that per sample (forward and backward), the ``activations`` Hessian one forward pass
per weight tensor in its calibration; both grow with it. The budget is what the cap costs on
ResNet-32 (CIFAR-10), so the small classifiers the defaults were measured on keep their 1000
samples, and a transformer encoder or an OCR model, whose samples cost a hundred times more,
draws fewer of them (its samples also carry many positions each: tokens, pixels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError
from ..options.vocabulary import MIN_HESSIAN_SAMPLES
from ..runtime import make_session
from .common import DEFAULT_SAMPLES
from .uses import Use, expose, find_uses, runtime_feeds, weights_as_inputs

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Multiply-adds (of the weight-reading nodes, summed over the samples) a default estimate
#: spends: ResNet-32 on 32x32 images (68.9M per sample) at 1000 samples.
SAMPLE_BUDGET = 70_000_000_000
#: The fewest samples a default estimate draws, however costly the model.
MIN_SAMPLES = MIN_HESSIAN_SAMPLES
#: The most samples a default estimate draws (the fixed default of earlier onnxhq).
MAX_SAMPLES = DEFAULT_SAMPLES


def default_samples(cost: int) -> int:
    """Samples for a model whose samples cost ``cost`` multiply-adds each: `SAMPLE_BUDGET` over
    the cost, within [`MIN_SAMPLES`, `MAX_SAMPLES`]."""
    return int(min(MAX_SAMPLES, max(MIN_SAMPLES, SAMPLE_BUDGET // max(cost, 1))))


def multiply_adds(
    model: onnx.ModelProto, params: Sequence[str], sample: Mapping[str, np.ndarray]
) -> int:
    """Multiply-adds per sample of the nodes that read ``params`` (see the module doc), from
    one forward pass on ``sample`` (every runtime input, one sample on axis 0; more are cut).

    A weight read by a node the activation Hessian does not know (`onnxhq.hessian.uses.SLOTS`)
    makes every weight count once per sample (logged); ModelError where the weights cannot be
    fed as inputs (`onnxhq.hessian.uses.weights_as_inputs`) or the model does not load."""
    graph_model, values = weights_as_inputs(model, params)
    sizes = {p: int(np.prod(v.shape, dtype=np.int64)) for p, v in values.items()}
    try:
        uses = find_uses(graph_model, params, values)
    except ModelError as exc:
        log.info("cost per sample: the weights' size (%s)", exc)
        return sum(sizes.values())
    feeds = {k: v[:1] for k, v in runtime_feeds(graph_model, sample, params).items()}
    seen = sorted({_measured(u) for u in uses} - set(feeds) - set(values))
    expose(graph_model, seen)
    got = make_session(graph_model).run(seen, {**feeds, **values}) if seen else []
    shapes = {k: np.shape(v) for k, v in {**feeds, **values, **dict(zip(seen, got))}.items()}
    return sum(node_multiply_adds(u, shapes[_measured(u)]) for u in uses)


def weight_matrix(use: Use) -> tuple[int, int, int]:
    """``(outputs, inputs, groups)``: the weight as the matrix its node multiplies at one
    position, ``outputs`` sums of ``inputs`` products each, in ``groups`` groups of
    ``outputs / groups`` sums (a grouped Conv or ConvTranspose); one position costs
    ``outputs * inputs`` multiply-adds, the weight's size.

    ``inputs`` is the contracted axis: a MatMul's or Gemm's (by slot, ``transA``/``transB``;
    ``(K, N)`` read as ``x @ W``: ``K``), a Conv's ``C/G * prod(kernel)`` per output channel, a
    ConvTranspose's ``C/G`` input channels, a Gather's table rows (a lookup is a one-hot product).
    """
    op, shape = use.node.op_type, use.shape
    size = math.prod(shape)
    if op == "Conv":
        groups = int(use.attr("group", 1))
        return shape[0], size // max(shape[0], 1), groups
    if op == "ConvTranspose":
        groups = int(use.attr("group", 1))
        inputs = shape[0] // groups
        return size // max(inputs, 1), inputs, groups
    if op == "Gather":
        inputs = shape[use.attr("axis", 0)]
    else:  # MatMul, Gemm
        trans = use.attr(("transA", "transB")[use.slot], 0) if op == "Gemm" else 0
        last = (use.slot == 0) != bool(trans)  # A (M, K), B^T stored as (N, K)
        inputs = shape[-1] if last else shape[-2 if len(shape) > 1 else 0]
    return size // max(inputs, 1), inputs, 1


def node_multiply_adds(use: Use, seen: tuple[int, ...]) -> int:
    """Multiply-adds of ``use``'s node with its weight in one sample: the weight's size
    (`weight_matrix`) times the positions it is applied at, read from ``seen``, the shape of
    `_measured` for one sample (its entries over those of one position: a MatMul's or Gemm's
    contracted dim, a Conv's output channels, a ConvTranspose's input channels, a Gather's table
    rows; at least 1)."""
    outputs, inputs, groups = weight_matrix(use)
    per = outputs if use.node.op_type == "Conv" else inputs * groups
    positions = max(1, math.prod(seen) // max(per, 1))
    return outputs * inputs * positions


def _measured(use: Use) -> str:
    """The tensor whose shape gives the use's positions: a Conv's output, else ``use.x``."""
    return use.node.output[0] if use.node.op_type == "Conv" else use.x
