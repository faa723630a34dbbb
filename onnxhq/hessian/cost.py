"""How many samples the Hessian draws unless told: as many as a fixed budget of multiply-adds
buys on this model, between a floor and a cap.

One sample's cost is the multiply-adds of the nodes that read the weights (`multiply_adds`):
each weight's size times the positions it is applied at in one sample (a MatMul's rows, a
Conv's output pixels, a Gather's lookups per table row), measured with one forward pass of
plain onnxruntime on one sample. The Fisher costs about three times that per sample (forward and
backward), the ``activations`` Hessian one forward pass per weight tensor in its calibration;
both grow with it. The budget is what the cap costs on ResNet-32 (CIFAR-10), so the small
classifiers the defaults were measured on keep their 1000 samples, and a transformer encoder or
an OCR model, whose samples cost a hundred times more, draws fewer of them (its samples also
carry many positions each: tokens, pixels).
"""

from __future__ import annotations

import logging
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
    return sum(sizes[u.param] * _positions(u, shapes[_measured(u)]) for u in uses)


def _measured(use: Use) -> str:
    """The tensor whose shape gives the use's positions: a Conv's output, else ``use.x``."""
    return use.node.output[0] if use.node.op_type == "Conv" else use.x


def _positions(use: Use, seen: tuple[int, ...]) -> int:
    """How many times each entry of the weight is multiplied in one sample, from the shape of
    `_measured`: its entries over the contracted dim (MatMul, Gemm), the channels (Conv,
    ConvTranspose), or the table's rows (Gather)."""
    op, shape = use.node.op_type, use.shape
    entries = int(np.prod(seen, dtype=np.int64))
    if op == "Gather":
        per = shape[use.attr("axis", 0)]
    elif op in ("MatMul", "Gemm"):
        trans = use.attr(("transA", "transB")[use.slot], 0) if op == "Gemm" else 0
        per = shape[-1] if (use.slot == 0) != bool(trans) else shape[-2 if len(shape) > 1 else 0]
    else:
        per = seen[1] if len(seen) > 1 else 1
    return max(1, entries // max(int(per), 1))
