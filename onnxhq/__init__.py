"""onnxhq: compress ONNX models toward the limit their loss allows.

Hessian-weighted quantization with one codebook for all layers, Huffman-coded indices in a sidecar,
and custom dequantize nodes that stock onnxruntime runs (Choi, El-Khamy & Lee, ICLR 2017).

    result = onnxhq.compress("model.onnx", "calibration.npz", k=32)
    result.save("out/")                       # out/model.onnx + out/model.onnxhq
    session = onnxhq.InferenceSession("out/model.onnx")
    print(onnxhq.report("out/model.onnx").to_text())
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

from .errors import ConfigError, DataError, ModelError, NumericalError, OnnxhqError, SidecarError
from .options import CompressOptions, FineTune, HessianSource, OptionError, Rate, Scope

if TYPE_CHECKING:
    import os

    from .report import Report

__version__ = "0.3.0"


class _Package(types.ModuleType):
    """The package module. `report` and `sweep` are API functions that share their names with
    submodules; importing a submodule for the first time would set the package attribute of that
    name to the module, so these two names keep the functions (`from onnxhq.report import Report`
    still reaches the module through ``sys.modules``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("report", "sweep") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from .sweep import Sweep, sweep  # noqa: E402  (light: no numpy, onnx or onnxruntime at import)


def report(compressed: str | os.PathLike) -> Report:
    """The size `Report` of a compressed graph and the sidecar beside it (nothing else is read);
    see `onnxhq.describe.describe_artifacts`."""
    from .describe import describe_artifacts

    return describe_artifacts(compressed)


# The heavy modules (numpy, onnx, onnxruntime) load on first use, so `import onnxhq` and the CLI
# start fast.
_LAZY = {
    "compress": ("pipeline", "compress"),
    "Result": ("pipeline", "Result"),
    "Report": ("report", "Report"),
    "load": ("decode", "load"),
    "Dataset": ("data", "Dataset"),
    "load_data": ("data", "load_data"),
    "InferenceSession": ("runtime", "compressed_session"),
    "estimate_hessian": ("importances", "estimate_hessian"),
}

__all__ = [
    "CompressOptions",
    "ConfigError",
    "DataError",
    "Dataset",
    "FineTune",
    "HessianSource",
    "InferenceSession",
    "ModelError",
    "NumericalError",
    "OnnxhqError",
    "OptionError",
    "Rate",
    "Report",
    "Result",
    "Scope",
    "SidecarError",
    "Sweep",
    "__version__",
    "compress",
    "estimate_hessian",
    "load",
    "load_data",
    "report",
    "sweep",
]


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
