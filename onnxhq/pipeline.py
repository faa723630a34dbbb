"""``compress``: the whole pipeline from an ONNX model to its graph + sidecar artifacts.

load -> pick weights -> hessian -> quantize -> rewrite -> encode -> (decode + evaluate) -> report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from . import hessian as hessian_mod
from . import naming
from ._io import atomic_write_bytes
from .data import Dataset, load_data
from .decode import load_from_bytes
from .encode import Artifacts, split_artifacts
from .errors import ConfigError, DataError
from .evaluate import accuracy
from .finetune import codebook_names, finetune_codebooks
from .gradients import GradientEngine
from .model import FLOAT_TYPES, initializer_map, load_model, quantizable_weights, read_initializers
from .quantize import METHODS, SCOPES, QuantizedWeights, quantize_weights
from .report import LayerRow, Report
from .rewrite import rewrite
from .sidecar import describe_sidecar

log = logging.getLogger(__name__)

#: Methods whose objective weights each error by a Hessian estimate (so they need data).
WEIGHTED_METHODS = ("hkmeans", "uniform", "ecsq")
#: Defaults, from the measurements in tools/RESULTS.md: at equal coded bits per weight, Hessian-
#: weighted uniform quantization keeps more accuracy than k-means (as the paper found). 4 bits per
#: weight (entropy of the indices) lost nothing on the dense LeNet-5 and 0.9 point on ResNet-32
#: (0.4 with --scope layer), where 3 bits lost 12 points; lower rates want pruning and fine-tuning.
DEFAULT_METHOD = "uniform"
DEFAULT_TARGET_BITS = 4.0
DEFAULT_K = 32


@dataclass
class Result:
    """A compressed model in memory: the artifacts, the quantized weights and the report.

    `save` updates ``report.files`` to the absolute paths it wrote.
    """

    artifacts: Artifacts
    quantized: QuantizedWeights
    report: Report

    def model(self) -> onnx.ModelProto:
        """The runnable decoded model (uint indices + dequantize nodes)."""
        return load_from_bytes(self.artifacts.graph_bytes, self.artifacts.sidecar_bytes)

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write graph and sidecar into ``directory`` (atomically); returns their absolute paths."""
        directory = Path(directory)
        a = self.artifacts
        paths = [(directory / a.graph_name).resolve(), (directory / a.sidecar_name).resolve()]
        atomic_write_bytes(paths[1], a.sidecar_bytes)
        atomic_write_bytes(paths[0], a.graph_bytes)
        self.report = self.report.with_files({str(p): p.stat().st_size for p in paths})
        return paths


def compress(model: str | os.PathLike | bytes | onnx.ModelProto, data: str | os.PathLike | Dataset | None = None, *,
             method: str = DEFAULT_METHOD, k: int | None = None, bits: float | None = None, lam: float | None = None,
             target_bits: float | None = None, scope: str = "network", group_size: int | None = None,
             hessian: str | Mapping[str, np.ndarray] = "fisher", hessian_samples: int = 1000,
             adam_state: str | os.PathLike | Mapping[str, np.ndarray] | None = None, include_biases: bool = False,
             finetune_epochs: float = 0, train_data: str | os.PathLike | Dataset | None = None,
             finetune_lr: float = 1e-4, extra_ops: tuple[str, ...] = (), output: str | None = None,
             eval_data: str | os.PathLike | Dataset | None = None, name: str | None = None, seed: int = 0,
             progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Quantize ``model``'s weights with one Hessian-weighted codebook and Huffman-code the indices.

    Parameters
    ----------
    model : path, bytes or ModelProto of a classifier (or any model, with ``hessian="none"``).
    data : inputs (and optional labels) for the Hessian estimate; needed by weighted methods.
    method : one of ``kmeans`` (unweighted), ``hkmeans``, ``uniform``, ``ecsq``.
    k, bits, lam, target_bits : the rate, at most one; default ``target_bits=4.0`` (uniform, ECSQ) or
        ``k=32`` (k-means). ``target_bits`` is the entropy of the indices in bits per weight.
    hessian : estimator name (see `onnxhq.hessian.METHODS`) or precomputed diagonals keyed by weight name.
    adam_state : with ``hessian="adam"``, the Adam second moment (npz path or dict keyed by weight name).
    include_biases : quantize the biases of the quantized layers too (same codebook scope).
    finetune_epochs, train_data, finetune_lr : fine-tune the codebook values (indices fixed) for this
        many epochs over labelled ``train_data`` after quantization.
    eval_data : labelled data; when given, both models' top-1 accuracies are measured.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if k is None and bits is None and lam is None and target_bits is None:
        if method in ("kmeans", "hkmeans"):
            k = DEFAULT_K
        else:
            target_bits = DEFAULT_TARGET_BITS
    proto = load_model(model)
    stem = name or _stem(model, proto)
    original_bytes = _original_bytes(model, proto)
    names = quantized_names(proto, include_biases=include_biases, extra_ops=extra_ops)
    if not names:
        raise ConfigError("the model has no quantizable weights (float initializers of Conv, ConvTranspose, Gemm, "
                          "MatMul); add op types with extra_ops")
    weights = read_initializers(proto, names)
    flat = {n: w.astype(np.float32) for n, w in weights.items()}
    if finetune_epochs and train_data is None:
        raise ConfigError("codebook fine-tuning needs labelled training data: pass --train (train_data=)")
    importances = _importances(proto, data, method, hessian, names, hessian_samples, output, seed, progress,
                               adam_state)
    pruned = {n: w == 0 for n, w in flat.items() if np.any(w == 0)}
    _tell(progress, "quantize", 0, 1)
    quantized = quantize_weights(flat, importances, scope=scope, group_size=group_size, method=method, k=k, bits=bits,
                                 lam=lam, target_bits=target_bits, pruned=pruned or None, seed=seed)
    _tell(progress, "quantize", 1, 1)
    rewritten = rewrite(proto, quantized.codebooks, quantized.tensors)
    if finetune_epochs:
        train = train_data if isinstance(train_data, Dataset) else load_data(train_data, proto, need_labels=True)
        rewritten = finetune_codebooks(rewritten, train, epochs=finetune_epochs, lr=finetune_lr, output=output,
                                       seed=seed, progress=progress)
        tuned = read_initializers(rewritten, [naming.codebook_tensor(key) for key in quantized.codebooks])
        quantized = replace(quantized, codebooks={key: tuned[naming.codebook_tensor(key)].reshape(book.shape)
                                                  for key, book in quantized.codebooks.items()})
    artifacts = split_artifacts(rewritten, stem, original_bytes=original_bytes)
    report = _report(stem, proto, rewritten, quantized, artifacts, original_bytes,
                     settings=dict(method=method, scope=scope, k=k, bits=bits, lam=lam, target_bits=target_bits,
                                   hessian=hessian if isinstance(hessian, str) else "supplied",
                                   include_biases=include_biases, finetune_epochs=finetune_epochs))
    if eval_data is not None:
        _tell(progress, "evaluate", 0, 2)
        test = eval_data if isinstance(eval_data, Dataset) else load_data(eval_data, proto, need_labels=True)
        before = accuracy(proto, test, output=output)
        _tell(progress, "evaluate", 1, 2)
        after = accuracy(load_from_bytes(artifacts.graph_bytes, artifacts.sidecar_bytes), test, output=output)
        _tell(progress, "evaluate", 2, 2)
        report = Report(**{**report.__dict__, "accuracy_original": before, "accuracy_compressed": after})
    return Result(artifacts, quantized, report)


def estimate_hessian(model: str | os.PathLike | bytes | onnx.ModelProto, data: str | os.PathLike | Dataset | None,
                     *, method: str = "fisher", params: Sequence[str] | None = None, samples: int = 1000,
                     batch_size: int | None = None, seed: int = 0,
                     adam_state: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
                     include_biases: bool = False, extra_ops: tuple[str, ...] = (), output: str | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, np.ndarray]:
    """The Hessian diagonal of ``model``'s weights, as `compress` estimates it.

    Parameters
    ----------
    model : path, bytes or ModelProto of the model.
    data : its inputs (labels too for ``empirical-fisher`` and ``hutchinson``); None for ``adam``.
    method : an estimator of `onnxhq.hessian.METHODS` other than ``none``.
    params : initializer names; default the tensors `compress` quantizes (`quantized_names`).
    samples, batch_size, seed : the draws (``batch_size=None``: the estimator's default).
    adam_state : the ``.npz`` (or mapping) of Adam's second moments, for ``method="adam"`` only.
    output : the class-score output (default: the first of rank 2).
    progress : called with ``("hessian", done, total)``.

    Returns
    -------
    name -> float32 array shaped like the weight, finite and positive. With the same ``samples``
    and ``seed``, ``compress(hessian=estimate_hessian(...))`` equals ``compress(hessian=method)``.
    """
    if method == "none":
        raise ConfigError("the 'none' Hessian is no estimate (it means unweighted k-means); choose one of "
                          + ", ".join(m for m in hessian_mod.METHODS if m != "none"))
    if method not in hessian_mod.METHODS:
        raise ConfigError(f"unknown Hessian method {method!r}; choose one of {', '.join(hessian_mod.METHODS)}")
    proto = load_model(model)
    names = list(params) if params is not None else quantized_names(proto, include_biases=include_biases,
                                                                    extra_ops=extra_ops)
    if not names:
        raise ConfigError("the model has no quantizable weights (float initializers of Conv, ConvTranspose, Gemm, "
                          "MatMul), so there is no Hessian to estimate")
    dataset = data if isinstance(data, Dataset) or data is None else load_data(data, proto)
    engine = None
    if method not in ("adam", "gauss-newton") and dataset is not None:
        engine = GradientEngine(proto, params=names, output=output)
    report = None if progress is None else (lambda done, total: progress("hessian", done, total))
    return hessian_mod.estimate(method, engine, dataset, params=names, samples=samples, batch_size=batch_size,
                                seed=seed, progress=report, adam_state=adam_state, model=proto, output=output)


def quantized_names(model: onnx.ModelProto, *, include_biases: bool = False, extra_ops: tuple[str, ...] = ()) -> list[str]:
    """Initializers `compress` quantizes: the weights of `quantizable_weights`, then their biases if asked."""
    infos = quantizable_weights(model, extra_ops=extra_ops, min_size=2)
    return [w.name for w in infos] + (_biases(model, infos) if include_biases else [])


def _tell(progress, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _importances(proto, data, method, hessian, names, samples, output, seed, progress, adam_state):
    if method not in WEIGHTED_METHODS:
        return None
    if not isinstance(hessian, str):
        missing = [n for n in names if n not in hessian]
        if missing:
            raise DataError(f"the supplied Hessian has no entry for weight {missing[0]!r}")
        for n in names:
            if np.shape(hessian[n]) != initializer_shape(proto, n):
                raise DataError(f"the supplied Hessian of {n!r} has shape {np.shape(hessian[n])}, "
                                f"the weight {initializer_shape(proto, n)}")
        return {n: np.asarray(hessian[n], np.float32) for n in names}
    if hessian == "none":
        return None
    if hessian == "adam" and adam_state is None:
        raise ConfigError("the 'adam' Hessian needs the Adam second moment of training: pass --adam-state FILE.npz")
    if hessian != "adam" and data is None:
        raise ConfigError(f"method {method!r} weights errors by a Hessian estimate and needs data: pass --data "
                          "(model inputs), a precomputed --hessian file, or use --method kmeans")
    return estimate_hessian(proto, data, method=hessian, params=names, samples=samples, seed=seed,
                            adam_state=adam_state, output=output, progress=progress)


def initializer_shape(proto, name) -> tuple[int, ...]:
    return tuple(int(d) for d in initializer_map(proto)[name].dims)


def _biases(proto, infos) -> list[str]:
    """Float initializers feeding the bias input (position 2) of the nodes that use the weights."""
    inits = initializer_map(proto)
    weight_names = {w.name for w in infos}
    out = []
    for node in proto.graph.node:
        if len(node.input) > 2 and node.input[1] in weight_names and node.input[2] in inits:
            if node.input[2] not in out and node.input[2] not in weight_names:
                out.append(node.input[2])
    return out


def _stem(model, proto) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).stem
    return proto.graph.name or "model"


def _original_bytes(model, proto) -> int:
    """Size of the input: the .onnx file plus its external data files, or the serialized proto."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        raw = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
        return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
    if isinstance(model, (bytes, bytearray)):
        return len(model)
    return proto.ByteSize()


def _report(stem, proto, rewritten, quantized, artifacts, original_bytes, *, settings) -> Report:
    layouts = {s.name: s for s in describe_sidecar(artifacts.sidecar_bytes)}
    rows = []
    for name, codes in quantized.tensors.items():
        lay = layouts[naming.index_tensor(name)]
        rows.append(LayerRow(name=name, params=int(codes.indices.size), clusters=int(np.unique(codes.indices).size),
                             coded_bytes=lay.payload_bytes + lay.table_bytes,
                             bits_per_weight=lay.coded_bits_per_weight, entropy_bits=lay.entropy_bits))
    # What the graph stores: codebooks in the weights' dtype (float16 models keep float16 ones).
    codebook_bytes = sum(a.nbytes for a in read_initializers(rewritten, codebook_names(rewritten)).values())
    quantized_names = set(quantized.tensors)
    unquantized = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                      if t.name not in quantized_names and t.data_type in FLOAT_TYPES)
    files = {artifacts.graph_name: len(artifacts.graph_bytes), artifacts.sidecar_name: len(artifacts.sidecar_bytes)}
    return Report(model=stem, original_bytes=original_bytes, files=files, layers=tuple(rows),
                  codebook_bytes=codebook_bytes, unquantized_params=unquantized,
                  graph_bytes=len(artifacts.graph_bytes), sidecar_bytes=len(artifacts.sidecar_bytes), settings=settings)
