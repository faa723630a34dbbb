"""``compress``: the whole pipeline from an ONNX model to its graph + sidecar artifacts.

options (checked before anything is read) -> load -> pick weights -> hessian -> quantize ->
rewrite -> (fine-tune) -> encode -> report -> (evaluate).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import naming
from ._io import write_files
from .biascorrect import absorb_bias_errors, correct_biases, correct_quantized_biases
from .compact import compact_graph, name_plan, rename_streams, weight_rows
from .compensate import LayerHessian, compensate
from .data import Dataset, load_data
from .decode import load_from_bytes
from .encode import Artifacts, index_streams_of, split_artifacts
from .evaluate import Reference, fidelity, reference_outputs
from .finetune import finetune_codebooks
from .importances import estimate_importances, settled, weight_names
from .layer_inputs import gather_layer_hessians
from .model import (
    count_float_params,
    load_model,
    model_file_bytes,
    read_initializers,
)
from .options import (
    SUPPLIED,
    CompressOptions,
    OptionError,
    require_data,
    require_eval,
    resolve_options,
)
from .outputs import output_list, parse_output_spec
from .quantize import QuantizedWeights, measure_errors, quantize_weights
from .report import LayerRow, Report, error_rows, layer_rows
from .rewrite import rewrite
from .streamed import compress_streamed, streamable
from .training.graph import codebook_names

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]


@dataclass
class Result:
    """A compressed model in memory: the artifacts, the quantized weights and the report.

    `save` updates ``report.files`` to the absolute paths it wrote. ``quantized`` and ``report``
    name the weights as the model does; the artifacts (and `model`) as ``names`` says: each
    quantized weight's name there, where short names (``compact_names``) changed it.
    """

    artifacts: Artifacts
    quantized: QuantizedWeights
    report: Report
    names: dict[str, str] = field(default_factory=dict)

    def model(self) -> onnx.ModelProto:
        """The runnable decoded model (uint indices + dequantize nodes)."""
        return load_from_bytes(self.artifacts.graph_bytes, self.artifacts.sidecar())

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write graph and sidecar into ``directory`` as one (`_io.write_files`: a reader sees
        the old pair or the new one); returns their absolute paths."""
        directory = Path(directory)
        a = self.artifacts
        files = a.files()  # graph, sidecar and, past 2 GB, the graph's external data
        paths = [(directory / name).resolve() for name, _ in files]
        write_files(directory, files)
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
    eval_data : inputs (labels optional); when given, the compressed model's outputs are compared
        with the original's (``report.fidelity``) and, with labels, both accuracies measured.
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
        ``name`` (the artifacts' stem); ``seed``; ``guard`` (``requantize``, ``warn``, ``off``:
        a tensor a shared codebook wrecks gets a codebook of its own, is flagged, or is not
        checked); ``max_drop`` (accuracy points) or ``min_fidelity`` (``"cosine=0.995"``): instead
        of a rate, search rate and scope for the smallest artifacts meeting the target on
        ``eval_data`` (`onnxhq.search`), the search in ``report.search``.

    Every option is checked before the model is read: a misconfigured call raises `OptionError`
    at once. ``report.settings`` is ``options.to_dict()`` with the Hessian that ran (estimator
    and samples: `onnxhq.importances.settled`), so
    ``compress(model, data, options=CompressOptions.from_dict(report.settings))`` runs it again.
    """
    options = resolve_options(options, keywords, caller="compress")
    require_data(options, data)
    require_eval(options, eval_data)
    lazy = isinstance(model, (str, os.PathLike)) and eval_data is None and streamable(options)
    proto = load_model(model, lazy=lazy)  # lazy: weights stay in their files, read one by one
    proto = check_scope_opset(options, proto)
    test = reference = None
    if eval_data is not None:  # read (and the target checked against it) before the slow part
        test = eval_data if isinstance(eval_data, Dataset) else load_data(eval_data, proto)
        _tell(progress, "evaluate", 0, 1)
        reference = reference_outputs(proto, test, output=options.output)
        if options.target is not None:
            from .search import check_target

            check_target(options.target, reference, test)
    from .search import statistics_options

    path = model if lazy and isinstance(model, (str, os.PathLike)) else None
    folded = fold_layers(options, proto, path)  # after the reference: compared with the model
    estimated = options.hessian is not None and options.hessian.method != SUPPLIED
    source = proto
    if lazy and options.weighted and estimated:
        source = load_model(model)
        fold_layers(options, source)
    statistics = estimate_statistics(
        source,
        data,
        statistics_options(options, proto, data),  # a search's layer statistics too
        progress,
    )
    if options.target is not None:
        from .search import search_target

        assert test is not None and reference is not None
        result = search_target(model, proto, options, statistics, test, reference, progress)
        result.report = replace(result.report, folded_batchnorms=folded)
        return result
    importances, layers = statistics
    result = compress_with(
        model, proto, options, importances, layer_hessians=layers, progress=progress, release=True
    )
    result.report = replace(result.report, folded_batchnorms=folded)
    if test is not None and reference is not None:
        result.report = measured(result, reference, test, options.output)
        _tell(progress, "evaluate", 1, 1)
    return result


def fold_layers(
    options: CompressOptions, proto: onnx.ModelProto, path: str | os.PathLike | None = None
) -> int:
    """With ``options.fold_batchnorm``, fold ``proto``'s BatchNormalization nodes into the layers
    before them, in place (`onnxhq.fold`; ``path``: the file a lazy ``proto`` came from);
    returns how many were folded. A supplied Hessian or Adam state is of the unfolded weights:
    with one nothing is folded."""
    if not options.fold_batchnorm:
        return 0
    if options.hessian is not None and options.hessian.method in (SUPPLIED, "adam"):
        log.info("BatchNormalization left unfolded: the supplied Hessian or Adam state belongs "
                 "to the weights of the model as given")  # fmt: skip
        return 0
    from .fold import fold_batchnorms

    return fold_batchnorms(proto, path=path)


def estimate_statistics(
    proto: onnx.ModelProto,
    data: str | os.PathLike | Dataset | None,
    options: CompressOptions,
    progress: StageProgress | None = None,
) -> tuple[Mapping[str, np.ndarray] | None, dict[str, LayerHessian] | None]:
    """What every compression of ``proto`` with ``options`` reads from ``data``, estimated once
    (a sweep or a search then compresses at many rates with it): the importances, and with
    ``options.compensate`` each layer's input statistics (the data file read once for both)."""
    if options.compensate and data is not None and not isinstance(data, Dataset):
        data = load_data(data, proto)
    importances = estimate_importances(proto, data, options, progress)
    if not options.compensate:
        return importances, None
    assert data is not None  # require_data
    return importances, gather_layer_hessians(proto, data, options, progress)


def compress_point(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    proto: onnx.ModelProto,
    options: CompressOptions,
    statistics: tuple[Mapping[str, np.ndarray] | None, Mapping[str, LayerHessian] | None],
    reference: Reference,
    test: Dataset,
    *,
    label: str,
    progress: StageProgress | None = None,
) -> Result:
    """One point of a sweep or a target search: `compress_with` at ``options`` with the
    `estimate_statistics` shared by the points, its stages prefixed by ``label``
    (``"k=8 quantize"``), its report `measured` against ``reference`` on ``test``."""
    importances, layers = statistics
    stage = None if progress is None else _prefixed(progress, label)
    result = compress_with(
        model, proto, options, importances, layer_hessians=layers, progress=stage
    )
    result.report = measured(result, reference, test, options.output)
    return result


def measured(
    result: Result, reference: Reference, test: Dataset, output: str | tuple[str, ...] | None
) -> Report:
    """``result``'s report with its fidelity to the original on ``test``, and the accuracies of
    the class-score output (``output``, or the first output the labels fit) where labels exist."""
    fid = fidelity(reference, result.model(), test)
    name = parse_output_spec(output_list(output)[0]).name
    if name not in fid:
        name = next((n for n, m in fid.items() if "accuracy" in m), None)
    report = result.report.with_fidelity(fid)
    if name is not None and "accuracy" in fid[name]:
        report = report.with_accuracy(reference.accuracy(name), fid[name]["accuracy"])
    return report


def check_scope_opset(options: CompressOptions, proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, converted up (`onnxhq.search.scope_opset`) when its opset is below what the
    channel-group scope decodes with and that scope is asked for or searched; refused, before
    any quantization, when the conversion fails for a scope asked for."""
    from .search import scope_opset

    return scope_opset(options, proto)


def compress_with(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    proto: onnx.ModelProto,
    options: CompressOptions,
    importances: Mapping[str, np.ndarray] | None,
    *,
    layer_hessians: Mapping[str, LayerHessian] | None = None,
    progress: StageProgress | None = None,
    release: bool = False,
) -> Result:
    """`compress` once the model is loaded (``proto``) and its importances are known.

    ``model`` is what the user passed (it names the artifacts and gives the original size).
    ``layer_hessians`` (`onnxhq.layer_inputs.gather_layer_hessians`) is needed by
    ``options.compensate``. Where the options allow it the weights go one tensor at a time
    (`onnxhq.streamed`); with ``release`` their bytes are then freed from ``proto`` (the
    caller's own copy) as they are read.
    """
    if options.compensate and layer_hessians is None:
        raise OptionError("compensate needs each layer's input statistics: pass layer_hessians "
                          "(onnxhq.layer_inputs.gather_layer_hessians)", "compensate")  # fmt: skip
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
    if streamable(options):
        _tell(progress, "quantize", 0, 1)
        path = model if isinstance(model, (str, os.PathLike)) else None
        done = compress_streamed(proto, names, options, importances, stem, path=path,
                                 release=release, original_bytes=original_bytes,
                                 progress=progress)  # fmt: skip
        report = _report(stem, proto, done.rewritten, done.quantized, done.artifacts,
                         original_bytes, settings=settled(options, importances).to_dict(),
                         rows=done.rows, names=done.names)  # fmt: skip
        renamed = name_plan(proto) if options.compact_names else None
        return Result(done.artifacts, done.quantized, report, _names(done.names, renamed))
    flat = {n: w.astype(np.float32) for n, w in read_initializers(proto, names).items()}
    pruned = {n: w == 0 for n, w in flat.items() if np.any(w == 0)}
    _tell(progress, "quantize", 0, 1)
    rate = options.rate
    assert rate is not None
    quantizer = partial(quantize_weights, method=options.method, seed=options.seed, k=rate.k,
                        bits=rate.bits, lam=rate.lam, target_bits=rate.target_bits,
                        cell_value=options.cell_value)  # fmt: skip
    quantized = quantizer(
        flat,
        importances,
        scope=options.scope.kind,
        group_size=options.scope.group_size,
        pruned=pruned or None,
        guard=options.guard,
    )
    if options.compensate:
        assert layer_hessians is not None
        # a quantized bias (include_biases): its rounding absorbed by the weights' target, then
        # corrected in float from the compensated weights and quantized again (onnxhq.biascorrect)
        target = absorb_bias_errors(proto, quantized, flat, layer_hessians)
        quantized = compensate(
            quantized, target, layer_hessians, importances, pruned=pruned or None, lam=rate.lam,
            match_bits=rate.target_bits is not None,
        )[0]  # fmt: skip
        proto = correct_biases(proto, quantized, flat, layer_hessians)[0]  # float biases
        quantized = correct_quantized_biases(
            proto, quantized, flat, layer_hessians, importances=importances, quantize=quantizer
        )[0]
    _tell(progress, "quantize", 1, 1)
    rewritten = rewrite(proto, quantized.codebooks, quantized.tensors)
    if tune is not None:
        assert train is not None
        rewritten = finetune_codebooks(
            rewritten,
            train,
            epochs=tune.epochs,
            lr=tune.lr,
            output=options.output if isinstance(options.output, str) else None,  # one: check_output
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
        quantized = replace(quantized, errors=measure_errors(flat, quantized))  # tuned values
    streams = index_streams_of(quantized.tensors, quantized.codebooks)
    plan = name_plan(proto) if options.compact_names else None
    written = rewritten if plan is None else compact_graph(rewritten, plan)
    streams = streams if plan is None else rename_streams(streams, plan)
    artifacts = split_artifacts(written, stem, streams=streams, original_bytes=original_bytes)
    rows = None
    if plan is not None:  # the report names weights as the model does
        indices = {n: codes.indices for n, codes in quantized.tensors.items()}
        rows = weight_rows(indices, artifacts.layouts, plan)
    report = _report(stem, proto, rewritten, quantized, artifacts, original_bytes,
                     settings=settled(options, importances).to_dict(), rows=rows)  # fmt: skip
    return Result(artifacts, quantized, report, _names(quantized.tensors, plan))


def _names(weights, plan) -> dict[str, str]:
    """Each quantized weight's name in the artifacts under ``plan`` (None: its own)."""
    return {w: w if plan is None else plan.value(w) for w in weights}


def _tell(progress: StageProgress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _prefixed(progress: StageProgress, prefix: str) -> StageProgress:
    return lambda stage, done, total: progress(f"{prefix} {stage}", done, total)


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
    rows: tuple[LayerRow, ...] | None = None,
    names: tuple[str, ...] | None = None,
) -> Report:
    if rows is None:
        indices = {n: codes.indices for n, codes in quantized.tensors.items()}
        rows = layer_rows(indices, artifacts.layouts)  # the sizes encoding measured
    # the errors quantizing (and fine-tuning) left, and what the guard did
    errors = error_rows(quantized.errors, flagged=quantized.flagged, guarded=quantized.guarded)
    # What the graph stores: codebooks in the weights' dtype (float16 models keep float16 ones).
    codebook_bytes = sum(
        a.nbytes for a in read_initializers(rewritten, codebook_names(rewritten)).values()
    )
    files = {
        artifacts.graph_name: len(artifacts.graph_bytes),
        artifacts.sidecar_name: artifacts.sidecar_size,
        **{name: size for name, _, size in artifacts.graph_data},
    }
    return Report(
        model=stem,
        original_bytes=original_bytes,
        files=files,
        layers=rows,
        errors=errors,
        codebook_bytes=codebook_bytes,
        unquantized_params=count_float_params(
            proto, exclude=set(quantized.tensors if names is None else names)
        ),
        graph_bytes=artifacts.graph_size,
        sidecar_bytes=artifacts.sidecar_size,
        settings=settings,
    )
