"""Rewrite weights into codebook-plus-index form behind custom ``onnxhq`` dequantize nodes.

Each quantized initializer ``W`` (float, shape S, n elements) is replaced by one of

    W = onnxhq.Dequantize(codebook, W.onnxhq_indices)               indices uint8/uint16, shape S
    W = onnxhq.DequantizePacked4(codebook, W.onnxhq_indices, shape)  indices uint8, (ceil(n/2),)
    W = onnxhq.DequantizeGrouped(codebook, W.onnxhq_indices, k)      channel-group codebooks

where ``codebook`` is a float initializer (k,) of W's dtype. Each op is a model-local function of
standard operators (Cast, Gather, ...), so any ONNX runtime runs it; onnxruntime inlines it and
constant-folds it when the session starts. Consumers of ``W`` are untouched.

**Packing.** With k <= 16 and at least `PACK_MIN_SIZE` elements, two indices share a byte: of n
indices, byte j holds index j in its low nibble and index m + j in its high nibble, m = ceil(n/2)
(0 pads an odd count). The logical shape is an int64 initializer ``shape``. Only the in-graph
storage is packed; the sidecar keeps one symbol per weight (`pack4`/`unpack4` convert). (onnxhq
0.3.0 interleaved the pairs, 2j and 2j + 1; its decoded files carry their own function bodies.)

**Session memory.** onnxruntime folds these functions into float initializers when the session
starts and keeps every tensor the folding makes until the pass ends, so each body is the shortest
chain of the narrowest types: the indices are cast to int32 (not int64) for Gather.

**Opsets.** A function's body imports the default-domain opset the *model* imports: the ONNX
checker accepts another version only where every body operator has the same schema at both, which
Cast and Gather (changed at 13) do not. The model's opset is never changed; the bodies are written
with operator forms whose signatures are the same from `MIN_OPSET` up to the newest opset (23).
Packing is skipped below opset 10 (Slice with inputs); channel groups need opset 15 (Range, Shape
slices) and are refused below it with the conversion to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import naming
from .errors import ModelError
from .model import default_opset, initializer_map

if TYPE_CHECKING:
    from .quantize import TensorCodes

#: Default opset of the function bodies (used when no model opset is given).
FUNCTION_OPSET = 17
GROUPED_OP = naming.GROUPED_OP
PACKED_OP = naming.PACKED_OP
#: Lowest default-domain opset each function body is valid at.
MIN_OPSET = {naming.DEQUANTIZE_OP: 6, PACKED_OP: 10, GROUPED_OP: 15}
#: Pack 4-bit indices for codebooks of at most this many entries ...
PACK_MAX_K = 16
#: ... in tensors of at least this many elements (below it the shape initializer and the longer
#: body outweigh the bytes saved).
PACK_MIN_SIZE = 64


def index_dtype(alphabet_size: int) -> np.dtype:
    """Smallest unsigned type holding indices in [0, alphabet_size)."""
    if alphabet_size <= 256:
        return np.dtype(np.uint8)
    if alphabet_size <= 65536:
        return np.dtype(np.uint16)
    raise ModelError(f"codebooks of {alphabet_size} entries exceed the 65,536 that onnxhq stores")


def pack4(indices: np.ndarray) -> np.ndarray:
    """Indices in [0, 16), flattened, two per byte: uint8 array (m,), m = ceil(n/2).

    Byte j holds index j in its low nibble and index m + j in its high nibble (0 pads an odd
    count): the two halves unpack with one ``Mod`` and one ``BitShift`` and join with one
    ``Concat``, without interleaving.
    """
    flat = np.asarray(indices).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > 15):
        raise ModelError(
            f"4-bit packing needs indices in [0, 16), got values from {flat.min()} to {flat.max()}"
        )
    m = (flat.size + 1) // 2
    padded = np.zeros(2 * m, np.uint8)
    padded[: flat.size] = flat
    return padded[:m] | (padded[m:] << 4)


def unpack4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack4`: the uint8 indices of logical ``shape`` held in ``packed``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    n = int(np.prod(shape, dtype=np.int64))
    if packed.size != (n + 1) // 2:
        raise ModelError(
            f"{packed.size} packed bytes cannot hold a tensor of shape {tuple(shape)} "
            f"({n} indices need {(n + 1) // 2})"
        )
    flat = np.concatenate([packed & 15, packed >> 4])
    return flat[:n].reshape(tuple(int(d) for d in shape))


def _function(
    name: str,
    inputs: list[str],
    nodes: list[onnx.NodeProto],
    opset: int,
    attributes: tuple[str, ...] = (),
) -> onnx.FunctionProto:
    if opset < MIN_OPSET[name]:
        raise ModelError(
            f"onnxhq.{name} needs default-domain opset >= {MIN_OPSET[name]}, got {opset}; "
            "convert the model first "
            f"(onnx.version_converter.convert_version(model, {FUNCTION_OPSET}))"
        )
    return helper.make_function(
        naming.DOMAIN,
        name,
        inputs,
        ["weight"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(attributes),
    )


def _const(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=numpy_helper.from_array(value, output))


def dequantize_function(opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """``onnxhq.Dequantize(codebook (k,), indices uint S) -> codebook[indices] of shape S``;
    opset >= 6."""
    nodes = [
        helper.make_node("Cast", ["indices"], ["idx"], to=TensorProto.INT32),
        helper.make_node("Gather", ["codebook", "idx"], ["weight"], axis=0),
    ]
    return _function(naming.DEQUANTIZE_OP, ["codebook", "indices"], nodes, opset)


def dequantize_packed4_function(opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """``onnxhq.DequantizePacked4(codebook (k,), packed uint8 (m,), shape int64 (r,))``;
    opset >= 10.

    Returns ``codebook[unpack4(packed, shape)]``. onnxruntime keeps every tensor its constant
    folding makes until the pass ends, so the body is a short chain of byte-sized steps: the
    nibbles split with ``Mod 16`` and ``BitShift 4`` (opset 11) and join with one Concat; only
    the final Cast (int32) and Gather make tensors of the weight's size. At opset 10 (no
    BitShift) a constant table maps each byte value to its two codebook values instead. Slice
    drops the odd padding; its inputs form (opset 10) is why packing needs opset 10 (Compress,
    valid at 9, is not constant-folded by recent onnxruntime releases).
    """
    nodes = [
        _const("zero", np.array([0], np.int64)),
        helper.make_node("ReduceProd", ["shape"], ["n"], keepdims=1),
    ]
    if opset < 11:
        byte = np.arange(256, dtype=np.int32)
        nodes += [
            _const("nibbles", np.stack([byte & 15, byte >> 4], axis=1)),
            _const("sixteen", np.array([16], np.int64)),
            _const("flat", np.array([-1], np.int64)),
            helper.make_node("Tile", ["codebook", "sixteen"], ["book16"]),
            helper.make_node("Gather", ["book16", "nibbles"], ["table"], axis=0),
            helper.make_node("Cast", ["packed"], ["bytes"], to=TensorProto.INT32),
            helper.make_node("Gather", ["table", "bytes"], ["pairs"], axis=0),
            helper.make_node("Transpose", ["pairs"], ["halves"], perm=[1, 0]),
            helper.make_node("Reshape", ["halves", "flat"], ["padded"]),
            helper.make_node("Slice", ["padded", "zero", "n"], ["values"]),
            helper.make_node("Reshape", ["values", "shape"], ["weight"]),
        ]
        return _function(PACKED_OP, ["codebook", "packed", "shape"], nodes, opset)
    nodes += [
        _const("four", np.array([4], np.uint8)),
        _const("sixteen", np.array([16], np.uint8)),
        helper.make_node("Mod", ["packed", "sixteen"], ["low"]),
        helper.make_node("BitShift", ["packed", "four"], ["high"], direction="RIGHT"),
        helper.make_node("Concat", ["low", "high"], ["padded"], axis=0),
        helper.make_node("Slice", ["padded", "zero", "n"], ["flat_idx"]),
        helper.make_node("Reshape", ["flat_idx", "shape"], ["idx8"]),
        helper.make_node("Cast", ["idx8"], ["idx"], to=TensorProto.INT32),
        helper.make_node("Gather", ["codebook", "idx"], ["weight"], axis=0),
    ]
    return _function(PACKED_OP, ["codebook", "packed", "shape"], nodes, opset)


def dequantize_grouped_function(opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    """``onnxhq.DequantizeGrouped(codebook (G*k,), indices S, k)``: the weight
    ``codebook[(row // group_size) * k + idx]``.

    Rows are axis 0 of the weight; ``k`` is an int64 scalar input, ``group_size`` an attribute.
    Opset >= 15.
    """
    group_size = helper.make_node("Constant", [], ["gs"])
    group_size.attribute.append(
        onnx.AttributeProto(
            name="value_int", ref_attr_name="group_size", type=onnx.AttributeProto.INT
        )
    )
    nodes = [
        helper.make_node("Constant", [], ["zero"], value_int=0),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
        helper.make_node("Constant", [], ["axis1"], value_ints=[1]),
        group_size,
        helper.make_node("Cast", ["indices"], ["idx"], to=TensorProto.INT32),
        helper.make_node("Shape", ["indices"], ["shape"]),
        helper.make_node("Shape", ["indices"], ["rows"], start=0, end=1),
        helper.make_node("Squeeze", ["rows"], ["n_rows"]),
        helper.make_node("Range", ["zero", "n_rows", "one"], ["row"]),
        helper.make_node("Div", ["row", "gs"], ["group"]),
        helper.make_node("Mul", ["group", "k"], ["offset"]),
        helper.make_node("Unsqueeze", ["offset", "axis1"], ["offset_col"]),
        helper.make_node("Size", ["indices"], ["numel"]),
        helper.make_node("Div", ["numel", "n_rows"], ["per_row"]),
        helper.make_node("Unsqueeze", ["per_row", "axis0"], ["per_row1"]),
        helper.make_node("Concat", ["rows", "per_row1"], ["shape2d"], axis=0),
        helper.make_node("Reshape", ["idx", "shape2d"], ["idx2d"]),
        helper.make_node("Cast", ["offset_col"], ["offset32"], to=TensorProto.INT32),
        helper.make_node("Add", ["idx2d", "offset32"], ["flat_idx"]),
        helper.make_node("Gather", ["codebook", "flat_idx"], ["values"], axis=0),
        helper.make_node("Reshape", ["values", "shape"], ["weight"]),
    ]
    return _function(
        GROUPED_OP, ["codebook", "indices", "k"], nodes, opset, attributes=("group_size",)
    )


_FUNCTIONS = {
    naming.DEQUANTIZE_OP: dequantize_function,
    PACKED_OP: dequantize_packed4_function,
    GROUPED_OP: dequantize_grouped_function,
}


def dequantized_value(
    codebook: np.ndarray, indices: np.ndarray, k: int | None = None, group_size: int | None = None
) -> np.ndarray:
    """What a dequantize node computes, in numpy: ``codebook[indices]``, per row group if
    grouped."""
    idx = indices.astype(np.int64)
    if group_size is None:
        return codebook[idx]
    if k is None:
        raise ModelError(f"grouped codebooks (group_size={group_size}) need the row length k")
    rows = np.arange(idx.shape[0]) // group_size * k
    return codebook[(idx.reshape(idx.shape[0], -1) + rows[:, None])].reshape(idx.shape)


def node_codes(
    node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """``(codebook, logical indices, k, group_size)`` of a dequantize node whose inputs are
    initializers."""
    book = numpy_helper.to_array(inits[node.input[0]])
    stored = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == PACKED_OP:
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[2]]))
        return book, unpack4(stored, shape), int(book.size), None
    if node.op_type == GROUPED_OP:
        group = next(a.i for a in node.attribute if a.name == "group_size")
        return book, stored, int(numpy_helper.to_array(inits[node.input[2]])), int(group)
    return book, stored, int(book.size), None


def index_facts(
    node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]
) -> tuple[tuple[int, ...], int]:
    """``(logical shape, k)`` of a dequantize node's indices, read from the initializers' dims and
    the small shape or k initializer, without reading (or unpacking) the indices themselves."""
    book, stored = inits[node.input[0]], inits[node.input[1]]
    if node.op_type == PACKED_OP:
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[2]]).reshape(-1))
        return shape, int(np.prod(book.dims, dtype=np.int64))
    if node.op_type == GROUPED_OP:
        return tuple(int(d) for d in stored.dims), int(numpy_helper.to_array(inits[node.input[2]]))
    return tuple(int(d) for d in stored.dims), int(np.prod(book.dims, dtype=np.int64))


def rewrite(
    model: onnx.ModelProto,
    codebooks: Mapping[str, np.ndarray],
    tensors: Mapping[str, TensorCodes],
    *,
    pack: bool = True,
    indices: bool = True,
) -> onnx.ModelProto:
    """A copy of ``model`` with each weight in ``tensors`` in codebook + index form.

    Without ``indices`` the index initializers are declared (name, type, dims) but hold no data:
    the compressed graph leaves them out anyway, and a streamed compress codes them one at a time.

    ``codebooks``: key -> (k,) or (G, k) float values. ``tensors``: weight name -> object with
    ``codebook`` (key), ``indices`` (int array of the weight's shape) and ``group_size`` (None or
    rows per codebook row). Index tensors are initializers of the returned model; with ``pack``,
    those of k <= 16 and at least `PACK_MIN_SIZE` elements hold two indices per byte (model
    opset >= 10).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = default_opset(out)
    inits = initializer_map(out)
    used_ops: set[str] = set()
    new_inits: dict[str, onnx.TensorProto] = {}
    new_nodes = []
    for name, codes in tensors.items():
        if name not in inits:
            raise ModelError(f"cannot rewrite {name!r}: it is not an initializer of the model")
        weight = inits[name]
        if tuple(codes.indices.shape) != tuple(weight.dims):
            raise ModelError(
                f"indices of {name!r} have shape {codes.indices.shape}, "
                f"the weight {tuple(weight.dims)}"
            )
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        book = np.asarray(codebooks[codes.codebook])
        cb_name = naming.codebook_tensor(codes.codebook) + (
            "" if dtype == np.float32 else f".{np.dtype(dtype).name}"
        )
        if cb_name not in new_inits:
            new_inits[cb_name] = numpy_helper.from_array(book.reshape(-1).astype(dtype), cb_name)
        node = _dequantize_node(name, cb_name, book, codes, opset, pack, new_inits, indices)
        used_ops.add(node.op_type)
        new_nodes.append(node)
    clash = sorted(set(new_inits) & (set(inits) - set(tensors)))
    if clash:
        raise ModelError(
            f"the model already has an initializer named {clash[0]!r}; rename it before compressing"
        )
    keep = [t for t in out.graph.initializer if t.name not in tensors]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep + list(new_inits.values()))
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _add_functions(out, used_ops, opset)
    return out


def _dequantize_node(
    name, cb_name, book, codes, opset, pack, new_inits, values=True
) -> onnx.NodeProto:
    """The node computing weight ``name``; adds its index (and shape or k) initializers to
    ``new_inits``."""
    idx_name, k, size = naming.index_tensor(name), book.shape[-1], codes.indices.size
    node_name = naming.dequantize_node(name)
    if codes.group_size is not None and book.ndim > 1:
        if opset < MIN_OPSET[GROUPED_OP]:
            raise ModelError(
                f"channel-group codebooks need opset >= {MIN_OPSET[GROUPED_OP]} and the model "
                f"imports opset {opset}; convert it (onnx.version_converter.convert_version(model, "
                f"{FUNCTION_OPSET})) or use scope 'network' or 'layer'"
            )
        new_inits[idx_name] = _index_init(idx_name, codes.indices, index_dtype(k), values)
        k_name = naming.codebook_size_tensor(cb_name)
        new_inits.setdefault(k_name, numpy_helper.from_array(np.array(k, np.int64), k_name))
        return helper.make_node(
            GROUPED_OP,
            [cb_name, idx_name, k_name],
            [name],
            domain=naming.DOMAIN,
            name=node_name,
            group_size=int(codes.group_size),
        )
    if pack and k <= PACK_MAX_K and size >= PACK_MIN_SIZE and opset >= MIN_OPSET[PACKED_OP]:
        shape = tuple(int(d) for d in codes.indices.shape)
        shape_name = naming.shape_tensor(shape)
        new_inits[idx_name] = _index_init(idx_name, codes.indices, None, values)
        new_inits.setdefault(
            shape_name, numpy_helper.from_array(np.array(shape, np.int64), shape_name)
        )
        return helper.make_node(
            PACKED_OP, [cb_name, idx_name, shape_name], [name], domain=naming.DOMAIN, name=node_name
        )
    new_inits[idx_name] = _index_init(idx_name, codes.indices, index_dtype(k), values)
    return helper.make_node(
        naming.DEQUANTIZE_OP, [cb_name, idx_name], [name], domain=naming.DOMAIN, name=node_name
    )


def _index_init(name: str, indices, dtype: np.dtype | None, values: bool) -> onnx.TensorProto:
    """The index initializer of ``indices``: as ``dtype``, or packed 4-bit when None; without
    ``values`` only declared (no data)."""
    if values:
        return numpy_helper.from_array(
            pack4(indices) if dtype is None else indices.astype(dtype), name
        )
    dims = [(indices.size + 1) // 2] if dtype is None else list(indices.shape)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.uint8 if dtype is None else dtype))
    return onnx.TensorProto(name=name, data_type=elem, dims=dims)


def _add_functions(model: onnx.ModelProto, ops: set[str], opset: int) -> None:
    have = {(f.domain, f.name) for f in model.functions}
    for op in sorted(ops):
        if (naming.DOMAIN, op) not in have:
            model.functions.append(_FUNCTIONS[op](opset))
    if not any(op.domain == naming.DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(naming.DOMAIN, 1))
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR >= 8


def attach_functions(model: onnx.ModelProto) -> None:
    """Add, in place, the onnxhq function definitions that the model's nodes use and it lacks.

    The compressed graph file leaves them out (they are onnxhq's own, fixed for a format version,
    and would cost ~3 kB per file); `decode` puts them back.
    """
    ops = {n.op_type for n in model.graph.node if n.domain == naming.DOMAIN}
    _add_functions(model, ops, default_opset(model))


def detach_functions(model: onnx.ModelProto) -> None:
    """Remove, in place, the onnxhq function definitions (the inverse of `attach_functions`)."""
    keep = [f for f in model.functions if f.domain != naming.DOMAIN]
    del model.functions[:]
    model.functions.extend(keep)


def drop_onnxhq_domain(model: onnx.ModelProto) -> None:
    """Remove, in place, the onnxhq function definitions and opset import (for a model that no
    longer has onnxhq nodes)."""
    detach_functions(model)
    opsets = [o for o in model.opset_import if o.domain != naming.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def dequantize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain float weights in place of every dequantize node (for ``decode --dequantize``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = initializer_map(out)
    dq_nodes = [n for n in out.graph.node if n.domain == naming.DOMAIN]
    values = {}
    for node in dq_nodes:
        book, idx, k, group = node_codes(node, inits)
        values[node.output[0]] = dequantized_value(book, idx, k, group)
    others = [n for n in out.graph.node if n.domain != naming.DOMAIN]
    still_used = {i for n in others for i in n.input} | {o.name for o in out.graph.output}
    dq_inputs = {i for n in dq_nodes for i in n.input}
    keep = [t for t in out.graph.initializer if t.name not in dq_inputs or t.name in still_used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(
        keep + [numpy_helper.from_array(v, name) for name, v in values.items()]
    )
    del out.graph.node[:]
    out.graph.node.extend(others)
    drop_onnxhq_domain(out)
    return out
