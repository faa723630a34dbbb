"""``compress``: the whole pipeline from an ONNX model to its graph + sidecar artifacts.

options (checked before anything is read) -> load -> pick weights -> hessian -> quantize ->
rewrite -> (fine-tune) -> encode -> report -> (evaluate).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import naming
from ._io import atomic_write_bytes
from .data import Dataset, load_data
from .decode import load_from_bytes
from .encode import Artifacts, index_streams_of, split_artifacts
from .evaluate import accuracy
from .finetune import finetune_codebooks
from .importances import estimate_importances, weight_names
from .model import count_float_params, load_model, model_file_bytes, read_initializers
from .options import CompressOptions, require_data, resolve_options
from .quantize import QuantizedWeights, quantize_weights
from .report import Report, layer_rows
from .rewrite import rewrite
from .training.graph import codebook_names

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]


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


def compress(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    data: str | os.PathLike | Dataset | None = None,
    *,
    options: CompressOptions | None = None,
    eval_data: str | os.PathLike | Dataset | None = None,
    progress: StageProgress | None = None,
    **keywords: Any,
) -> Result:
    """Quantize ``model``'s weights with one Hessian-weighted codebook and Huffman-code the indices.

    Parameters
    ----------
    model : path, bytes or ModelProto of a classifier (or any model, with ``hessian="none"``).
    data : inputs (and optional labels) for the Hessian estimate; needed by the weighted methods
        when the Hessian is estimated from data.
    options : a `CompressOptions`, or None to build one from ``keywords`` (not both).
    eval_data : labelled data; when given, both models' top-1 accuracies are measured.
    progress : called with ``(stage, done, total)``.
    **keywords : those of `CompressOptions.from_keywords`, the flat form of the options:
        ``method`` (``kmeans``, ``hkmeans``, ``uniform``, ``ecsq``; default uniform);
        ``k``, ``bits``, ``lam``, ``target_bits``: the rate, at most one; default ``target_bits=4``
        (uniform, ECSQ) or ``k=32`` (k-means), ``target_bits`` being the entropy of the indices
        in bits per weight; ``scope``, ``group_size``; ``hessian`` (an estimator name of
        `onnxhq.hessian.METHODS`, an .npz path, or diagonals keyed by weight name),
        ``hessian_samples``, ``hessian_batch_size``, ``adam_state`` (with ``hessian="adam"``);
        ``include_biases``; ``extra_ops``; ``finetune_epochs``, ``train_data``, ``finetune_lr``
        (fine-tune the codebook values, indices fixed); ``output`` (the class-score output);
        ``name`` (the artifacts' stem); ``seed``.

    Every option is checked before the model is read: a misconfigured call raises `OptionError`
    at once. ``report.settings`` is ``options.to_dict()``, so
    ``compress(model, data, options=CompressOptions.from_dict(report.settings))`` runs it again.
    """
    options = resolve_options(options, keywords, caller="compress")
    require_data(options, data)
    proto = load_model(model)
    importances = estimate_importances(proto, data, options, progress)
    result = compress_with(model, proto, options, importances, progress=progress)
    if eval_data is not None:
        _tell(progress, "evaluate", 0, 2)
        test = (
            eval_data
            if isinstance(eval_data, Dataset)
            else load_data(eval_data, proto, need_labels=True)
        )
        before = accuracy(proto, test, output=options.output)
        _tell(progress, "evaluate", 1, 2)
        after = accuracy(result.model(), test, output=options.output)
        _tell(progress, "evaluate", 2, 2)
        result.report = result.report.with_accuracy(before, after)
    return result


def compress_with(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    proto: onnx.ModelProto,
    options: CompressOptions,
    importances: Mapping[str, np.ndarray] | None,
    *,
    progress: StageProgress | None = None,
) -> Result:
    """`compress` once the model is loaded (``proto``) and its importances are known.

    ``model`` is what the user passed (it names the artifacts and gives the original size).
    """
    names = weight_names(proto, options)
    tune = options.finetune
    train = None
    if tune is not None:  # read before the slow part, so a bad file fails at once
        train = (
            tune.data
            if isinstance(tune.data, Dataset)
            else load_data(tune.data, proto, need_labels=True)
        )
    stem = options.name or _stem(model, proto)
    original_bytes = _original_bytes(model, proto)
    flat = {n: w.astype(np.float32) for n, w in read_initializers(proto, names).items()}
    pruned = {n: w == 0 for n, w in flat.items() if np.any(w == 0)}
    _tell(progress, "quantize", 0, 1)
    rate = options.rate
    assert rate is not None
    quantized = quantize_weights(
        flat,
        importances,
        scope=options.scope.kind,
        group_size=options.scope.group_size,
        method=options.method,
        pruned=pruned or None,
        seed=options.seed,
        k=rate.k,
        bits=rate.bits,
        lam=rate.lam,
        target_bits=rate.target_bits,
    )
    _tell(progress, "quantize", 1, 1)
    rewritten = rewrite(proto, quantized.codebooks, quantized.tensors)
    if tune is not None:
        assert train is not None
        rewritten = finetune_codebooks(
            rewritten,
            train,
            epochs=tune.epochs,
            lr=tune.lr,
            output=options.output,
            seed=options.seed,
            progress=progress,
        )
        tuned = read_initializers(
            rewritten, [naming.codebook_tensor(k) for k in quantized.codebooks]
        )
        quantized = replace(
            quantized,
            codebooks={
                key: tuned[naming.codebook_tensor(key)].reshape(book.shape)
                for key, book in quantized.codebooks.items()
            },
        )
    streams = index_streams_of(quantized.tensors, quantized.codebooks)
    artifacts = split_artifacts(rewritten, stem, streams=streams, original_bytes=original_bytes)
    report = _report(
        stem, proto, rewritten, quantized, artifacts, original_bytes, settings=options.to_dict()
    )
    return Result(artifacts, quantized, report)


def _tell(progress: StageProgress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _stem(model, proto: onnx.ModelProto) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).stem
    return proto.graph.name or "model"


def _original_bytes(model, proto: onnx.ModelProto) -> int:
    """Size of the input: the .onnx file plus its external data files, or the serialized proto."""
    if isinstance(model, (str, os.PathLike)):
        return model_file_bytes(model)
    if isinstance(model, (bytes, bytearray)):
        return len(model)
    return proto.ByteSize()


def _report(
    stem: str,
    proto: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    quantized: QuantizedWeights,
    artifacts: Artifacts,
    original_bytes: int,
    *,
    settings: dict[str, Any],
) -> Report:
    indices = {n: codes.indices for n, codes in quantized.tensors.items()}
    rows = layer_rows(indices, artifacts.layouts)  # the sizes encoding measured
    # What the graph stores: codebooks in the weights' dtype (float16 models keep float16 ones).
    codebook_bytes = sum(
        a.nbytes for a in read_initializers(rewritten, codebook_names(rewritten)).values()
    )
    files = {
        artifacts.graph_name: len(artifacts.graph_bytes),
        artifacts.sidecar_name: len(artifacts.sidecar_bytes),
    }
    return Report(
        model=stem,
        original_bytes=original_bytes,
        files=files,
        layers=rows,
        codebook_bytes=codebook_bytes,
        unquantized_params=count_float_params(proto, exclude=set(quantized.tensors)),
        graph_bytes=len(artifacts.graph_bytes),
        sidecar_bytes=len(artifacts.sidecar_bytes),
        settings=settings,
    )
