"""Rewrite weights into codebook-plus-index form behind custom ``onnxhq.Dequantize`` nodes.

Each quantized initializer ``W`` (float, shape S) is replaced by

    W = onnxhq.Dequantize(codebook, W.onnxhq_indices)

where ``codebook`` is a float initializer (k,) of W's dtype and the indices are uint8 (k <= 256) or
uint16, shape S. ``Dequantize`` is a model-local function whose body is ``Cast(indices -> int64)``
then ``Gather(codebook, axis=0)``, so any ONNX runtime runs it; onnxruntime inlines it and
constant-folds it when the session starts. Consumers of ``W`` are untouched.

Channel-group codebooks (G, k) are flattened and indexed with a per-row offset
(``DequantizeGrouped``, attribute ``group_size``), computed in the graph from ``Range``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import naming
from .errors import ModelError
from .model import initializer_map

FUNCTION_OPSET = 17


def index_dtype(alphabet_size: int) -> np.dtype:
    """Smallest unsigned type holding indices in [0, alphabet_size)."""
    if alphabet_size <= 256:
        return np.dtype(np.uint8)
    if alphabet_size <= 65536:
        return np.dtype(np.uint16)
    raise ModelError(f"codebooks of {alphabet_size} entries exceed the 65,536 that onnxhq stores")


def dequantize_function() -> onnx.FunctionProto:
    """``onnxhq.Dequantize(codebook (k,), indices uint S) -> codebook[indices] of shape S``."""
    nodes = [
        helper.make_node("Cast", ["indices"], ["idx64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "idx64"], ["weight"], axis=0),
    ]
    return helper.make_function(naming.DOMAIN, naming.DEQUANTIZE_OP, ["codebook", "indices"], ["weight"], nodes,
                                [helper.make_opsetid("", FUNCTION_OPSET)])


def dequantize_grouped_function() -> onnx.FunctionProto:
    """``onnxhq.DequantizeGrouped(codebook (G*k,), indices S, k) -> codebook[(row // group_size) * k + idx]``.

    Rows are axis 0 of the weight; ``k`` is an int64 scalar input, ``group_size`` an attribute.
    """
    group_size = helper.make_node("Constant", [], ["gs"])
    group_size.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="group_size",
                                                    type=onnx.AttributeProto.INT))
    nodes = [
        helper.make_node("Constant", [], ["zero"], value_int=0),
        helper.make_node("Constant", [], ["one"], value_int=1),
        helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
        helper.make_node("Constant", [], ["axis1"], value_ints=[1]),
        group_size,
        helper.make_node("Cast", ["indices"], ["idx64"], to=TensorProto.INT64),
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
        helper.make_node("Reshape", ["idx64", "shape2d"], ["idx2d"]),
        helper.make_node("Add", ["idx2d", "offset_col"], ["flat_idx"]),
        helper.make_node("Gather", ["codebook", "flat_idx"], ["values"], axis=0),
        helper.make_node("Reshape", ["values", "shape"], ["weight"]),
    ]
    return helper.make_function(naming.DOMAIN, "DequantizeGrouped", ["codebook", "indices", "k"], ["weight"],
                                nodes, [helper.make_opsetid("", FUNCTION_OPSET)], attributes=["group_size"])


def dequantized_value(codebook: np.ndarray, indices: np.ndarray, k: int | None = None,
                      group_size: int | None = None) -> np.ndarray:
    """What a dequantize node computes, in numpy: ``codebook[indices]``, per row group if grouped."""
    idx = indices.astype(np.int64)
    if group_size is None:
        return codebook[idx]
    rows = np.arange(idx.shape[0]) // group_size * k
    return codebook[(idx.reshape(idx.shape[0], -1) + rows[:, None])].reshape(idx.shape)


def rewrite(model: onnx.ModelProto, codebooks: Mapping[str, np.ndarray], tensors: Mapping[str, "TensorCodesLike"]
            ) -> onnx.ModelProto:
    """A copy of ``model`` with each weight in ``tensors`` in codebook + index form.

    ``codebooks``: key -> (k,) or (G, k) float values. ``tensors``: weight name -> object with
    ``codebook`` (key), ``indices`` (int array of the weight's shape) and ``group_size`` (None or
    rows per codebook row). Index tensors are initializers of the returned model.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = initializer_map(out)
    grouped = False
    used_codebooks: dict[str, int] = {}
    new_nodes, new_inits = [], []
    for name, codes in tensors.items():
        if name not in inits:
            raise ModelError(f"cannot rewrite {name!r}: it is not an initializer of the model")
        weight = inits[name]
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        book = np.asarray(codebooks[codes.codebook])
        if tuple(codes.indices.shape) != tuple(weight.dims):
            raise ModelError(f"indices of {name!r} have shape {codes.indices.shape}, the weight {tuple(weight.dims)}")
        cb_name = naming.codebook_tensor(codes.codebook) + ("" if dtype == np.float32 else f".{np.dtype(dtype).name}")
        if cb_name not in used_codebooks:
            used_codebooks[cb_name] = book.shape[-1]
            new_inits.append(numpy_helper.from_array(book.reshape(-1).astype(dtype), cb_name))
        idx_name = naming.index_tensor(name)
        new_inits.append(numpy_helper.from_array(codes.indices.astype(index_dtype(book.shape[-1])), idx_name))
        if codes.group_size is None or book.ndim == 1:
            node = helper.make_node(naming.DEQUANTIZE_OP, [cb_name, idx_name], [name], domain=naming.DOMAIN,
                                    name=naming.dequantize_node(name))
        else:
            grouped = True
            k_name = f"{cb_name}.k"
            if k_name not in {t.name for t in new_inits}:
                new_inits.append(numpy_helper.from_array(np.array(book.shape[-1], np.int64), k_name))
            node = helper.make_node("DequantizeGrouped", [cb_name, idx_name, k_name], [name], domain=naming.DOMAIN,
                                    name=naming.dequantize_node(name), group_size=int(codes.group_size))
        new_nodes.append(node)
    keep = [t for t in out.graph.initializer if t.name not in tensors]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep + new_inits)
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _add_functions(out, grouped)
    return out


def _add_functions(model: onnx.ModelProto, grouped: bool) -> None:
    have = {(f.domain, f.name) for f in model.functions}
    wanted = [dequantize_function()] + ([dequantize_grouped_function()] if grouped else [])
    for fn in wanted:
        if (fn.domain, fn.name) not in have:
            model.functions.append(fn)
    if not any(op.domain == naming.DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(naming.DOMAIN, 1))
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR >= 8


def dequantize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain float weights in place of every dequantize node (for ``decode --dequantize``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    dq_nodes = [n for n in out.graph.node if n.domain == naming.DOMAIN]
    values = {}
    for node in dq_nodes:
        book, idx = (numpy_helper.to_array(inits[i]) for i in node.input[:2])
        k = int(numpy_helper.to_array(inits[node.input[2]])) if len(node.input) > 2 else None
        group = next((a.i for a in node.attribute if a.name == "group_size"), None)
        values[node.output[0]] = dequantized_value(book, idx, k, group)
    others = [n for n in out.graph.node if n.domain != naming.DOMAIN]
    still_used = {i for n in others for i in n.input} | {o.name for o in out.graph.output}
    dq_inputs = {i for n in dq_nodes for i in n.input}
    keep = [t for t in out.graph.initializer if t.name not in dq_inputs or t.name in still_used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep + [numpy_helper.from_array(v, k) for k, v in values.items()])
    del out.graph.node[:]
    out.graph.node.extend(others)
    del out.functions[:]
    opsets = [o for o in out.opset_import if o.domain != naming.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    return out
