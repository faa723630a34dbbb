"""Which input each weight multiplies, read from the graph.

Shared by the forward-only Hessian (`onnxhq.hessian.activations`, the diagonal of ``X X^T``) and
`onnxhq.layer_inputs` (the whole ``X X^T`` per weight). Both run a copy of the model in which the
weights are graph inputs (`weights_as_inputs`) and the activations they multiply are extra graph
outputs (`expose`), then reduce each batch's activations per `Use`; a convolution's activation
is read through `conv_windows`, the im2col view one kernel offset at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import DataError, ModelError
from ..normalize import materialize_constants

#: op type -> the input slots a weight may sit in.
SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}


@dataclass(frozen=True, eq=False)
class Use:
    """One node reading weight ``param`` (shaped ``shape``) at input ``slot``.

    ``x`` names the tensor the weight multiplies: the other operand of a MatMul or Gemm, the
    input ``(N, C, *spatial)`` of a Conv or ConvTranspose, the indices of a Gather.
    """

    param: str
    node: onnx.NodeProto
    slot: int
    x: str
    shape: tuple[int, ...]

    def attr(self, name: str, default):
        """The node's attribute ``name``, or ``default`` when it is not set."""
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def weights_as_inputs(
    model: onnx.ModelProto, params: Sequence[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` with Constant weights materialized and ``params`` moved to graph
    inputs, and the weights' values (name -> array shaped like the weight). ``model`` is not
    changed; the copy holds no copy of the weights (they are fed at run time)."""
    wanted = set(params)
    # Weights read by these ops only cannot be folded into other constants: the copy can leave
    # them out (one copy of a large model fewer) and take their values from ``model``.
    direct = all(n.op_type in SLOTS for n in model.graph.node if wanted.intersection(n.input))
    m = _copy_without(model, wanted if direct else set())
    materialize_constants(m)
    inits = {t.name: t for t in model.graph.initializer if t.name in wanted} if direct else {}
    inits.update({t.name: t for t in m.graph.initializer})
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(
            f"weight {missing[0]!r} is not a constant of the model; the activation "
            "Hessian needs the names of initializers or Constant node outputs"
        )
    values = {p: numpy_helper.to_array(inits[p]) for p in params}
    not_float = [p for p in params if values[p].dtype.kind != "f"]
    if not_float:
        raise ModelError(
            f"weight {not_float[0]!r} is {values[not_float[0]].dtype}, not a float "
            "tensor; leave it out of the weights to compress"
        )
    inputs = [
        helper.make_tensor_value_info(p, inits[p].data_type, list(inits[p].dims)) for p in params
    ]
    keep = [t for t in m.graph.initializer if t.name not in values]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.input.extend(inputs)
    return m, values


def _copy_without(model: onnx.ModelProto, skip: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the main graph's initializers named in ``skip``."""
    m = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(m, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name == "initializer":
            m.graph.initializer.extend(t for t in value if t.name not in skip)
        else:
            _copy_field(m.graph, field.name, value)
    return m


def _copy_field(message, name: str, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(message, name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def find_uses(
    model: onnx.ModelProto, params: Sequence[str], values: Mapping[str, np.ndarray]
) -> list[Use]:
    """Every node of the main graph that reads one of ``params``, in graph order.

    ``ModelError`` for a weight read at a slot outside `SLOTS` (or by an op not in it), or read
    by no node at all. ``values`` gives each weight's shape.
    """
    wanted, uses = set(params), []
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name not in wanted:
                continue
            known = node.domain in ("", "ai.onnx") and slot in SLOTS.get(node.op_type, ())
            if not known:
                raise ModelError(
                    f"weight {name!r} is read by {node.op_type} node {node.name!r} (input "
                    f"{slot}); the activation Hessian handles weights of MatMul, Gemm, Conv, "
                    "ConvTranspose and Gather: leave it out, or choose another --hessian"
                )
            if node.op_type in ("MatMul", "Gemm"):
                other = node.input[1 - slot]  # the operand the weight multiplies
            else:
                other = node.input[1 if node.op_type == "Gather" else 0]  # indices, or x
            uses.append(Use(name, node, slot, other, tuple(values[name].shape)))
    unread = wanted - {u.param for u in uses}
    if unread:
        raise ModelError(f"weight {sorted(unread)[0]!r} is read by no node of the main graph")
    return uses


def runtime_feeds(
    model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], params: Sequence[str]
) -> dict[str, np.ndarray]:
    """The runtime inputs of ``model`` (the weights ``params`` aside) taken from ``inputs``,
    checked: every one given, equal nonzero sample counts on axis 0 (``DataError`` otherwise)."""
    consts = {t.name for t in model.graph.initializer} | set(params)
    needed = [i.name for i in model.graph.input if i.name not in consts]
    missing = [name for name in needed if name not in inputs]
    if missing:
        raise DataError(
            f"the data has no input {missing[0]!r}; the model needs {', '.join(needed)}"
        )
    feeds = {name: np.asarray(inputs[name]) for name in needed}
    counts = {k: (len(v) if v.ndim else 0) for k, v in feeds.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"the inputs must hold equal, nonzero sample counts on axis 0; got {counts}"
        )
    return feeds


def expose(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Make each of ``names`` a graph output of ``model`` (in place; existing outputs stay)."""
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
            have.add(name)


def conv_windows(use: Use, x: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """The im2col view of a Conv's input, one kernel offset at a time.

    Parameters
    ----------
    use : a Conv reading a weight of shape ``(M, C/G, *kernel)``.
    x : the Conv's input (or an elementwise function of it, e.g. its square), ``(N, C, *spatial)``.

    Yields
    ------
    (offset, reads) for every kernel offset in C order: ``offset`` indexes ``kernel``, ``reads``
    is the ``(N, C, *out)`` view of zero-padded ``x`` that this offset of the kernel multiplies
    at each output position (strides, dilations, pads and auto_pad applied).
    """
    kernel = use.shape[2:]
    sp = len(kernel)
    strides = list(use.attr("strides", [1] * sp))
    dil = list(use.attr("dilations", [1] * sp))
    begin, end = _conv_pads(use, x.shape[2:], kernel, strides, dil)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    out = [
        (padded.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(sp)
    ]
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dil, out, strides)
        )
        where: tuple[slice, ...] = (slice(None), slice(None), *window)
        yield offset, padded[where]


def _conv_pads(
    use: Use,
    size: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dil: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(begin, end) zero padding per spatial axis of input ``size`` (explicit pads or auto_pad)."""
    sp = len(kernel)
    auto = use.attr("auto_pad", b"NOTSET")
    if auto in (b"SAME_UPPER", b"SAME_LOWER"):
        total = [
            max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            for n, s, d, k in zip(size, strides, dil, kernel)
        ]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        return (small, big) if auto == b"SAME_UPPER" else (big, small)
    if auto == b"VALID":
        return [0] * sp, [0] * sp
    pads = list(use.attr("pads", [0] * 2 * sp))
    return pads[:sp], pads[sp:]
