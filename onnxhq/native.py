"""Lower a decoded model's codebook lookups to onnxruntime's native low-bit forms.

A decoded model reads each quantized weight through an onnxhq dequantize function (`rewrite`):
any codebook, folded into a float initializer when the session starts (`TARGETS` ``gather``).
Where a codebook's values lie on a uniform grid through zero, ``codebook[i] = scale * level[i]``
with integer levels, the same weight is ``DequantizeLinear(levels, scale, zero_point)``, which
onnxruntime keeps in its integer form:

``int8``
    ``DequantizeLinear`` of an int8 (or uint8, with a zero point) tensor: one scale per tensor,
    or per row (axis 0) where channel-group codebooks have one grid per group of rows. Opset >= 10
    (per tensor), 13 (per row). onnxruntime does not fold DequantizeLinear into a float constant:
    the session keeps the integers (less memory than the float model, faster start) and
    dequantizes at each run (Conv weights then lose their prepacked kernels).
``int4``
    The same with int4/uint4 levels (two per byte in the file); opset >= 21 (the model is
    converted with onnx's version converter when older). A weight only MatMul reads, as its second
    input, on one signed grid, becomes onnxruntime's ``MatMulNBits`` (com.microsoft, 4 bits in
    blocks of 32 along K, its fp32 kernel) instead: onnxruntime's fast 4-bit matrix product.

The levels are the grid's own integers, so the native model computes the weights the ``gather``
model does, up to float rounding of ``scale * level``. A codebook off the grid (the uniform
quantizer's default cell values are the cells' weighted means; k-means) is refused with one line:
its values cannot be written as scale times an integer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import naming
from .errors import ConfigError, ModelError
from .model import default_opset, initializer_map
from .options.vocabulary import DECODE_TARGETS
from .rewrite import drop_onnxhq_domain, node_codes

log = logging.getLogger(__name__)

#: Forms `lower` writes: onnxhq's lookup functions, or DequantizeLinear of 8- or 4-bit levels.
TARGETS = DECODE_TARGETS
#: Lowest default-domain opset of each native form (per tensor, per row).
MIN_OPSET = {"int8": (10, 13), "int4": (21, 21)}
_BITS = {"int8": 8, "int4": 4}
#: onnxruntime's contrib domain, and the block length along K of the MatMulNBits it writes.
MS_DOMAIN = "com.microsoft"
NBITS_BLOCK = 32
#: Grids of finer levels are not looked for (a fine enough grid fits any values).
MAX_LEVEL = 1 << 16
_ELEM = {("int8", True): TensorProto.INT8, ("int8", False): TensorProto.UINT8,
         ("int4", True): TensorProto.INT4, ("int4", False): TensorProto.UINT4}  # fmt: skip


def grid_of(values: np.ndarray) -> tuple[np.float32, np.ndarray] | None:
    """``(scale, levels)`` with ``float32(levels) * scale`` equal to each of float32 ``values``
    (k,) up to a few units in its last place, levels within +-`MAX_LEVEL`; None when no such grid
    exists.

    The step is the closest pair's distance (adjacent occupied cells of a uniform grid) or a
    small fraction of it (cells left empty between every pair), refined by least squares over the
    integer levels. A lone value is its own scale.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    top = float(np.abs(v).max()) if v.size else 0.0
    if top == 0.0:
        return np.float32(1.0), np.zeros(v.size, np.int64)
    distinct = np.unique(np.concatenate([v, [0.0]]))
    closest = float(np.diff(distinct).min())
    for parts in range(1, 17):
        levels = np.round(v * parts / closest)
        if np.abs(levels).max() > MAX_LEVEL:
            break
        scale = np.float32(levels @ v / (levels @ levels))
        error = np.abs(levels.astype(np.float32) * scale - v)
        if np.all(error <= 4 * np.finfo(np.float32).eps * np.abs(v)):
            return scale, levels.astype(np.int64)
    return None


def check_target(target: str) -> None:
    """ConfigError unless ``target`` is one of `TARGETS`."""
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is not one of {', '.join(TARGETS)}")


def lower(model: onnx.ModelProto, target: str = "gather") -> onnx.ModelProto:
    """A copy of decoded ``model`` with each onnxhq dequantize node in ``target``'s form.

    ``gather`` returns the model unchanged (a copy). ConfigError for an unknown target;
    ModelError when a codebook is off its grid, spans more levels than the target holds, or the
    model's opset is too old for the form and cannot be converted.
    """
    check_target(target)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if target == "gather":
        return out
    inits = initializer_map(out)
    levels = {
        n.output[0]: _levels(n, inits, target) for n in out.graph.node if n.domain == naming.DOMAIN
    }
    nbits = _matmul_weights(out, levels) if target == "int4" else set()
    if set(levels) - nbits:
        grouped = any(lv.per_row for name, lv in levels.items() if name not in nbits)
        need = MIN_OPSET[target][int(grouped)]
        if default_opset(out) < need:
            out = _convert(out, need, target)
    new_inits: dict[str, onnx.TensorProto] = {}
    nodes = []
    for node in out.graph.node:
        if node.domain == naming.DOMAIN:
            if node.output[0] not in nbits:
                dq, tensors = _dequantize_linear(node.name, node.output[0], levels, target)
                nodes.append(dq)
                new_inits.update((t.name, t) for t in tensors)
        elif node.op_type == "MatMul" and node.input[1] in nbits:
            mm, tensors = _matmul_nbits(node, levels[node.input[1]])
            nodes.append(mm)
            new_inits.update((t.name, t) for t in tensors)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if nbits:
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused(out, list(new_inits.values()))
    log.info("lowered %d weights to %s (%d as MatMulNBits)", len(levels), target, len(nbits))
    return out


@dataclass(frozen=True)
class _Levels:
    """A weight as grid levels: the weight is ``q * scale``, stored as ``q + zero`` beside the
    zero point ``zero``; ``scale`` a scalar, or one per row (axis 0) when ``per_row``."""

    q: np.ndarray
    scale: np.ndarray
    zero: int
    signed: bool
    per_row: bool


def _levels(node, inits, target: str) -> _Levels:
    """The grid levels of ``node``'s weight; ModelError when its codebook is off a grid or the
    levels do not fit ``target``'s bits."""
    weight = node.output[0]
    book, idx, k, group = node_codes(node, inits)
    if book.dtype != np.float32:
        raise ModelError(
            f"--target {target} writes float32 scales; the codebook of {weight!r} is "
            f"{book.dtype}: use --target gather"
        )
    grids = [grid_of(r) for r in book.reshape(-1, k)]
    found = [g for g in grids if g is not None]
    if len(found) < len(grids):
        off = next(g for g, grid in enumerate(grids) if grid is None)
        raise ModelError(
            f"the codebook of {weight!r} ({k} values{f', group {off}' if group else ''}) is "
            f"not a uniform grid through 0, so --target {target} cannot write it; use --target "
            "gather (or compress with grid cell values)"
        )
    levels = np.stack([g[1] for g in found])  # (G, k)
    scales = np.array([g[0] for g in found], np.float32)
    if group is not None:
        owner = np.arange(idx.shape[0]) // group
        q, scale = levels[owner.reshape((-1,) + (1,) * (idx.ndim - 1)), idx], scales[owner]
    else:
        q, scale = levels[0][idx], scales[0]
    bits = _BITS[target]
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    signed = lo >= -(2 ** (bits - 1)) and hi < 2 ** (bits - 1)
    zero = 0 if signed else max(0, -lo)
    if not signed and not (zero < 2**bits and lo + zero >= 0 and hi + zero < 2**bits):
        raise ModelError(
            f"the codebook of {weight!r} spans grid levels {lo} to {hi}, more than the "
            f"{2**bits} of {target}; use --target gather or a lower rate"
        )
    return _Levels(q, np.asarray(scale, np.float32), zero, signed, group is not None)


def _dequantize_linear(node_name: str, weight: str, levels: dict[str, _Levels], target: str):
    """``DequantizeLinear`` computing ``weight`` from its levels, and its initializers."""
    lv = levels[weight]
    base = naming.index_tensor(weight)
    names = (base, f"{base}.scale", f"{base}.zero_point")
    elem = _ELEM[(target, lv.signed)]
    tensors = [
        _int_tensor(names[0], lv.q + lv.zero, elem),
        numpy_helper.from_array(lv.scale, names[1]),
        _int_tensor(names[2], np.full(lv.scale.shape, lv.zero, np.int64), elem),
    ]
    dq = helper.make_node("DequantizeLinear", list(names), [weight], name=node_name)
    if lv.per_row:
        dq.attribute.append(helper.make_attribute("axis", 0))
    return dq, tensors


def _matmul_weights(model: onnx.ModelProto, levels: dict[str, _Levels]) -> set[str]:
    """The weights `_matmul_nbits` can take: 2-D, one signed 4-bit grid, read only as the second
    input of MatMul nodes."""
    readers: dict[str, set[tuple[str, str, int]]] = {}
    for n in model.graph.node:
        for pos, name in enumerate(n.input):
            readers.setdefault(name, set()).add((n.op_type, n.domain, pos))
    outputs = {o.name for o in model.graph.output}
    return {
        name
        for name, lv in levels.items()
        if lv.q.ndim == 2
        and lv.signed
        and not lv.per_row
        and name not in outputs
        and readers.get(name, set()) == {("MatMul", "", 1)}
    }


def _matmul_nbits(matmul: onnx.NodeProto, lv: _Levels):
    """onnxruntime's ``MatMulNBits`` (4 bits, blocks of `NBITS_BLOCK` along K, one scale, levels
    stored + 8, its default zero point) in place of ``MatMul(A, W)``, and its initializers
    (shared by every MatMul of the same weight)."""
    k, n = lv.q.shape
    blocks = -(-k // NBITS_BLOCK)
    stored = np.full((n, blocks * NBITS_BLOCK), 8, np.uint8)  # padding rows are level 0
    stored[:, :k] = (lv.q.T + 8).astype(np.uint8)
    pairs = stored.reshape(n, blocks, NBITS_BLOCK // 2, 2)
    base = naming.index_tensor(matmul.input[1])
    tensors = [
        numpy_helper.from_array(pairs[..., 0] | (pairs[..., 1] << 4), f"{base}.nbits"),
        numpy_helper.from_array(np.full(n * blocks, lv.scale, np.float32), f"{base}.scales"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        [matmul.input[0], tensors[0].name, tensors[1].name],
        list(matmul.output),
        name=matmul.name,
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=4,
        block_size=NBITS_BLOCK,
    )
    return node, tensors


def _convert(model: onnx.ModelProto, opset: int, target: str) -> onnx.ModelProto:
    """``model`` converted to default-domain ``opset`` (the onnxhq nodes, which `lower` replaces,
    pass through; their function bodies are dropped)."""
    from onnx import version_converter

    log.info("--target %s: converting the model to opset %d", target, opset)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValueErrors
        raise ModelError(
            f"--target {target} needs opset >= {opset} and onnx could not convert the model "
            f"({str(exc).strip()[:120]}); use --target gather or int8"
        ) from None


def _int_tensor(name: str, values: np.ndarray, elem: int) -> onnx.TensorProto:
    """An 8- or 4-bit integer initializer (4-bit: two per byte, low nibble first, as ONNX packs
    INT4/UINT4)."""
    if elem in (TensorProto.INT8, TensorProto.UINT8):
        dtype = np.int8 if elem == TensorProto.INT8 else np.uint8
        return numpy_helper.from_array(values.astype(dtype), name)
    nibbles = (values.reshape(-1) & 15).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, elem, values.shape, packed.tobytes(), raw=True)


def _drop_unused(model: onnx.ModelProto, new_inits: list[onnx.TensorProto]) -> None:
    """Replace the initializers the lowered nodes no longer read by ``new_inits``; drop onnxhq's
    functions and opset import when no onnxhq node is left."""
    replaced = {t.name for t in new_inits}
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used and t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new_inits)
    if not any(n.domain == naming.DOMAIN for n in model.graph.node):
        drop_onnxhq_domain(model)
