"""Compensated rows of ``tools.reproduce_table``: the curve points again with ``--compensate``.

For each model (dense, pruned) and method, every rate of the rate-accuracy curve is compressed
again with error compensation (`onnxhq.compensate`, GPTQ-style assignment onto the same
codebooks, least-squares refit, bias correction), with the same importances, scope and rate and
no fine-tuning: keys ``compensated/<tag>[@scope]/<method>/<rate>`` beside the curve's
``curve/...`` (the same settings without compensation). Each model's layer input statistics
(`onnxhq.layer_inputs`, ``SAMPLES`` calibration samples) are gathered once and cached in
``layers_<tag>.npz``. A curve point not yet run is run here too, so every compensated row has
its plain twin; the report pairs them (`tools.table_report.compensation_rows`).

The table quantizes the biases with the weights (``include_biases``): each quantized bias's
rounding is absorbed by its layer's weights before compensation, and the bias is corrected and
quantized again after it (`onnxhq.biascorrect`; since 2026-12-06 — cached compensated rows made
before that lack both).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

import onnxhq
from onnxhq.data import Dataset
from onnxhq.evaluate import accuracy
from onnxhq.importances import quantized_names
from onnxhq.layer_inputs import SAMPLES, layer_hessians
from onnxhq.layerwise import LayerHessian
from onnxhq.options import CompressOptions
from onnxhq.pipeline import compress_with
from tools.table_nets import METHODS, Net
from tools.table_report import Cache

Log = Callable[[str], None]


def save_layers(path: Path, layers: Mapping[str, LayerHessian]) -> None:
    """Write `LayerHessian`s to one .npz (mirror of `load_layers`)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (name, lh) in enumerate(sorted(layers.items())):
        head = [lh.transpose, lh.groups, lh.samples, len(lh.blocks), lh.mean is not None]
        arrays[f"{i}/name"] = np.array(name)
        arrays[f"{i}/head"] = np.array(head, np.int64)
        arrays.update({f"{i}/block{j}": b for j, b in enumerate(lh.blocks)})
        if lh.mean is not None:
            arrays[f"{i}/mean"] = lh.mean
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_layers(path: Path) -> dict[str, LayerHessian]:
    """The `LayerHessian`s `save_layers` wrote, by weight name."""
    out = {}
    with np.load(path) as z:
        count = sum(1 for k in z.files if k.endswith("/name"))
        for i in range(count):
            transpose, groups, samples, nblocks, has_mean = (int(v) for v in z[f"{i}/head"])
            blocks = tuple(z[f"{i}/block{j}"] for j in range(nblocks))
            mean = z[f"{i}/mean"] if has_mean else None
            out[str(z[f"{i}/name"])] = LayerHessian(bool(transpose), groups, blocks, samples, mean)
    return out


def layer_statistics(model, tag: str, calib: Dataset, cache: Cache) -> dict[str, LayerHessian]:
    """Each quantized weight's layer input statistics on ``calib`` (cached per model ``tag``)."""
    path = cache.dir / f"layers_{tag}.npz"
    if not path.is_file():
        names = quantized_names(model, include_biases=True)
        save_layers(path, layer_hessians(model, calib.inputs, names, samples=SAMPLES, seed=0))
    return load_layers(path)


def point(
    model,
    diag: dict,
    label: str,
    rate: tuple[str, float],
    test: Dataset,
    layers: Mapping[str, LayerHessian] | None,
    *,
    scope: str,
) -> dict:
    """One point without fine-tuning, compensated when ``layers`` are given; the row fields of
    ``reproduce_table.run`` and whether the artifact's settings say ``compensate``."""
    method, hessian = METHODS[label]
    options = CompressOptions.from_keywords(
        method=method,
        include_biases=True,
        scope=scope,
        compensate=layers is not None,
        hessian=None if hessian == "none" else diag[hessian],
        **{rate[0]: rate[1]},
    )
    t0 = time.time()
    importances = None if hessian == "none" else diag[hessian]
    result = compress_with(model, model, options, importances, layer_hessians=layers)
    rep = result.report
    quantized_bits = 8 * sum(r.coded_bytes for r in rep.layers) / max(rep.quantized_params, 1)
    return {
        "accuracy": accuracy(result.model(), test),
        "bytes": rep.compressed_bytes,
        "ratio": rep.compression_ratio,
        "paper_ratio": rep.paper_ratio,
        "bits_per_weight": quantized_bits,
        "compensate": bool(rep.settings.get("compensate")),
        "seconds": time.time() - t0,
    }


def compensate_stage(
    net: Net,
    cache: Cache,
    models: dict,
    diags: dict,
    data: tuple[Dataset, Dataset],
    methods,
    scope: str,
    log: Log,
) -> None:
    """Compensated points at every curve rate of ``methods`` on each model in ``models``;
    ``data`` is (calibration, test). Points already cached are kept (the stage resumes)."""
    calib, test = data
    for tag, model in models.items():
        where = tag if scope == "network" else f"{tag}@{scope}"
        layers = None
        for label in methods:
            if METHODS[label][1] != "none" and METHODS[label][1] not in diags[tag]:
                continue
            for rate in net.rates(label, tag):
                key = f"{where}/{label}/{rate[0]}={rate[1]}"
                for prefix in ("curve", "compensated"):  # the plain point too, if missing
                    if cache.get(f"{prefix}/{key}") is not None:
                        continue
                    if prefix == "compensated" and layers is None:
                        layers = layer_statistics(model, tag, calib, cache)
                    use = layers if prefix == "compensated" else None
                    try:
                        row = point(model, diags[tag], label, rate, test, use, scope=scope)
                    except onnxhq.OnnxhqError as exc:
                        row = {"error": str(exc)}
                    cache.put(f"{prefix}/{key}", row)
                log(f"{net.name} compensated/{key}: {cache.get('compensated/' + key)}")
