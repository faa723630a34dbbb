"""What `quantize_weights` returns: codebooks, codes and errors per tensor, the guard's record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..numeric import entropy_bits

if TYPE_CHECKING:
    from .guard import TensorError

#: Key of the one network-wide codebook.
SHARED = "shared"


@dataclass(frozen=True)
class TensorCodes:
    """One tensor's codes.

    Attributes
    ----------
    codebook : str, key into `QuantizedWeights.codebooks`.
    indices : int32 ndarray of the weight's shape.
    group_size : int or None; channel-group scope: output channels (axis 0) per codebook row.
    """

    codebook: str
    indices: np.ndarray
    group_size: int | None


@dataclass(frozen=True)
class QuantizedWeights:
    """Codebooks and per-tensor codes.

    Attributes
    ----------
    codebooks : dict of key -> (k,) float32 ndarray, or (G, k) for channel groups (rows padded with
        their last value).
    tensors : dict of weight name -> TensorCodes.
    errors : dict of weight name -> `TensorError` (relative error and SQNR of the quantization;
        after fine-tuning the codebooks, measure again with `measure_errors`).
    flagged : names of the tensors the guard found far worse off than in a codebook of their own
        and left as they are (``guard="warn"``), sorted.
    guarded : names of the tensors the guard moved to a codebook of their own (key = name),
        sorted.
    """

    codebooks: dict[str, np.ndarray]
    tensors: dict[str, TensorCodes]
    errors: dict[str, TensorError] = field(default_factory=dict)
    flagged: tuple[str, ...] = ()
    guarded: tuple[str, ...] = ()

    def dequantize(self, name: str) -> np.ndarray:
        """The quantized weight ``name``: float32, its original shape; pruned entries exactly 0."""
        if name not in self.tensors:
            raise ConfigError(f"no quantized tensor named {name!r}; there are {len(self.tensors)}")
        codes = self.tensors[name]
        book = self.codebooks[codes.codebook]
        if codes.group_size is None:
            return book[codes.indices].astype(np.float32, copy=False)
        idx = codes.indices.reshape(codes.indices.shape[0] if codes.indices.ndim else 1, -1)
        rows = np.arange(idx.shape[0]) // codes.group_size
        return book[rows[:, None], idx].reshape(codes.indices.shape).astype(np.float32, copy=False)

    def dequantize_all(self) -> dict[str, np.ndarray]:
        """Every quantized weight, by name."""
        return {name: self.dequantize(name) for name in self.tensors}


def coded_bits(qw: QuantizedWeights) -> float:
    """Ideal size in bits: each codebook's indices at their empirical entropy plus 32 bits per
    codebook value.

    All tensors that share a codebook key share one entropy code. This is the rate to compare
    scopes by: finer scopes pay for their extra codebook values here.
    """
    total = 0.0
    for key, book in qw.codebooks.items():
        idx = [c.indices.ravel() for c in qw.tensors.values() if c.codebook == key]
        if idx:
            counts = np.bincount(np.concatenate(idx))
            total += counts.sum() * entropy_bits(counts)
        total += 32.0 * np.asarray(book).size
    return total
