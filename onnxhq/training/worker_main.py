"""The gradient worker: a process whose interpreter has onnxruntime-training, serving sessions.

Run as a script (``python worker_main.py``) by `onnxhq.training.worker`; it imports only the
standard library, numpy and that interpreter's onnxruntime, never onnxhq, so any environment with
``onnxruntime-training`` can serve any onnxhq. Requests and replies are frames of named arrays on
stdin/stdout, laid out like safetensors: an 8-byte little-endian header length, a JSON header
``[[name, dtype, shape], ...]`` (numpy dtype strings; never ``object``), then the arrays' raw
C-order bytes in that order, no gaps. The ``op`` entry names the request:

``build``   ``model`` (uint8 bytes of a training graph), ``loss``, ``params`` (names), ``threads``,
            and ``opset``/``ir_version`` to convert it to first (0: as it is; needs ``onnx``):
            runs ``GradientGraphBuilder`` and opens a session on the gradient graph; replies
            ``id`` and ``outputs`` (the loss, then ``<param>_grad`` for each parameter).
``run``     ``id``, ``fetch`` and ``feeds`` (names), and ``set:<name>`` for each feed whose value
            differs from the one the session last got (the session keeps them: unchanged
            parameters are not sent again); replies ``out:<i>`` in fetch order.
``drop``    ``id``: closes that session.
``version`` replies ``version``, the worker's onnxruntime version.

Every reply has ``op`` = ``ok`` or ``error`` (with ``message``, one line, and ``kind``: ``build``
when the gradient builder refused the graph, its message then the builder's own). Native output (the
builder's log lines, an abort's message) goes to stderr, which the parent keeps in a file and
quotes when the worker dies. An interpreter whose onnxruntime is not the training build exits at
once with `NOT_TRAINING` (status 3).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any

import numpy as np

LENGTH = struct.Struct("<Q")
OPS = ("build", "run", "drop", "version")
NOT_TRAINING = "this python's onnxruntime is not onnxruntime-training (no GradientGraphBuilder)"


MAX_HEADER = 1 << 24
ALIGN = 16  # bytes: where a received array must start to be fed as it lies


def read_frame(stream) -> dict | None:
    """The next frame's arrays (writable), or None at the end of the stream or a cut frame."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(head)
    if size > MAX_HEADER:
        raise ValueError(f"frame header of {size} bytes exceeds {MAX_HEADER}")
    header = stream.read(size)
    if len(header) < size:
        return None
    entries = [(str(n), np.dtype(d), tuple(int(x) for x in s)) for n, d, s in json.loads(header)]
    if any(dtype.hasobject for _, dtype, _ in entries):
        raise ValueError("frame holds an object array")
    sizes = [dtype.itemsize * int(np.prod(shape, dtype=np.int64)) for _, dtype, shape in entries]
    body = bytearray(sum(sizes))
    if stream.readinto(body) < len(body):
        return None
    arrays, offset = {}, 0
    for (name, dtype, shape), nbytes in zip(entries, sizes):
        flat = np.frombuffer(body, dtype, nbytes // dtype.itemsize, offset)
        # Arrays lie back to back, so most start off a 16-byte boundary; onnxruntime-training
        # 1.19.2 crashed (SIGSEGV) running a BERT encoder's gradients on such feeds (and on
        # 8-byte aligned ones), so those are copied to memory of their own, as numpy aligns it.
        view = flat.reshape(shape)
        arrays[name] = view if flat.ctypes.data % ALIGN == 0 else view.copy()
        offset += nbytes
    return arrays


def write_frame(stream, arrays: dict) -> None:
    """Write ``arrays`` (name -> array-like) as one frame and flush."""
    values = [np.asarray(v, order="C") for v in arrays.values()]
    header = json.dumps([[n, v.dtype.str, v.shape] for n, v in zip(arrays, values)]).encode()
    stream.write(LENGTH.pack(len(header)) + header)
    for v in values:
        if v.nbytes:
            stream.write(v.data.cast("B"))
    stream.flush()


class BuildFailed(Exception):
    """The gradient builder refused the graph; the reply's ``kind`` is ``build`` and its
    ``message`` the builder's own text, for the parent to explain."""


class Server:
    def __init__(self) -> None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        self.ort = onnxruntime
        self.sessions: dict[int, Any] = {}
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.next_id = 1

    def build(self, request: dict) -> dict:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder

        loss = str(request["loss"])
        params = [str(p) for p in request["params"]]
        model = converted(
            request["model"].tobytes(), int(request["opset"]), int(request["ir_version"])
        )
        try:
            builder = GradientGraphBuilder(model, {loss}, set(params), loss)
            builder.build()
        except Exception as exc:  # the builder raises RuntimeError/Fail with C++ messages
            raise BuildFailed(str(exc)) from None
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        threads = int(request["threads"])
        if threads:
            options.intra_op_num_threads = threads
        session = self.ort.InferenceSession(
            builder.get_model(), options, providers=["CPUExecutionProvider"]
        )
        sid, self.next_id = self.next_id, self.next_id + 1
        self.sessions[sid] = session
        self.kept[sid] = {}
        outputs = np.array([o.name for o in session.get_outputs()], dtype=str)
        return {"id": np.int64(sid), "outputs": outputs}

    def run(self, request: dict) -> dict:
        sid = int(request["id"])
        kept = self.kept[sid]
        kept.update({key[4:]: value for key, value in request.items() if key.startswith("set:")})
        feed = {str(n): kept[str(n)] for n in request["feeds"]}
        values = self.sessions[sid].run([str(n) for n in request["fetch"]], feed)
        return {f"out:{i}": np.asarray(v) for i, v in enumerate(values)}

    def drop(self, request: dict) -> dict:
        self.sessions.pop(int(request["id"]), None)
        self.kept.pop(int(request["id"]), None)
        return {}

    def version(self, request: dict) -> dict:
        return {"version": np.array(self.ort.__version__)}


def converted(model: bytes, opset: int, ir_version: int) -> bytes:
    """``model`` converted to default-domain ``opset`` with onnx's version converter and its IR
    version lowered to ``ir_version`` (0: leave that one as it is)."""
    if not opset and not ir_version:
        return model
    try:
        import onnx
        import onnx.version_converter
    except ImportError:
        raise ValueError(
            f"converting the model to opset {opset} needs onnx in the training environment "
            f"({sys.executable}): pip install onnx there"
        ) from None
    proto = onnx.load_from_string(model)
    if opset:
        have = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as exc:  # the converter raises its C++ errors under several types
            raise ValueError(
                f"the model uses opset {have}; onnxruntime-training runs opsets up to {opset} and "
                f"onnx could not convert it ({str(exc)[:200]}); use --hessian activations or "
                f"none, or re-export the model with opset {opset}"
            ) from None
        forget_invented_dims(proto)
    if ir_version and proto.ir_version > ir_version:
        proto.ir_version = ir_version
    return proto.SerializeToString()


def forget_invented_dims(proto: Any) -> None:
    """Clear, in place, the dim symbols of ``proto``'s value_info and outputs that no graph input
    declares: the converter's shape inference names unknown dims ``unk__N``, and the builder takes
    any two symbols as equal when it sums a broadcast's gradient (see `onnxhq.training.shapes`,
    which the parent applies before sending the graph; this process does not import onnxhq)."""
    graph = proto.graph
    declared = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim}
    for value in [*graph.value_info, *graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in declared:
                dim.Clear()


def main() -> int:
    # The protocol owns the original stdout; anything native code prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    try:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except ImportError:
        print(NOT_TRAINING, file=sys.stderr)
        return 3
    server = Server()
    while True:
        request = read_frame(requests)
        if request is None or str(request["op"]) == "exit":
            return 0
        op = str(request["op"])
        try:
            if op not in OPS:
                raise ValueError(f"unknown request {op!r}")
            reply = {"op": np.array("ok"), **getattr(server, op)(request)}
        except Exception as exc:  # any failure goes back to the parent as a message
            text = " ".join(str(exc).split()) or type(exc).__name__
            kind = "build" if isinstance(exc, BuildFailed) else "other"
            reply = {"op": np.array("error"), "kind": np.array(kind), "message": np.array(text)}
        write_frame(protocol, reply)


if __name__ == "__main__":
    sys.exit(main())
