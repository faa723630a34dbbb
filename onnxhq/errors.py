"""The one error family of onnxhq.

Library code raises only these; the CLI turns them into exit code 1 and a one-line message.
Messages name the thing that is wrong, its value and the bound, and say what to do.
"""

from __future__ import annotations


class OnnxhqError(Exception):
    """Base class of every error onnxhq raises on purpose."""


class ModelError(OnnxhqError):
    """The ONNX model cannot be read, is malformed, or uses something onnxhq does not support."""


class DataError(OnnxhqError):
    """A data file (npz of inputs/labels, Hessian or Adam state) is missing, bad or mismatched."""


class SidecarError(OnnxhqError):
    """A sidecar file is missing, truncated, corrupt, or of an unknown format version."""


class ConfigError(OnnxhqError):
    """An option has an invalid value or conflicts with another option."""


class NumericalError(OnnxhqError):
    """A computation produced non-finite values (gradients, Hessian diagonals, losses)."""
