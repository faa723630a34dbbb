"""``decode`` one sidecar stream at a time: memory holds one stream's tensor, not the model's.

The decoded model is the graph without its index tensors (or, with ``dequantize``, without its
dequantize nodes and codebooks), serialized once, plus one tensor per stream written as the
stream is decoded: packed indices (the gather target) or the float weight (``dequantize``).
Under 2 GB it is one file, each tensor appended as a graph field of one initializer (protobuf
merges repeated occurrences of a message field, so the file parses as the whole model); past
2 GB the tensors go to ``<out>.data`` (onnx's external data, offsets aligned to 4 KiB) and the
graph refers to them. The sidecar's CRC-32 is checked against the graph's record after the
last stream: on a mismatch nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import model as model_io
from . import naming
from ._io import write_files
from .decode import _finish, _joinable, _packed_shapes, read_pair
from .rewrite import GROUPED_OP, dequantized_value, drop_onnxhq_domain, index_dtype
from .sidecar import IndexStream
from .sidecar_io import iter_sidecar_file, sidecar_entries

#: Alignment of the tensors' offsets in the external data file.
_ALIGN = 4096
#: (tensor name, numpy dtype, shape) of the tensor each stream becomes.
Spec = tuple[str, np.dtype, tuple[int, ...]]
Produce = Callable[[IndexStream], np.ndarray]


def decode_streamed(
    path: str | os.PathLike, out: str | os.PathLike, *, dequantize: bool = False
) -> int:
    """Write the runnable model (gather target, or float weights with ``dequantize``) of the
    compressed graph at ``path`` to ``out``; returns the bytes written."""
    graph, (side, crc, entries) = read_pair(path, _entries)
    model, _, index_array = _joinable(graph, list(entries), in_place=True)
    _finish(model, set(entries))
    produce: Produce
    if dequantize:
        specs, produce = _dequantized(model, entries)
    else:
        packed = _packed_shapes(model)
        specs = {n: _index_spec(n, e, n in packed) for n, e in entries.items()}
        produce = index_array
    _check_with_stand_ins(model, list(specs.values()))
    out = Path(out)

    def tensors():
        # Read outside the shared lock (the output may be in the same folder, whose exclusive
        # lock the write holds): a sidecar replaced meanwhile fails the graph's CRC at the end.
        for stream in iter_sidecar_file(side, crc32=crc):
            yield specs[stream.name][0], produce(stream)

    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in specs.values())
    head = model.SerializeToString()
    if len(head) + total + 64 * len(specs) < model_io.EXTERNAL_ABOVE:

        def write(f) -> None:
            f.write(head)
            for name, array in tensors():
                tensor = numpy_helper.from_array(array, name)
                f.write(_field(7, _field(5, tensor.SerializeToString())))

        return write_files(out.parent, [(out.name, write)])[0]
    return sum(_write_external(model, list(specs.values()), tensors, out))


def _entries(side: Path, crc: int | None) -> tuple[Path, int | None, dict]:
    """The sidecar, its CRC-32 as the graph records it, and its header entries (read now, under
    the shared lock; the streams are read later, one at a time)."""
    return side, crc, sidecar_entries(side)


def _write_external(model, specs: list[Spec], tensors, out: Path) -> list[int]:
    """Graph ``out`` whose tensors ``specs`` (in the order ``tensors()`` yields them) live in
    ``<out>.data``."""
    data_name = f"{out.name}.data"
    offsets, end = {}, 0
    for name, dtype, shape in specs:
        offsets[name] = -(-end // _ALIGN) * _ALIGN
        end = offsets[name] + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    for name, dtype, shape in specs:
        t = model.graph.initializer.add(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=shape
        )
        t.data_location = onnx.TensorProto.EXTERNAL
        length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        for key, value in (("location", data_name), ("offset", offsets[name]), ("length", length)):
            t.external_data.add(key=key, value=str(value))
    header = model.SerializeToString()

    def write_data(f) -> None:
        for name, array in tensors():
            f.seek(offsets[name])
            f.write(np.ascontiguousarray(array, array.dtype.newbyteorder("<")).data)
        f.truncate(end)

    return write_files(out.parent, [(out.name, header), (data_name, write_data)])


def _index_spec(name: str, entry: dict, packed: bool) -> Spec:
    shape = tuple(int(d) for d in entry["shape"])
    if packed:
        return name, np.dtype(np.uint8), ((int(np.prod(shape, dtype=np.int64)) + 1) // 2,)
    return name, np.dtype(index_dtype(entry["alphabet_size"])), shape


def _dequantized(model: onnx.ModelProto, entries: dict) -> tuple[dict[str, Spec], Produce]:
    """``model`` made the float model's skeleton, in place (as `rewrite.dequantize_model`: no
    dequantize nodes, no initializers only they read, no onnxhq domain), the float weight each
    stream becomes and how to compute it."""
    inits = {t.name: t for t in model.graph.initializer}
    dq_nodes = [n for n in model.graph.node if n.domain == naming.DOMAIN]
    how: dict[str, tuple[np.ndarray, int, int | None]] = {}
    specs: dict[str, Spec] = {}
    for node in dq_nodes:
        book = numpy_helper.to_array(inits[node.input[0]])
        k, group = int(book.size), None
        if node.op_type == GROUPED_OP:
            k = int(numpy_helper.to_array(inits[node.input[2]]))
            group = int(next(a.i for a in node.attribute if a.name == "group_size"))
        how[node.input[1]] = (book, k, group)
        shape = tuple(int(d) for d in entries[node.input[1]]["shape"])
        specs[node.input[1]] = (node.output[0], book.dtype, shape)
    others = [n for n in model.graph.node if n.domain != naming.DOMAIN]
    still_used = {i for n in others for i in n.input} | {o.name for o in model.graph.output}
    dq_inputs = {i for n in dq_nodes for i in n.input}
    keep = [t for t in model.graph.initializer if t.name not in dq_inputs or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(others)
    drop_onnxhq_domain(model)

    def produce(stream: IndexStream) -> np.ndarray:
        book, k, group = how[stream.name]
        return dequantized_value(book, stream.indices, k, group)

    return specs, produce


def _check_with_stand_ins(model: onnx.ModelProto, specs: list[Spec]) -> None:
    """`onnx.checker` on ``model`` with empty stand-ins for the tensors ``specs``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name, dtype, _ in specs:
        probe.graph.initializer.add(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=[0]
        )
    onnx.checker.check_model(probe, full_check=False)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
