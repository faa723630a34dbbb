"""onnxhq: compress ONNX models toward the limit their loss allows.

Hessian-weighted quantization with one codebook for all layers, Huffman-coded indices in a sidecar,
and custom dequantize nodes that stock onnxruntime runs (Choi, El-Khamy & Lee, ICLR 2017).

    result = onnxhq.compress("model.onnx", "calibration.npz", k=32)
    result.save("out/")                       # out/model.onnx + out/model.onnxhq
    session = onnxhq.InferenceSession("out/model.onnx")
    print(onnxhq.report("out/model.onnx").to_text())
"""

from __future__ import annotations

from .errors import ConfigError, DataError, ModelError, NumericalError, OnnxhqError, SidecarError

__version__ = "0.3.0"

# `report` and `sweep` are both functions of the API and submodules of the package. Importing a
# submodule for the first time sets the package attribute of the same name to the module, so these
# two (light: no numpy, onnx or onnxruntime at import) are imported here, once, and their names
# then rebound to the functions. `from onnxhq.report import Report` still reaches the module.
from .report import Report, describe_artifacts as report  # noqa: E402
from .sweep import Sweep, sweep  # noqa: E402

# The heavy modules (onnxruntime, scipy) load on first use, so `import onnxhq` and the CLI start fast.
_LAZY = {
    "compress": ("pipeline", "compress"),
    "Result": ("pipeline", "Result"),
    "load": ("decode", "load"),
    "Dataset": ("data", "Dataset"),
    "load_data": ("data", "load_data"),
    "InferenceSession": ("runtime", "compressed_session"),
    "estimate_hessian": ("pipeline", "estimate_hessian"),
}

__all__ = sorted([*_LAZY, "report", "Report", "sweep", "Sweep"]) + [
    "OnnxhqError", "ModelError", "DataError", "SidecarError", "ConfigError", "NumericalError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxhq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
