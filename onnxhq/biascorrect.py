"""Bias correction after error-compensated quantization (part of ``compress --compensate``).

Quantizing ``W`` to ``Q`` shifts a layer's mean output by ``(W - Q) E[x]``; adding that to the
layer's bias puts its mean output on the calibration data (float inputs) back where the float
model had it, per output channel. ``E[x]`` is the mean row of the layer's input matrix
(`onnxhq.layerwise.LayerHessian.mean`: Conv through its im2col view, zero padding included),
gathered with ``H``. Only a Conv or Gemm whose bias is a float initializer of its own (read by that
node alone) is corrected; the others are left as they are.

A bias that is quantized too (``include_biases``) is the column of ``[W | b]`` whose input is the
constant 1 (``H`` of ``[x; 1]`` is ``[[H, m], [m^T, 1]]``, ``m = E[x]``), and it takes part in the
walk twice. First (`absorb_bias_errors`), its plain rounding error ``e = b - b_q`` is handed to
the weights as OBQ hands a rounded column's error to the others: ``W' = W + e m^T H^-1``
minimises ``E |(W - W') x + e|^2``, so ``E |(W - Q) x + e|^2 = E |(W' - Q) x|^2 + const`` and
compensating towards ``W'`` with ``H`` is compensating the layer with its rounded bias. Last
(`correct_quantized_biases`), given the quantized weights, it is corrected in float by ``(W - Q)
E[x]`` (the ``b'`` that minimises ``E |(W - Q) x + b - b'|^2``) and quantized again, like a last
column. The final correction alone does little where a bias's own rounding dwarfs it.

Measured on ResNet-32 (BN-folded, tools/RESULTS.md): compensated per-layer codebooks at 2.5
target bits, float biases, 92.44 % -> 92.55 %; with the biases quantized too, 90.11 % (neither
step) -> 90.02 % (final correction only) -> 92.26 % (both). Correcting the means of the
*quantized* network's outputs instead (empirical correction, all layers at once or one by one)
lost accuracy there.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .layerwise import DAMP, LayerHessian, from_view, inverse_cholesky, matrix_view
from .model import initializer_map, read_initializers, replace_initializers
from .quantize.codes import QuantizedWeights, TensorCodes
from .quantize.guard import measure_errors

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: `onnxhq.quantize.quantize_weights` with the method and rate the codes were made with bound
#: (``functools.partial``); called with the tensors, importances, ``scope``, ``group_size`` and
#: ``guard``.
Quantizer = Callable[..., QuantizedWeights]

__all__ = [
    "Quantizer",
    "absorb_bias_errors",
    "bias_shifts",
    "correct_biases",
    "correct_quantized_biases",
    "corrected_biases",
]


def bias_shifts(
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
) -> dict[str, np.ndarray]:
    """weight name -> ``(W - Q) E[x]`` per output (float64), for the weights whose ``H`` has a
    mean."""
    out = {}
    for name in sorted(set(hessians) & set(quantized.tensors)):
        lh = hessians[name]
        if lh.mean is None:
            continue
        err = np.asarray(weights[name], np.float64) - quantized.dequantize(name).astype(np.float64)
        out[name] = np.einsum("grd,gd->gr", matrix_view(err, lh), lh.mean).reshape(-1)
    return out


def corrected_biases(
    proto: onnx.ModelProto,
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
) -> dict[str, np.ndarray]:
    """bias name -> its float value in ``proto`` plus `bias_shifts` (the bias's dtype), for each
    correctable bias, quantized or not."""
    shifts = bias_shifts(quantized, weights, hessians)
    targets = {b: w for b, w in _pairs(proto, hessians).items() if w in shifts}
    biases = read_initializers(proto, list(targets))
    values = {}
    for b, w in sorted(targets.items()):
        bias = biases[b]
        if bias.dtype.kind != "f" or bias.size != shifts[w].size:
            continue
        values[b] = (bias.astype(np.float64) + shifts[w].reshape(bias.shape)).astype(bias.dtype)
    return values


def absorb_bias_errors(
    proto: onnx.ModelProto,
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
    *,
    damp: float = DAMP,
) -> dict[str, np.ndarray]:
    """``weights`` with each weight whose correctable bias is among ``quantized``'s tensors moved
    to absorb that bias's rounding error ``e = b - b_q``: ``W + e (H^-1 m)^T`` per group (``H``
    dampened as `onnxhq.layerwise.inverse_cholesky` does; block by block where ``H`` is
    block-diagonal). The weights to compensate towards (`onnxhq.compensate`); the others are the
    same arrays. Pruned weights cannot move, so in a pruned layer the absorption is partial: the
    final correction (`correct_quantized_biases`) sees what is left.
    """
    out = dict(weights)
    for b, w in sorted(_pairs(proto, hessians).items()):
        if b not in quantized.tensors or w not in weights:
            continue
        lh = hessians[w]
        assert lh.mean is not None  # _pairs
        err = np.asarray(weights[b], np.float64) - quantized.dequantize(b).astype(np.float64)
        view = matrix_view(np.asarray(weights[w], np.float64), lh)
        if err.size != view.shape[0] * view.shape[1]:
            continue
        z, start = [], 0
        for block in lh.blocks:  # U^T U = (H + damp)^-1, so H^-1 m = U^T (U m)
            u = inverse_cholesky(block, damp)
            m = lh.mean[:, start : start + block.shape[-1]]
            z.append(np.einsum("gji,gj->gi", u, np.einsum("gij,gj->gi", u, m)))
            start += block.shape[-1]
        view = view + err.reshape(view.shape[:2])[:, :, None] * np.concatenate(z, 1)[:, None, :]
        out[w] = from_view(view, np.shape(weights[w]), lh).astype(np.asarray(weights[w]).dtype)
    return out


def correct_biases(
    proto: onnx.ModelProto,
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` with each correctable float bias plus `bias_shifts`, and the biases
    changed (sorted). Biases that are quantized too are left to `correct_quantized_biases`."""
    values = {
        b: v
        for b, v in corrected_biases(proto, quantized, weights, hessians).items()
        if b not in quantized.tensors
    }
    if values:
        log.info("bias correction: %d biases moved by (W - Q) E[x]", len(values))
    return (replace_initializers(proto, values) if values else proto), sorted(values)


def correct_quantized_biases(
    proto: onnx.ModelProto,
    quantized: QuantizedWeights,
    weights: Mapping[str, np.ndarray],
    hessians: Mapping[str, LayerHessian],
    *,
    importances: Mapping[str, np.ndarray] | None,
    quantize: Quantizer,
) -> tuple[QuantizedWeights, list[str]]:
    """``quantized`` with each correctable bias among its tensors quantized again from its
    corrected float value (`corrected_biases`), and those biases (sorted).

    A bias with a codebook of its own (layer or channel-group scope, or one the guard gave it)
    gets that codebook made again by ``quantize`` at its own scope, under the same key: a codebook
    fit to the uncorrected values could not hold the shift. A bias sharing a codebook with weights
    takes its nearest codeword there: of the codewords, the one that minimises the layer's
    ``E |(W - Q) x + b - b_q|^2`` (the codebook stays as the weights' refit left it, which the
    correction assumes; a bias is a negligible share of its indices, so the rate term is left
    out). Errors are measured again against ``weights`` (the float ones).
    """
    values = {
        b: v
        for b, v in corrected_biases(proto, quantized, weights, hessians).items()
        if b in quantized.tensors
    }
    if not values:
        return quantized, []
    users = Counter(t.codebook for t in quantized.tensors.values())
    books, tensors = dict(quantized.codebooks), dict(quantized.tensors)
    for name, value in sorted(values.items()):
        codes = quantized.tensors[name]
        if users[codes.codebook] == 1:
            books[codes.codebook], tensors[name] = _quantize_alone(
                name, value, codes, importances, quantize
            )
        else:
            tensors[name] = replace(codes, indices=_nearest(value, codes, books[codes.codebook]))
    out = replace(quantized, codebooks=books, tensors=tensors)
    out = replace(out, errors=measure_errors(weights, out))
    log.info("bias correction: %d quantized biases moved by (W - Q) E[x], then quantized",
             len(values))  # fmt: skip
    return out, sorted(values)


def _quantize_alone(
    name: str,
    value: np.ndarray,
    codes: TensorCodes,
    importances: Mapping[str, np.ndarray] | None,
    quantize: Quantizer,
) -> tuple[np.ndarray, TensorCodes]:
    """(codebook, codes) of ``value`` in a codebook of its own, stored under ``codes.codebook``."""
    scope = "layer" if codes.group_size is None else "channel-group"
    qw = quantize(
        {name: value},
        None if importances is None else {name: importances[name]},
        scope=scope,
        group_size=codes.group_size,
        guard="off",
    )
    new = qw.tensors[name]
    return qw.codebooks[new.codebook], replace(new, codebook=codes.codebook)


def _nearest(value: np.ndarray, codes: TensorCodes, book: np.ndarray) -> np.ndarray:
    """int32 indices of each entry's nearest codeword in its codebook row."""
    table = np.asarray(book, np.float64).reshape(-1, np.shape(book)[-1])
    v = np.asarray(value, np.float64).reshape(value.shape[0] if value.ndim else 1, -1)
    rows = np.zeros(v.shape[0], np.int64)
    if codes.group_size is not None:
        rows = np.arange(v.shape[0]) // codes.group_size
    dist = np.abs(v[:, :, None] - table[rows][:, None, :])
    return np.argmin(dist, axis=-1).reshape(codes.indices.shape).astype(np.int32)


def _pairs(proto: onnx.ModelProto, hessians: Mapping[str, LayerHessian]) -> dict[str, str]:
    """bias -> weight of each Conv or Gemm whose bias can be corrected: a float initializer read
    by that node alone, its weight read by it alone, with an ``H`` that has a mean; a Gemm's
    bias added as it is."""
    inits = initializer_map(proto)
    readers = Counter(name for node in proto.graph.node for name in node.input)
    out: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        w, b = node.input[1], node.input[2]
        if w not in hessians or hessians[w].mean is None or b not in inits:
            continue
        if readers[b] != 1 or readers[w] != 1:
            continue
        if node.op_type == "Gemm" and not _gemm_bias_is_per_output(node, hessians[w]):
            continue
        out[b] = w
    return out


def _gemm_bias_is_per_output(node: onnx.NodeProto, lh: LayerHessian) -> bool:
    """A Gemm ``alpha * A B + beta * C`` with beta 1 (the bias added as it is)."""
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)  # a float attribute
    return float(beta) == 1.0 and lh.groups == 1
