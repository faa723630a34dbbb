"""onnxruntime sessions: one place that sets threads and logging, and runs models batched."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, overload

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    import onnx
    import onnxruntime


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    *,
    threads: int = 0,
    optimize: bool = True,
    weights: Mapping[str, np.ndarray] | None = None,
) -> onnxruntime.InferenceSession:
    """An ``onnxruntime.InferenceSession`` on the CPU with quiet logging.

    ``model`` is a ModelProto, its serialized bytes or a file path; ``threads`` = 0 lets
    onnxruntime choose. ``weights``: arrays for the model's external-data initializers of those
    names, handed over in memory without a copy (the session keeps them alive). Errors while
    loading become `ModelError`.
    """
    import onnxruntime as ort  # here, not at the top: `import onnxhq` stays light

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    values = [
        ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for w in (weights or {}).values()
    ]
    if values:
        opts.add_external_initializers(list(weights or {}), values)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    source = model if isinstance(model, (bytes, bytearray, str)) else model.SerializeToString()
    if isinstance(source, str) and not os.path.isfile(source):
        raise ModelError(f"model file {source} does not exist")
    try:
        session = ort.InferenceSession(
            source, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        session._onnxhq_weights = values  # alive with the session
        return session
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip()[:300]}") from None


@overload
def run_batched(
    session: onnxruntime.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output: str,
    *,
    batch_size: int = ...,
) -> np.ndarray: ...


@overload
def run_batched(
    session: onnxruntime.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output: Sequence[str],
    *,
    batch_size: int = ...,
) -> dict[str, np.ndarray]: ...


def run_batched(
    session: onnxruntime.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output: str | Sequence[str],
    *,
    batch_size: int = 500,
) -> np.ndarray | dict[str, np.ndarray]:
    """Run ``session`` over the sample axis in batches of ``batch_size`` and concatenate outputs.

    ``inputs`` are arrays with N samples on axis 0; each result has N rows too. ``output`` is one
    output name (its array is returned) or a list of names (name -> array, one run per batch for
    them all; an empty list runs nothing).
    """
    names = [output] if isinstance(output, str) else list(output)
    n = len(next(iter(inputs.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, n if names else 0, batch_size):
        values = session.run(names, {k: v[i : i + batch_size] for k, v in inputs.items()})
        for part, value in zip(parts, values):
            part.append(np.asarray(value))
    arrays = {name: np.concatenate(p, axis=0) for name, p in zip(names, parts)}
    return arrays[output] if isinstance(output, str) else arrays


def compressed_session(
    path: str | os.PathLike, *, threads: int = 0
) -> onnxruntime.InferenceSession:
    """An ``onnxruntime.InferenceSession`` on a compressed graph (sidecar beside it) or a model.

    Exposed as ``onnxhq.InferenceSession``. The quantized weights are computed in numpy and handed
    to onnxruntime in memory (`onnxhq.native.supplied_weights`): the session holds each float
    weight once, as a session on the float model does, and starts without constant folding.
    """
    from .decode import load_runnable  # here: decode loads onnx, which this module does not need
    from .native import supplied_weights

    skeleton, weights = supplied_weights(load_runnable(path))
    return make_session(skeleton, threads=threads, weights=weights)
