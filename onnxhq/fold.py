"""Fold inference ``BatchNormalization`` into the Conv, ConvTranspose or Gemm that feeds it.

At inference a BatchNormalization is the per-channel affine map ``y = s x + t`` with
``s = scale / sqrt(var + eps)`` and ``t = B - mean s`` (`batchnorm_affine`), and a Conv,
ConvTranspose or Gemm is linear per output channel, so the pair is one layer of the same kind
with weights scaled by ``s`` along the output channels and bias ``b s + t``. Exported CNNs keep
the pair apart; folded, the weights onnxhq quantizes are the ones the network multiplies by (so
their errors are weighed, compensated and coded as they act), and the four BN vectors, which
would stay float in the compressed graph, become one bias vector.

`fold_batchnorms` does this in place where it is exact: the BN is in inference mode with
constant parameters, its input is the only use of the producer's output, which is no graph
output, and the producer's weight (and bias) are initializers nothing else reads. It also leaves
a BatchNormalization whose scales would move the layer's weights far (`SCALE_MAX`) from the
other layers', which share their codebook. Everything else is left as it was.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import naming
from .graphfile import all_graphs
from .lazy import read_weight
from .model import QUANTIZABLE_TYPES

log = logging.getLogger(__name__)

#: The ops a BatchNormalization folds into.
PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
#: Largest typical factor (median |s| per channel, either way) by which a fold may scale a
#: layer's weights. The maths stay the same at any factor, but one codebook serves every layer:
#: a layer moved orders of magnitude away from the others quantizes far worse (the PaddleOCR
#: detector's head BN has s ~ 1e-4: folding it too took map IoU from 0.88 to 0.75 at 5 bits).
SCALE_MAX = 64.0
_Read = Callable[[str], np.ndarray]


def batchnorm_affine(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of inference BatchNormalization ``y = s x + t`` per channel, in float64."""
    s = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    t = np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * s
    return s, t


def fold_batchnorms(model: onnx.ModelProto, *, path: str | os.PathLike | None = None) -> int:
    """Fold every foldable inference BatchNormalization of the main graph into its producer, in
    place (see the module doc); returns how many were folded.

    ``path`` is the model file a lazily loaded ``model`` came from (its weights still in their
    external data files): the folded weights are read from there and kept in the message.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = _use_counts(model)
    producers = {out: node for node in graph.node for out in node.output if out}
    outputs = {o.name for o in graph.output}
    graph_inputs = {i.name for i in graph.input}

    def read(name: str) -> np.ndarray:
        return read_weight(model, name, path)

    folded: set[int] = set()
    gone: set[str] = set()
    params: set[str] = set()
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        producer = producers.get(bn.input[0])
        if producer is None or not _foldable(bn, producer, inits, consumers, outputs, graph_inputs):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (read(name) for name in bn.input[1:5])
        s, t = batchnorm_affine(scale, bias, mean, var, eps)
        if not _keeps_scale(s, producer.input[1]):
            continue
        if not _fold_into(producer, s, t, inits, read, graph):
            continue
        gone.add(producer.output[0])
        params.update(bn.input[1:5])
        producer.output[0] = bn.output[0]
        folded.add(id(bn))
    if folded:
        keep = [n for n in graph.node if id(n) not in folded]
        del graph.node[:]
        graph.node.extend(keep)
        _drop_unread(model, params, gone)
        log.info("folded %d BatchNormalization nodes into the layers before them", len(folded))
    return len(folded)


def _keeps_scale(s: np.ndarray, weight: str) -> bool:
    """Whether folding scales ``weight`` by a typical factor within `SCALE_MAX` either way; one
    log line when not."""
    typical = float(np.median(np.abs(s))) if s.size else 1.0
    if 1 / SCALE_MAX <= typical <= SCALE_MAX:
        return True
    log.info("BatchNormalization after %s left unfolded: it would scale the weights by about "
             "%.3g, out of the range one codebook shares with the other layers", weight,
             typical)  # fmt: skip
    return False


def _use_counts(model: onnx.ModelProto) -> Counter:
    """How many node inputs (in any graph, subgraphs included) read each name."""
    return Counter(name for g in all_graphs(model.graph) for n in g.node for name in n.input)


def _foldable(bn, producer, inits, consumers, outputs, graph_inputs) -> bool:
    training = next((a.i for a in bn.attribute if a.name == "training_mode"), 0)
    per_activation = next((a.i == 0 for a in bn.attribute if a.name == "spatial"), False)
    extra_outputs = any(name for name in bn.output[1:])
    params = bn.input[1:5]
    if training or per_activation or extra_outputs or len(params) != 4:
        return False
    if not all(p in inits and p not in graph_inputs for p in params):
        return False
    if producer.op_type not in PRODUCERS or producer.domain not in ("", "ai.onnx"):
        return False
    if len(producer.output) != 1 or consumers[bn.input[0]] != 1 or bn.input[0] in outputs:
        return False
    weight = producer.input[1] if len(producer.input) > 1 else ""
    if weight not in inits or inits[weight].data_type not in QUANTIZABLE_TYPES:
        return False
    bias = producer.input[2:3]  # the bias, if any
    return all(
        w == "" or (w in inits and w not in graph_inputs and consumers[w] == 1)
        for w in (weight, *bias)
    )


def _fold_into(producer, s, t, inits, read: _Read, graph) -> bool:
    """Scale ``producer``'s weight by ``s`` per output channel and add ``t`` to its bias, in
    place; False (nothing changed) where the shapes do not match one channel per entry."""
    w_name = producer.input[1]
    w = read(w_name)
    if s.ndim != 1:
        return False
    scaled = _scaled_weight(producer, w, s)
    if scaled is None:
        return False
    b_name = producer.input[2] if len(producer.input) > 2 else ""
    if producer.op_type == "Gemm":
        beta = _attr(producer, "beta", 1.0)
        bias = np.zeros(len(s)) if not b_name else beta * read(b_name).astype(np.float64)
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[1] != len(s)):
            return False
        try:
            new_bias = np.broadcast_to(bias, np.broadcast_shapes(bias.shape, s.shape)) * s + t
        except ValueError:
            return False
        _set_attr(producer, "beta", 1.0)
    else:
        bias = np.zeros(len(s)) if not b_name else read(b_name).astype(np.float64)
        if bias.shape != s.shape:
            return False
        new_bias = bias * s + t
    dtype = w.dtype
    inits[w_name].CopyFrom(numpy_helper.from_array(scaled.astype(dtype), w_name))
    if not b_name:
        b_name = _free_name(naming.folded_bias(producer.output[0]), inits)
        tensor = graph.initializer.add()
        inits[b_name] = tensor
        while len(producer.input) < 2:  # pragma: no cover - a Conv always has X and W
            producer.input.append("")
        producer.input.append(b_name)
    inits[b_name].CopyFrom(numpy_helper.from_array(new_bias.astype(dtype), b_name))
    return True


def _scaled_weight(producer, w: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """``w`` with every output channel ``o`` scaled by ``s[o]`` (float64), or None."""
    w64 = w.astype(np.float64)
    m = len(s)
    if producer.op_type == "Conv":
        if w.ndim < 1 or w.shape[0] != m:
            return None
        return w64 * s.reshape(-1, *([1] * (w.ndim - 1)))
    if producer.op_type == "ConvTranspose":  # W: C_in x C_out/group x k..., o = g C_out/group + j
        group = int(_attr(producer, "group", 1))
        if w.ndim < 2 or w.shape[0] % group or w.shape[1] * group != m:
            return None
        per = w.shape[1]
        grouped = w64.reshape(group, w.shape[0] // group, per, *w.shape[2:])
        factor = s.reshape(group, 1, per, *([1] * (w.ndim - 2)))
        return (grouped * factor).reshape(w.shape)
    # Gemm: Y = A B (B of K x M, or M x K with transB)
    if w.ndim != 2:
        return None
    if _attr(producer, "transB", 0):
        return w64 * s[:, None] if w.shape[0] == m else None
    return w64 * s[None, :] if w.shape[1] == m else None


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == onnx.AttributeProto.INT else a.f
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _free_name(base: str, taken) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _drop_unread(model: onnx.ModelProto, candidates: set[str], gone: set[str]) -> None:
    """Remove the initializers among ``candidates`` that nothing reads now, and the value_info
    of the values ``gone`` (no node makes them any more)."""
    read = {name for g in all_graphs(model.graph) for n in g.node for name in n.input}
    read |= {o.name for o in model.graph.output}
    graph = model.graph
    for field, drop in ((graph.initializer, candidates - read), (graph.value_info, gone)):
        kept = [item for item in field if item.name not in drop]
        del field[:]
        field.extend(kept)
