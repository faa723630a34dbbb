"""onnxruntime's own low-bit operators (domain ``com.microsoft``) for `onnxhq.native`.

``MatMulNBits``
    ``MatMul(A, W)``, or a plain ``Gemm(A, W, bias)`` with ``transB=1``, with W stored as 4-bit
    levels in blocks along K, one scale and zero point per block and column: onnxruntime's
    fused low-bit matrix product (fp32 kernel).
``GatherBlockQuantized``
    ``Gather(E, ids)`` of an embedding table E (V, D) stored as 4- or 8-bit levels in blocks along
    D: only the gathered rows are dequantized, at each run.

`matmul_nbits_blocks` and `gather_block_quantized_blocks` write the same operators from block
grids (`onnxhq.blockgrid`, a scale and zero point per block and row: `onnxhq.lowbit`). The two
above take a weight on a grid of levels (`onnxhq.native` ``_Levels``): one scale for the tensor, or
one per group of rows (axis 0). Groups of rows are blocks along K for MatMulNBits of a MatMul
(a block must lie in one group, so the group size must be a multiple of 16), output columns for
MatMulNBits of a Gemm, and rows of the table for GatherBlockQuantized. Which weights qualify is
decided by `contrib_forms` (`plain_reader`: whether every reader of a weight is one they
replace, which `onnxhq.lowbit` asks too); the others stay ``DequantizeLinear``. `supported` asks
the installed onnxruntime once per form whether it runs it (GatherBlockQuantized is absent from
older releases).
`replace_readers` puts the nodes either module makes in place of the weights' readers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import naming

if TYPE_CHECKING:
    from .blockgrid import BlockGrid

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
#: Largest block (elements along K or D per scale) the forms are written with: a weight of one
#: scale repeats it per block, so longer blocks cost fewer bytes; 128 is a size both kernels take.
MAX_BLOCK = 128
MIN_BLOCK = 16
NBITS = "MatMulNBits"
#: Bits MatMulNBits is written with: its exact (fp32) 8-bit kernel ran 4-25x slower than
#: DequantizeLinear + MatMul, which onnxruntime fuses into its own MatMulNBits (int8 compute).
NBITS_BITS = (4,)
GATHER = "GatherBlockQuantized"


def readers_of(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Value name -> the (node, input position) pairs of the main graph that read it."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for pos, name in enumerate(n.input):
            readers.setdefault(name, []).append((n, pos))
    return readers


#: Builds the node that replaces a reader of a weight, and the initializers it reads:
#: ``make(reader, weight) -> (node, tensors)``.
Maker = Callable[[onnx.NodeProto, str], tuple[onnx.NodeProto, list[onnx.TensorProto]]]


def weight_input(node: onnx.NodeProto) -> str | None:
    """The weight a default-domain MatMul or Gemm (input 1) or Gather (input 0) reads, else None."""
    if node.domain != "" or len(node.input) < 2:
        return None
    return {"MatMul": node.input[1], "Gemm": node.input[1], "Gather": node.input[0]}.get(
        node.op_type
    )


def replace_readers(
    model: onnx.ModelProto, weights: Container[str], make: Maker
) -> dict[str, onnx.TensorProto]:
    """Replace, in place and in the same order, each node of ``model`` whose `weight_input` is
    one of ``weights`` by the node ``make(node, weight)`` builds; import the `MS_DOMAIN` opset
    where one was replaced. Returns the initializers the new nodes read, by name (readers of one
    weight share theirs), for the caller to add: the graph's initializers are not changed."""
    nodes: list[onnx.NodeProto] = []
    tensors: dict[str, onnx.TensorProto] = {}
    replaced = 0
    for node in model.graph.node:
        weight = weight_input(node)
        if weight is None or weight not in weights:
            nodes.append(node)
            continue
        new, made = make(node, weight)
        nodes.append(new)
        tensors.update((t.name, t) for t in made)
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return tensors


def contrib_forms(model: onnx.ModelProto, levels: Mapping[str, Any], bits: int) -> dict[str, str]:
    """Weight name -> `NBITS` or `GATHER` for each weight of ``levels`` that one of them takes:

    - `NBITS` (4 bits only, `NBITS_BITS`): 2-D, read only as the second input of MatMul nodes
      (its row groups, if any, a multiple of 16 rows of K), or only as the weight of plain
      ``Gemm(A, W, bias)`` nodes (``transB=1``, no transA, alpha = beta = 1, a bias of N values
      or none; rows are outputs, so any row groups do);
    - `GATHER`: 2-D, read only as the data of ``Gather`` nodes on axis 0, rows a multiple of 16
      long.

    A weight that is a graph output, or a form the installed onnxruntime does not run, stays out.
    """
    readers = readers_of(model)
    outputs = {o.name for o in model.graph.output}
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nbits = bits in NBITS_BITS
    forms = {}
    for name, lv in levels.items():
        if lv.q.ndim != 2 or name in outputs:
            continue
        reader = plain_reader(readers.get(name, []), lv.q.shape[0], dims)
        groups_fit = reader == "Gemm" or lv.group is None or lv.group % MIN_BLOCK == 0
        if reader in ("MatMul", "Gemm") and nbits and groups_fit:
            form = NBITS
        elif reader == "Gather" and lv.q.shape[1] % MIN_BLOCK == 0:
            form = GATHER
        else:
            continue
        if supported(form, bits):
            forms[name] = form
    return forms


def plain_reader(
    uses: list[tuple[onnx.NodeProto, int]], rows: int, dims: Mapping[str, tuple]
) -> str | None:
    """The op type every reader in ``uses`` (`readers_of`) is, when each reads a 2-D weight of
    ``rows`` rows in a form the contrib ops replace: ``"MatMul"`` (input 1), ``"Gemm"`` (input 1
    of a plain Gemm, `_plain_gemm`; ``dims``: initializer shapes, for its bias) or ``"Gather"``
    (input 0, axis 0); None for no readers, other readers or a mix."""
    if not uses:
        return None
    if all(_plain_matmul(n, pos) for n, pos in uses):
        return "MatMul"
    if all(_plain_gemm(n, pos, rows, dims) for n, pos in uses):
        return "Gemm"
    if all(_plain_gather(n, pos) for n, pos in uses):
        return "Gather"
    return None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain_matmul(node: onnx.NodeProto, pos: int) -> bool:
    return node.op_type == "MatMul" and node.domain == "" and pos == 1


def _plain_gemm(node: onnx.NodeProto, pos: int, n: int, dims: Mapping[str, tuple]) -> bool:
    """``Gemm(A, W, C)`` computing ``A @ W.T + C`` with C absent or N values."""
    if node.op_type != "Gemm" or node.domain != "" or pos != 1:
        return False
    a = _attrs(node)
    plain = a.get("transA", 0) == 0 and a.get("transB", 0) == 1
    plain = plain and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    bias = node.input[2] if len(node.input) > 2 else ""
    return plain and (bias == "" or dims.get(bias) == (n,))


def _plain_gather(node: onnx.NodeProto, pos: int) -> bool:
    return (
        node.op_type == "Gather"
        and node.domain == ""
        and pos == 0
        and _attrs(node).get("axis", 0) in (0, -2)
    )


def matmul_nbits(node: onnx.NodeProto, lv: Any, bits: int):
    """``MatMulNBits`` in place of ``MatMul(A, W)`` (W: K x N) or ``Gemm(A, W, bias)`` (W: N x K,
    `_plain_gemm`), and its initializers (shared by every reader of the same weight): W's levels
    + zero point packed along K in blocks, a scale and (unless every zero point is the default
    ``2**(bits-1)``) a packed zero point per column and block. Row groups are blocks of K for
    MatMul, columns (outputs) for Gemm."""
    gemm = node.op_type == "Gemm"
    q = lv.q if gemm else lv.q.T  # (N, K)
    n, k = q.shape
    block = _block(None if gemm else lv.group, along=k)
    blocks = -(-k // block)
    zero = _zero_points(lv, bits)  # (G,)
    if gemm:
        zeros = np.repeat(zero[_owner(lv, n)][:, None], blocks, axis=1)  # (N, blocks)
        scales = np.repeat(lv.scale[_owner(lv, n)][:, None], blocks, axis=1)
    else:
        group_of_block = _owner(lv, k)[np.arange(blocks) * block]
        zeros = np.broadcast_to(zero[group_of_block], (n, blocks))
        scales = np.broadcast_to(lv.scale[group_of_block], (n, blocks))
    stored = np.repeat(zeros, block, axis=1)  # padding columns of K: level 0
    stored[:, :k] += q
    base = naming.index_tensor(node.input[1])
    tensors = [
        numpy_helper.from_array(_pack(stored, bits).reshape(n, blocks, -1), f"{base}.nbits"),
        numpy_helper.from_array(np.ascontiguousarray(scales, np.float32).reshape(-1),
                                f"{base}.scales"),
    ]  # fmt: skip
    inputs = [node.input[0], tensors[0].name, tensors[1].name]
    if np.any(zero != 1 << (bits - 1)):
        tensors.append(numpy_helper.from_array(_pack(zeros, bits).reshape(-1),
                                               f"{base}.zero_points"))  # fmt: skip
        inputs.append(tensors[-1].name)
    if gemm and len(node.input) > 2 and node.input[2]:
        inputs += [""] * (5 - len(inputs)) + [node.input[2]]  # bias is input 5
    new = helper.make_node(NBITS, inputs, list(node.output), name=node.name,
                           domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block)  # fmt: skip
    return new, tensors


def gather_block_quantized(gather: onnx.NodeProto, lv: Any, bits: int):
    """``GatherBlockQuantized`` in place of ``Gather(E, ids)``, and its initializers: E's levels +
    zero point as uint8 (4 bits: two per byte along D), a scale and (unless every zero point is
    the default ``2**(bits-1)``) a zero point per row and block of D."""
    v, d = lv.q.shape
    block = _block(d, along=d)
    zero = _zero_points(lv, bits)
    owner = _owner(lv, v)
    stored = lv.q + zero[owner][:, None]
    base = naming.index_tensor(gather.input[0])
    tensors = [
        numpy_helper.from_array(_pack(stored, bits), f"{base}.blocks"),
        numpy_helper.from_array(
            np.repeat(lv.scale[owner][:, None], d // block, axis=1).astype(np.float32),
            f"{base}.scales",
        ),
    ]
    inputs = [tensors[0].name, gather.input[1], tensors[1].name]
    if np.any(zero != 1 << (bits - 1)):
        zp = np.repeat(zero[owner][:, None], d // block, axis=1)
        tensors.append(numpy_helper.from_array(_pack(zp, bits), f"{base}.zero_points"))
        inputs.append(tensors[-1].name)
    node = helper.make_node(GATHER, inputs, list(gather.output), name=gather.name,
                            domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0,
                            quantize_axis=1)  # fmt: skip
    return node, tensors


@functools.cache
def supported(form: str, bits: int) -> bool:
    """Whether the installed onnxruntime runs ``form`` at ``bits`` (a one-node probe, once)."""
    from .runtime import make_session

    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    if form == NBITS:
        node = helper.make_node(NBITS, ["a", "b", "s"], ["y"], domain=MS_DOMAIN, K=16, N=1,
                                bits=bits, block_size=16)  # fmt: skip
        inits = [numpy_helper.from_array(np.zeros((1, 1, 16 * bits // 8), np.uint8), "b"),
                 numpy_helper.from_array(np.ones(1, np.float32), "s")]  # fmt: skip
        feed: dict[str, np.ndarray] = {"a": a}
        x = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16])
    else:
        node = helper.make_node(GATHER, ["b", "a", "s"], ["y"], domain=MS_DOMAIN, bits=bits,
                                block_size=16, gather_axis=0, quantize_axis=1)  # fmt: skip
        inits = [numpy_helper.from_array(np.zeros((1, 16 * bits // 8), np.uint8), "b"),
                 numpy_helper.from_array(np.ones((1, 1), np.float32), "s")]  # fmt: skip
        feed = {"a": np.zeros(1, np.int64)}
        x = helper.make_tensor_value_info("a", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "probe", [x], [y], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    )
    model.ir_version = 8
    try:
        make_session(model).run(None, feed)
    except Exception as exc:  # any failure means: not this form here
        log.info("onnxruntime does not run %s with %d bits: %s", form, bits, str(exc)[:120])
        return False
    return True


def _block(group: int | None, *, along: int) -> int:
    """A power-of-two block of `MIN_BLOCK` to `MAX_BLOCK` elements: the longest that divides
    ``group`` (every block then lies in one group of one scale), or with no groups the shortest
    that covers ``along`` (at most `MAX_BLOCK`)."""
    block = MIN_BLOCK
    while block < MAX_BLOCK and block < along and (group is None or group % (2 * block) == 0):
        block *= 2
    return block


def _owner(lv: Any, rows: int) -> np.ndarray:
    """The scale group of each row (axis 0)."""
    if lv.group is None:
        return np.zeros(rows, np.int64)
    return np.arange(rows) // lv.group


def _zero_points(lv: Any, bits: int) -> np.ndarray:
    """Each group's stored zero point: the levels' own (unsigned grids), or ``2**(bits-1)``, the
    operators' default, for a signed grid."""
    return np.asarray(lv.zero if not lv.signed else np.full(lv.scale.shape, 1 << (bits - 1)))


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 of ``values`` (in [0, 2**bits)) along the last axis: as they are for 8 bits, two per
    byte (low nibble first, the last padded with 0) for 4."""
    v = np.asarray(values).astype(np.uint8)
    if bits == 8:
        return v
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.uint8)], axis=-1)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def _blocked(grid: BlockGrid) -> np.ndarray:
    """(R, blocks, block) levels, the last block padded with its zero point (value 0)."""
    rows, k = grid.levels.shape
    blocks = grid.scales.shape[1]
    padded = np.repeat(grid.zeros, grid.block, axis=1)
    padded[:, :k] = grid.levels
    return padded.reshape(rows, blocks, grid.block)


def matmul_nbits_blocks(node: onnx.NodeProto, grid: BlockGrid, accuracy: int = 0):
    """``MatMulNBits`` computing ``node`` (MatMul or plain Gemm) with its weight on ``grid`` (the
    view ``(N, K)``), and its initializers (named after the weight: shared by its readers)."""
    n, k = grid.levels.shape
    base = naming.index_tensor(node.input[1])
    packed = _pack(_blocked(grid), grid.bits)
    tensors = [
        numpy_helper.from_array(packed, f"{base}.nbits"),
        numpy_helper.from_array(grid.scales.reshape(-1), f"{base}.scales"),
        numpy_helper.from_array(_pack(grid.zeros, grid.bits).reshape(-1),
                                f"{base}.zero_points"),
    ]  # fmt: skip
    inputs = [node.input[0]] + [t.name for t in tensors]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        inputs += ["", node.input[2]]  # bias is input 5
    attrs = {"K": k, "N": n, "bits": grid.bits, "block_size": grid.block}
    if accuracy:
        attrs["accuracy_level"] = accuracy
    new = helper.make_node(NBITS, inputs, list(node.output), name=node.name,
                           domain=MS_DOMAIN, **attrs)  # fmt: skip
    return new, tensors


def gather_block_quantized_blocks(node: onnx.NodeProto, grid: BlockGrid, _accuracy: int = 0):
    """``GatherBlockQuantized`` in place of ``Gather(E, ids)`` with E on ``grid`` (blocks along
    the embedding, which they divide), and its initializers."""
    base = naming.index_tensor(node.input[0])
    tensors = [
        numpy_helper.from_array(_pack(grid.levels, grid.bits), f"{base}.blocks"),
        numpy_helper.from_array(grid.scales, f"{base}.scales"),
        numpy_helper.from_array(_pack(grid.zeros, grid.bits), f"{base}.zero_points"),
    ]
    inputs = [tensors[0].name, node.input[1], tensors[1].name, tensors[2].name]
    new = helper.make_node(GATHER, inputs, list(node.output), name=node.name,
                           domain=MS_DOMAIN, bits=grid.bits, block_size=grid.block,
                           gather_axis=0, quantize_axis=1)  # fmt: skip
    return new, tensors
