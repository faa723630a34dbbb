"""The rewrite rules of `onnxhq.differentiable`: one function per op, same values, with gradients.

Each rule takes the node and a `RewriteContext` and returns the replacement nodes (the last one
writes the node's output), or None to keep the node. They build nodes only through the context's
`NodeBuilder`, so this module needs no protobuf of its own.

=================  ===========================================================================
HardSigmoid        Max(Min(alpha x + beta, 1), 0)
HardSwish          x HardSigmoid(x) with alpha = 1/6, beta = 1/2
Softplus           Relu(x) + log(1 + exp(-|x|))   (the overflow-free form)
Softsign           x / (1 + |x|)
Elu, Selu, Celu    Where(x > 0, x, alpha (exp(min(x, 0) / a) - 1)), Selu times gamma
PRelu              Where(x < 0, slope x, x)
ThresholdedRelu    Where(x > alpha, x, 0)
BatchNormalization x a + b, a = scale / sqrt(var + eps), b = B - mean a, per channel (inference)
Dropout            Identity (inference; no mask output read, training_mode absent or constant 0)
Sum, Mean          a chain of Add (Mean: divided by the count)
LRN                x / (bias + alpha/size sum_window(x^2))^beta, the window sum as a Conv
ConvTranspose      Conv of the zero-upsampled input with the flipped, transposed kernel
Resize             nearest, whole factors: Unsqueeze + Expand + Reshape
AveragePool        a depthwise Conv with a 1/size kernel (all windows full)
=================  ===========================================================================

ConvTranspose and Resize have registered gradients, but the CPU build has no kernel for them;
AveragePool's gradient is wrong when the batch dim is symbolic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from .differentiable import NodeBuilder, RewriteContext


def _hard_sigmoid(b: NodeBuilder, x: str, alpha: float, beta: float, *, last: bool) -> str:
    z = b.op("Add", b.op("Mul", x, b.const(alpha)), b.const(beta))
    low = b.op("Min", z, b.const(1.0))
    if last:
        b.finish("Max", low, b.const(0.0))
        return b.node.output[0]
    return b.op("Max", low, b.const(0.0))


def _rw_hard_sigmoid(node, ctx):
    b = ctx.builder(node)
    _hard_sigmoid(
        b, node.input[0], ctx.attr(node, "alpha", 0.2), ctx.attr(node, "beta", 0.5), last=True
    )
    return b.nodes


def _rw_hard_swish(node, ctx):
    b = ctx.builder(node)
    x = node.input[0]
    return b.finish("Mul", x, _hard_sigmoid(b, x, 1.0 / 6.0, 0.5, last=False))


def _rw_softplus(node, ctx):
    b = ctx.builder(node)
    x = node.input[0]
    tail = b.op("Log", b.op("Add", b.const(1.0), b.op("Exp", b.op("Neg", b.op("Abs", x)))))
    return b.finish("Add", b.op("Relu", x), tail)


def _rw_softsign(node, ctx):
    b = ctx.builder(node)
    x = node.input[0]
    return b.finish("Div", x, b.op("Add", b.const(1.0), b.op("Abs", x)))


def _exp_linear(node, ctx, *, alpha: float, scale_in: float = 1.0, gamma: float | None = None):
    """Where(x > 0, x, alpha (exp(min(x, 0) / scale_in) - 1)), times gamma if given.

    The min keeps exp finite in the branch Where discards, so its gradient stays 0, not NaN.
    """
    b = ctx.builder(node)
    x = node.input[0]
    neg = b.op("Min", x, b.const(0.0))
    if scale_in != 1.0:
        neg = b.op("Div", neg, b.const(scale_in))
    curve = b.op("Mul", b.const(alpha), b.op("Sub", b.op("Exp", neg), b.const(1.0)))
    positive = b.op("Greater", x, b.const(0.0))
    if gamma is None:
        return b.finish("Where", positive, x, curve)
    return b.finish("Mul", b.const(gamma), b.op("Where", positive, x, curve))


def _rw_elu(node, ctx):
    return _exp_linear(node, ctx, alpha=ctx.attr(node, "alpha", 1.0))


def _rw_selu(node, ctx):
    return _exp_linear(
        node,
        ctx,
        alpha=ctx.attr(node, "alpha", 1.67326319217681884765625),
        gamma=ctx.attr(node, "gamma", 1.05070102214813232421875),
    )


def _rw_celu(node, ctx):
    alpha = ctx.attr(node, "alpha", 1.0)
    return _exp_linear(node, ctx, alpha=alpha, scale_in=alpha)


def _rw_prelu(node, ctx):
    b = ctx.builder(node)
    x, slope = node.input[0], node.input[1]
    return b.finish("Where", b.op("Less", x, b.const(0.0)), b.op("Mul", slope, x), x)


def _rw_thresholded_relu(node, ctx):
    b = ctx.builder(node)
    x = node.input[0]
    above = b.op("Greater", x, b.const(ctx.attr(node, "alpha", 1.0)))
    return b.finish("Where", above, x, b.const(0.0))


def _rw_batchnorm(node, ctx):
    if len(node.output) > 1 or ctx.attr(node, "training_mode", 0):
        return None
    b = ctx.builder(node)
    x, scale, bias, mean, var = node.input[:5]
    a = b.op("Div", scale, b.op("Sqrt", b.op("Add", var, b.const(ctx.attr(node, "epsilon", 1e-5)))))
    shift = b.op("Sub", bias, b.op("Mul", mean, a))
    shape = _channel_shape(b, x)
    return b.finish("Add", b.op("Mul", x, b.op("Reshape", a, shape)), b.op("Reshape", shift, shape))


def _channel_shape(b: NodeBuilder, x: str) -> str:
    """(-1, 1, ..., 1) of x's rank: a per-channel vector reshaped to broadcast over axis 1."""
    rank = b.ctx.rank(x)
    if rank is not None:
        return b.const([-1] + [1] * max(rank - 2, 0), np.int64)
    # Rank unknown to shape inference: build the shape at run time from Shape(Shape(x)) = [rank].
    spatial = b.op("Sub", b.op("Shape", b.op("Shape", x)), b.const([2], np.int64))
    ones = b.op("Expand", b.const([1], np.int64), spatial)  # (rank - 2) ones
    return b.op("Concat", b.const([-1], np.int64), ones, axis=0)


def _rw_dropout(node, ctx):
    if len(node.output) > 1 and node.output[1]:
        return None  # the mask is read: keep the node
    if len(node.input) > 2 and node.input[2]:
        return None  # training_mode is a run-time input: it may be true
    return ctx.builder(node).finish("Identity", node.input[0])


def _rw_sum_mean(node, ctx):
    b = ctx.builder(node)
    terms = list(node.input)
    if len(terms) == 1:
        return b.finish("Identity", terms[0])
    acc = terms[0]
    for term in terms[1:-1]:
        acc = b.op("Add", acc, term)
    if node.op_type == "Sum":
        return b.finish("Add", acc, terms[-1])
    return b.finish("Div", b.op("Add", acc, terms[-1]), b.const(float(len(terms))))


def _rw_conv_transpose(node, ctx):
    """Conv over the zero-upsampled input with the flipped, transposed kernel (any group).

    1.19.2's builder emits ConvTransposeGrad, for which its CPU build has no kernel. Zeros are
    inserted by Unsqueeze + Pad + Reshape(Shape(x) * strides); a second Pad (negative entries
    crop) gives the transposed convolution's borders.
    """
    x, w = node.input[0], node.input[1]
    rank, w_shape = ctx.rank(x), ctx.static_shape(w)
    if (
        ctx.opset < 13
        or rank is None
        or rank < 3
        or w_shape is None
        or ctx.attr(node, "output_shape", None)
        or ctx.attr(node, "auto_pad", b"NOTSET") != b"NOTSET"
    ):
        return None
    sp = rank - 2
    c_in, c_out_g, *kernel = w_shape
    group = ctx.attr(node, "group", 1)
    strides = list(ctx.attr(node, "strides", [1] * sp))
    dil = list(ctx.attr(node, "dilations", [1] * sp))
    pads = list(ctx.attr(node, "pads", [0] * 2 * sp))
    extra = list(ctx.attr(node, "output_padding", [0] * sp))
    b = ctx.builder(node)
    # Kernel (Cin, Cout/g, k...) -> flipped spatially -> (Cout, Cin/g, k...), group by group.
    for axis, k in enumerate(kernel):
        w = b.op("Gather", w, b.const(np.arange(k - 1, -1, -1), np.int64), axis=2 + axis)
    w = b.op("Reshape", w, b.const([group, c_in // group, c_out_g, *kernel], np.int64))
    w = b.op("Transpose", w, perm=[0, 2, 1, *range(3, 3 + sp)])
    w = b.op("Reshape", w, b.const([group * c_out_g, c_in // group, *kernel], np.int64))
    if any(s > 1 for s in strides):
        gaps = b.op("Unsqueeze", x, b.const([3 + 2 * i for i in range(sp)], np.int64))
        ends = [0, 0] + [v for s in strides for v in (0, s - 1)]
        gaps = b.op("Pad", gaps, b.const([0] * len(ends) + ends, np.int64))
        size = b.op("Mul", b.op("Shape", x), b.const([1, 1, *strides], np.int64))
        x = b.op("Reshape", gaps, size)
    begin = [d * (k - 1) - p for d, k, p in zip(dil, kernel, pads[:sp])]
    end = [
        d * (k - 1) - p + e - (s - 1)
        for d, k, p, e, s in zip(dil, kernel, pads[sp:], extra, strides)
    ]
    if any(begin) or any(end):
        x = b.op("Pad", x, b.const([0, 0, *begin, 0, 0, *end], np.int64))
    return b.finish("Conv", x, w, *node.input[2:3], dilations=dil, group=group)


def _rw_resize(node, ctx):
    """Nearest upsampling by whole factors as Unsqueeze + Expand + Reshape (no CPU ResizeGrad).

    Output index o reads input floor(o / s): asymmetric coordinates with floor rounding, or
    half_pixel ones with either round_prefer rounding (offsets stay within half a pixel).
    """
    scales = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    coords = ctx.attr(node, "coordinate_transformation_mode", b"half_pixel")
    rounding = ctx.attr(node, "nearest_mode", b"round_prefer_floor")
    if (
        ctx.opset < 13
        or ctx.attr(node, "mode", b"nearest") != b"nearest"
        or scales is None
        or (len(node.input) > 3 and node.input[3])
        or scales.size == 0
        or np.any(scales < 1)
        or np.any(scales != np.round(scales))
        or not (
            (coords == b"asymmetric" and rounding == b"floor")
            or (coords == b"half_pixel" and rounding.startswith(b"round_prefer"))
        )
    ):
        return None
    factors = [int(f) for f in scales]
    ups = [axis for axis, f in enumerate(factors) if f > 1]
    b = ctx.builder(node)
    x = node.input[0]
    if not ups:
        return b.finish("Identity", x)
    spread = b.op("Unsqueeze", x, b.const([a + j + 1 for j, a in enumerate(ups)], np.int64))
    target = [v for f in factors for v in ((1, f) if f > 1 else (1,))]
    spread = b.op("Expand", spread, b.const(target, np.int64))
    return b.finish("Reshape", spread, b.op("Mul", b.op("Shape", x), b.const(factors, np.int64)))


def _rw_average_pool(node, ctx):
    """AveragePool as a depthwise Conv with a constant 1/size kernel.

    1.19.2's AveragePool gradient goes wrong when the batch dim is symbolic; Conv's does not.
    Only where every window has the full divisor: no pads, or pads counted (count_include_pad).
    """
    x = node.input[0]
    rank, channels = ctx.rank(x), ctx.dim(x, 1)
    pads = list(ctx.attr(node, "pads", []))
    if (
        rank is None
        or rank < 3
        or channels is None
        or ctx.attr(node, "ceil_mode", 0)
        or ctx.attr(node, "auto_pad", b"NOTSET") != b"NOTSET"
        or (any(pads) and not ctx.attr(node, "count_include_pad", 0))
    ):
        return None
    kernel = list(ctx.attr(node, "kernel_shape", []))
    b = ctx.builder(node)
    weights = b.const(np.full((channels, 1, *kernel), 1.0 / np.prod(kernel)))
    attrs = {
        "strides": list(ctx.attr(node, "strides", [1] * len(kernel))),
        "dilations": list(ctx.attr(node, "dilations", [1] * len(kernel))),
    }
    return b.finish("Conv", x, weights, group=channels, pads=pads or [0] * 2 * len(kernel), **attrs)


def _rw_lrn(node, ctx):
    rank = ctx.rank(node.input[0])
    if rank is None or rank < 3:
        return None
    b = ctx.builder(node)
    x, size = node.input[0], ctx.attr(node, "size", 1)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    # Square, add an axis in front of the channels and sum a window of ``size`` channels with a
    # ones kernel (AveragePool would do, but its gradient is wrong for 3-D pooling with pads).
    spatial = rank - 2
    square = _unsqueeze(b, b.op("Mul", x, x), 1)
    ones = b.const(np.ones((1, 1, size) + (1,) * spatial))
    window = b.op("Conv", square, ones, pads=[lo] + [0] * spatial + [hi] + [0] * spatial)
    total = _squeeze(b, window, 1)
    base = b.op(
        "Add",
        b.const(ctx.attr(node, "bias", 1.0)),
        b.op("Mul", b.const(ctx.attr(node, "alpha", 1e-4) / size), total),
    )
    return b.finish("Div", x, b.op("Pow", base, b.const(ctx.attr(node, "beta", 0.75))))


def _unsqueeze(b: NodeBuilder, x: str, axis: int) -> str:
    if b.ctx.opset >= 13:
        return b.op("Unsqueeze", x, b.const([axis], np.int64))
    return b.op("Unsqueeze", x, axes=[axis])


def _squeeze(b: NodeBuilder, x: str, axis: int) -> str:
    if b.ctx.opset >= 13:
        return b.op("Squeeze", x, b.const([axis], np.int64))
    return b.op("Squeeze", x, axes=[axis])


Rule = Callable[["onnx.NodeProto", "RewriteContext"], "list[onnx.NodeProto] | None"]
#: op type -> rule returning the replacement nodes, or None to keep the node.
REWRITES: dict[str, Rule] = {
    "HardSigmoid": _rw_hard_sigmoid,
    "HardSwish": _rw_hard_swish,
    "Softplus": _rw_softplus,
    "Softsign": _rw_softsign,
    "Elu": _rw_elu,
    "Selu": _rw_selu,
    "Celu": _rw_celu,
    "PRelu": _rw_prelu,
    "ThresholdedRelu": _rw_thresholded_relu,
    "BatchNormalization": _rw_batchnorm,
    "Dropout": _rw_dropout,
    "Sum": _rw_sum_mean,
    "Mean": _rw_sum_mean,
    "LRN": _rw_lrn,
    "ConvTranspose": _rw_conv_transpose,
    "Resize": _rw_resize,
    "AveragePool": _rw_average_pool,
}
