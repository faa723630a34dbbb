"""onnxruntime sessions: one place that sets threads and logging, and runs models batched."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx

from .errors import ModelError


def make_session(model: onnx.ModelProto | bytes | str, *, threads: int = 0, optimize: bool = True):
    """An ``onnxruntime.InferenceSession`` on the CPU with quiet logging.

    ``threads`` = 0 lets onnxruntime choose. Errors while loading become `ModelError`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    if isinstance(source, str) and not os.path.isfile(source):
        raise ModelError(f"model file {source} does not exist")
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip()[:300]}") from None


def run_batched(session, inputs: Mapping[str, np.ndarray], output: str, *, batch_size: int = 500) -> np.ndarray:
    """Run ``session`` over the sample axis in batches and concatenate ``output``."""
    n = len(next(iter(inputs.values())))
    parts = [session.run([output], {k: v[i:i + batch_size] for k, v in inputs.items()})[0]
             for i in range(0, n, batch_size)]
    return np.concatenate(parts, axis=0)


def compressed_session(path: str | os.PathLike, *, threads: int = 0):
    """An ``onnxruntime.InferenceSession`` on a compressed graph (sidecar beside it) or a plain model.

    Exposed as ``onnxhq.InferenceSession``.
    """
    from .decode import load_runnable

    return make_session(load_runnable(path), threads=threads)
