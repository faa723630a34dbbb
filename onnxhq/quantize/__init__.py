"""Hessian-weighted quantization of weights (Choi, El-Khamy & Lee, ICLR 2017).

`quantize` turns one flat array of weights, with importances (the Hessian diagonal), into a
codebook and indices by k-means (plain or Hessian-weighted), uniform quantization or iterative
ECSQ, at a number of codewords, a Lagrange multiplier or a target entropy in bits per weight.
`quantize_weights` does it for named tensors with one codebook for the network, per tensor, or
per group of output channels, measures each tensor's error and, by default, gives a tensor that
a shared codebook wrecks a codebook of its own (`onnxhq.quantize.guard`).

All quantizers work on the weights sorted once: in one dimension clusters are intervals, so
Lloyd's iteration costs O(k log n) per step and exact optima come from dynamic programming.
"""

from ..numeric import entropy_bits
from ._quantize import METHODS, Quantization, quantize
from .codes import QuantizedWeights, TensorCodes, coded_bits
from .guard import GUARDS, TensorError, measure_errors, tensor_error
from .scope import SCOPES, quantize_weights

__all__ = [
    "GUARDS",
    "METHODS",
    "SCOPES",
    "Quantization",
    "QuantizedWeights",
    "TensorCodes",
    "TensorError",
    "coded_bits",
    "entropy_bits",
    "measure_errors",
    "quantize",
    "quantize_weights",
    "tensor_error",
]
