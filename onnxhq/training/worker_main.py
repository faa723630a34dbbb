"""The gradient worker: a process whose interpreter has onnxruntime-training, serving sessions.

Run as a script (``python worker_main.py``) by `onnxhq.training.worker`; it imports only the
standard library, numpy and that interpreter's onnxruntime, never onnxhq, so any environment with
``onnxruntime-training`` can serve any onnxhq. Requests and replies are frames on stdin/stdout:
an 8-byte little-endian length, then an uncompressed ``.npz`` archive (read with
``allow_pickle=False``) whose ``op`` entry names the request:

``build``   ``model`` (uint8 bytes of a training graph), ``loss``, ``params`` (names), ``threads``:
            runs ``GradientGraphBuilder`` and opens a session on the gradient graph; replies
            ``id`` and ``outputs`` (the loss, then ``<param>_grad`` for each parameter).
``run``     ``id``, ``fetch`` (names) and feeds ``in:<name>``; replies ``out:<i>`` in fetch order.
``drop``    ``id``: closes that session.
``version`` replies ``version``, the worker's onnxruntime version.

Every reply has ``op`` = ``ok`` or ``error`` (with ``message``). Native output (the builder's log
lines, an abort's message) goes to stderr, which the parent keeps in a file and quotes when the
worker dies.
"""

from __future__ import annotations

import io
import os
import struct
import sys
from typing import Any

import numpy as np

LENGTH = struct.Struct("<Q")
OPS = ("build", "run", "drop", "version")


def read_frame(stream) -> dict | None:
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def write_frame(stream, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    body = buffer.getvalue()
    stream.write(LENGTH.pack(len(body)) + body)
    stream.flush()


class Server:
    def __init__(self) -> None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        self.ort = onnxruntime
        self.sessions: dict[int, Any] = {}
        self.next_id = 1

    def build(self, request: dict) -> dict:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder

        loss = str(request["loss"])
        params = [str(p) for p in request["params"]]
        builder = GradientGraphBuilder(request["model"].tobytes(), {loss}, set(params), loss)
        builder.build()
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
        outputs = np.array([o.name for o in session.get_outputs()], dtype=str)
        return {"id": np.int64(sid), "outputs": outputs}

    def run(self, request: dict) -> dict:
        session = self.sessions[int(request["id"])]
        feed = {key[3:]: value for key, value in request.items() if key.startswith("in:")}
        values = session.run([str(n) for n in request["fetch"]], feed)
        return {f"out:{i}": np.asarray(v) for i, v in enumerate(values)}

    def drop(self, request: dict) -> dict:
        self.sessions.pop(int(request["id"]), None)
        return {}

    def version(self, request: dict) -> dict:
        return {"version": np.array(self.ort.__version__)}


def main() -> int:
    # The protocol owns the original stdout; anything native code prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
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
            reply = {"op": np.array("error"), "message": np.array(text)}
        write_frame(protocol, reply)


if __name__ == "__main__":
    sys.exit(main())
