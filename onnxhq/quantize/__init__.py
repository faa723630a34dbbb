"""Hessian-weighted quantization of weights (Choi, El-Khamy & Lee, ICLR 2017).

`quantize` turns one flat array of weights, with importances (the Hessian diagonal), into a
codebook and indices by k-means (plain or Hessian-weighted), uniform quantization or iterative
ECSQ, at a number of codewords, a Lagrange multiplier or a target entropy in bits per weight.
`quantize_weights` does it for named tensors with one codebook for the network, per tensor, or
per group of output channels.

All quantizers work on the weights sorted once: in one dimension clusters are intervals, so
Lloyd's iteration costs O(k log n) per step and exact optima come from dynamic programming.
"""

from ._quantize import METHODS, Quantization, quantize
from .rate import entropy_bits
from .scope import SCOPES, QuantizedWeights, TensorCodes, coded_bits, quantize_weights

__all__ = ["METHODS", "SCOPES", "Quantization", "QuantizedWeights", "TensorCodes", "coded_bits", "entropy_bits",
           "quantize", "quantize_weights"]
