"""Lower a decoded model's codebook lookups to onnxruntime's native low-bit forms.

A decoded model reads each quantized weight through an onnxhq dequantize function (`rewrite`):
any codebook, folded into a float initializer when the session starts (`TARGETS` ``gather``;
``gather-unpacked`` is the same with a byte per index where the file packs two, which folds
with far less memory).
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
    converted with onnx's version converter when older).

In both, where the installed onnxruntime runs them (`onnxhq.native_contrib`), a weight that only
MatMul (or a plain Gemm) reads becomes ``MatMulNBits`` (int4 only, a scale and zero point per
block of K: per-row-group grids become block scales; int8 stays DequantizeLinear, which
onnxruntime's optimizer itself fuses with MatMul into its int8-compute MatMulNBits), and an
embedding table that only Gather reads becomes ``GatherBlockQuantized``; any other weight, or one
whose row groups do not fit the blocks, stays ``DequantizeLinear`` (per tensor, not per model).

The levels are the grid's own integers, so the native model computes the weights the ``gather``
model does, up to float rounding of ``scale * level``. A codebook off the grid (the uniform
quantizer's default cell values are the cells' weighted means, ``compress --cell-value grid``
puts the grid points there instead; k-means) is refused with one line: its values cannot be
written as scale times an integer.

`supplied_weights` serves ``onnxhq.InferenceSession``: the weights dequantized in numpy and
handed to onnxruntime in memory, so that no constant folding runs at session start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import naming
from . import native_contrib as contrib
from .errors import ConfigError, ModelError
from .model import default_opset, initializer_map
from .options.vocabulary import DECODE_TARGETS
from .rewrite import (
    PACKED_OP,
    attach_functions,
    dequantized_value,
    detach_functions,
    drop_onnxhq_domain,
    node_codes,
)

log = logging.getLogger(__name__)

#: Forms `lower` writes: onnxhq's lookup functions, or DequantizeLinear of 8- or 4-bit levels.
TARGETS = DECODE_TARGETS
#: Lowest default-domain opset of each native form (per tensor, per row).
MIN_OPSET = {"int8": (10, 13), "int4": (21, 21)}
_BITS = {"int8": 8, "int4": 4}
#: The gather form with a byte per index (no 4-bit packing).
UNPACKED = "gather-unpacked"
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

    ``gather`` returns the model unchanged (a copy), ``gather-unpacked`` the same with its 4-bit
    packed index tensors unpacked to a byte per index (`_unpack`). For ``int8``/``int4``, a
    weight that only MatMul or a plain Gemm reads becomes ``MatMulNBits`` (int4), an embedding
    table that only Gather reads ``GatherBlockQuantized`` (`onnxhq.native_contrib`, where the
    installed onnxruntime runs them), every other weight ``DequantizeLinear``. ConfigError for an
    unknown target; ModelError when a codebook is off its grid, spans more levels than the target
    holds, or the model's opset is too old for the form and cannot be converted.
    """
    check_target(target)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if target == "gather":
        return out
    if target == UNPACKED:
        _unpack(out)
        return out
    inits = initializer_map(out)
    levels = {
        n.output[0]: _levels(n, inits, target) for n in out.graph.node if n.domain == naming.DOMAIN
    }
    bits = _BITS[target]
    forms = contrib.contrib_forms(out, levels, bits)
    if set(levels) - set(forms):
        grouped = any(lv.per_row for name, lv in levels.items() if name not in forms)
        need = MIN_OPSET[target][int(grouped)]
        if default_opset(out) < need:
            out = _convert(out, need, target)
    new_inits: dict[str, onnx.TensorProto] = {}
    nodes = []
    for node in out.graph.node:  # each onnxhq node: DequantizeLinear, or gone (read by contrib)
        if node.domain != naming.DOMAIN:
            nodes.append(node)
        elif node.output[0] not in forms:
            dq, tensors = _dequantize_linear(node.name, node.output[0], levels, target)
            nodes.append(dq)
            new_inits.update((t.name, t) for t in tensors)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    makers = {contrib.NBITS: contrib.matmul_nbits, contrib.GATHER: contrib.gather_block_quantized}
    made = contrib.replace_readers(
        out, forms, lambda node, weight: makers[forms[weight]](node, levels[weight], bits)
    )
    new_inits.update(made)
    _drop_unused(out, list(new_inits.values()))
    log.info("lowered %d weights to %s (%d as MatMulNBits, %d as GatherBlockQuantized)",
             len(levels), target, sum(f == contrib.NBITS for f in forms.values()),
             sum(f == contrib.GATHER for f in forms.values()))  # fmt: skip
    return out


#: The external-data location of the weights `supplied_weights` hands to onnxruntime in memory.
SUPPLIED_LOCATION = "onnxhq-supplied-in-memory"


def supplied_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``(skeleton, weights)`` of decoded ``model`` for a session that gets its weights in memory:
    each dequantize node's weight computed in numpy, and a copy of the model without the nodes,
    codebooks and indices, whose initializer of that name is an external-data placeholder (no
    bytes) that ``SessionOptions.add_external_initializers`` fills without a copy.

    onnxruntime would otherwise constant-fold each dequantize node when the session starts, and
    keep the folded tensor as a TensorProto beside the float buffer made from it.
    """
    inits = initializer_map(model)
    dq = [n for n in model.graph.node if n.domain == naming.DOMAIN]
    if not dq:
        return model, {}
    weights = {}
    for node in dq:
        book, idx, k, group = node_codes(node, inits)
        weights[node.output[0]] = dequantized_value(book, idx, k, group)
    drop = {i for n in dq for i in n.input}
    others = [n for n in model.graph.node if n.domain != naming.DOMAIN]
    drop -= {i for n in others for i in n.input} | {o.name for o in model.graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the indices are a byte per weight at most: a small copy
    del out.graph.node[:]
    out.graph.node.extend(others)
    keep = [t for t in out.graph.initializer if t.name not in drop]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for name, w in weights.items():
        t = out.graph.initializer.add(name=name, data_type=helper.np_dtype_to_tensor_dtype(w.dtype))
        t.dims.extend(w.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", SUPPLIED_LOCATION),
            ("offset", "0"),
            ("length", str(w.nbytes)),
        ):
            t.external_data.add(key=key, value=value)
    drop_onnxhq_domain(out)
    return out, weights


def _unpack(model: onnx.ModelProto) -> None:
    """Each 4-bit packed dequantize node of ``model`` as a plain one (uint8 indices), in place.

    onnxruntime constant-folds the packed body's unpacking steps too and keeps every tensor they
    make until the pass ends: on the OCR recognizer the packed form's session peaked 8 MB above
    the float model's, the unpacked form's 1 MB (tools/RESULTS.md)."""
    inits = initializer_map(model)
    packed = [n for n in model.graph.node if n.op_type == PACKED_OP and n.domain == naming.DOMAIN]
    for node in packed:
        _, idx, _, _ = node_codes(node, inits)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(idx.astype(np.uint8), node.input[1]))
        node.op_type = naming.DEQUANTIZE_OP
        del node.input[2:]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    detach_functions(model)
    attach_functions(model)
    log.info("unpacked %d 4-bit index tensors", len(packed))


@dataclass(frozen=True)
class _Levels:
    """A weight as grid levels: the weight is ``q * scale``, stored as ``q + zero`` (unsigned
    grids; 0 for signed ones). ``scale`` and ``zero`` hold one entry per group of ``group`` rows
    (axis 0), or one for the tensor when ``group`` is None."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    signed: bool
    group: int | None

    @property
    def per_row(self) -> bool:
        return self.group is not None

    def rows(self, values: np.ndarray) -> np.ndarray:
        """``values`` (one per group) as one per row, or the tensor's one as a scalar."""
        if self.group is None:
            return values.reshape(())
        return values[np.arange(self.q.shape[0]) // self.group]


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
            "gather (or compress with --cell-value grid)"
        )
    levels = np.stack([g[1] for g in found])  # (G, k)
    scales = np.array([g[0] for g in found], np.float32)
    if group is not None:
        owner = np.arange(idx.shape[0]) // group
        q = levels[owner.reshape((-1,) + (1,) * (idx.ndim - 1)), idx]
        rows = q.reshape(q.shape[0], -1)
        starts = np.arange(0, q.shape[0], group)
        lo, hi = np.minimum.reduceat(rows.min(1), starts), np.maximum.reduceat(rows.max(1), starts)
    else:
        q = levels[0][idx]
        lo, hi = (np.array([q.min()]), np.array([q.max()])) if q.size else (np.zeros(1),) * 2
    bits = _BITS[target]
    half = 2 ** (bits - 1)
    signed = bool(np.all(lo >= -half) and np.all(hi < half))
    zero = np.zeros(lo.shape, np.int64) if signed else np.maximum(0, -lo).astype(np.int64)
    wide = np.flatnonzero(hi + zero >= 2**bits)
    if not signed and wide.size:
        g = int(wide[0])
        where = f" (rows of group {g})" if group is not None else ""
        raise ModelError(
            f"the codebook of {weight!r} spans grid levels {int(lo[g])} to {int(hi[g])}{where}, "
            f"more than the {2**bits} of {target}; use --target gather or a lower rate"
        )
    return _Levels(q, scales, zero, signed, group)


def _dequantize_linear(node_name: str, weight: str, levels: dict[str, _Levels], target: str):
    """``DequantizeLinear`` computing ``weight`` from its levels, and its initializers."""
    lv = levels[weight]
    base = naming.index_tensor(weight)
    names = (base, f"{base}.scale", f"{base}.zero_point")
    elem = _ELEM[(target, lv.signed)]
    tensors = [
        _int_tensor(names[0], lv.q + lv.rows(lv.zero).reshape((-1,) + (1,) * (lv.q.ndim - 1))
                    if lv.per_row else lv.q + lv.rows(lv.zero), elem),
        numpy_helper.from_array(lv.rows(lv.scale), names[1]),
        _int_tensor(names[2], np.asarray(lv.rows(lv.zero), np.int64), elem),
    ]  # fmt: skip
    dq = helper.make_node("DequantizeLinear", list(names), [weight], name=node_name)
    if lv.per_row:
        dq.attribute.append(helper.make_attribute("axis", 0))
    return dq, tensors


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
