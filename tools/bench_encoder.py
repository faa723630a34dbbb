"""The transformer encoder, every form side by side: onnxhq's artifacts and decoded models against
the float model and onnxruntime's own quantizers.

    python -m tools.bench_encoder [--dir DIR] [--hessian fisher] [--json out.json]
        [--stats DIR] [--lowbit-only]
    python -m tools.bench_encoder --smoke      # checks the export only; skips without the model

The model and its inputs come from `tools.export_encoder` (run once in ``.venv-export``; this
tool needs no torch): ``encoder.onnx`` (all-MiniLM-L6-v2, pretrained, output an L2-normalised
N x 384 embedding), ``encoder_data.npz`` (128 sentences, calibration) and ``encoder_eval.npz``
(256 other sentences), 32 tokens each, in ``--dir`` (default ``$ONNXHQ_BENCH_MODELS``, else
``~/.cache/onnxhq-bench``). Without them it prints one line saying how to make them and skips.

One Hessian (``--hessian``, default ``fisher``) serves every onnxhq form; the ``onnxhq lowbit``
forms (`LOWBIT_FORMS`, `onnxhq.lowbit`) also use the MatMul weights' layer Hessians (both kept
in ``--stats`` when given). Per form:

- ``ratio``: the float file's bytes over the stored artifacts' (graph + sidecar) for onnxhq,
  over the runnable file for onnxruntime's quantizers, which have no other artifact;
- ``cosine`` / ``cosine_min`` / ``sqnr_db`` of the embeddings against the float model's on the
  eval sentences (`onnxhq.fidelity.measure`, kind ``real``);
- the runnable file and its onnxruntime session: bytes, session start and peak memory growth
  (``VmHWM``, fresh subprocess, median of ``--repeats``), and latency (median of ``--rounds``
  runs, one thread) for one sentence and for 32, every form's session in this process taking
  turns.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.session_cost import cost_cells, latencies, ratio_cell, session_costs

ENV = "ONNXHQ_BENCH_MODELS"
FILES = ("encoder.onnx", "encoder_data.npz", "encoder_eval.npz", "encoder_reference.npz")
HOW = "make encoder-env && .venv-export/bin/python -m tools.export_encoder"
ONNXHQ_FORMS = {  # label -> (compress keywords beside the Hessian, decode target)
    "onnxhq default": ({}, "gather"),
    "onnxhq --min-fidelity cosine=0.995": ({"min_fidelity": "cosine=0.995"}, "gather"),
    "onnxhq grid 8 bits, 16 channels -> int8": (
        {"cell_value": "grid", "bits": 8, "scope": "channel-group", "group_size": 16}, "int8"),
    "onnxhq grid 4 bits, per channel -> int4": (
        {"cell_value": "grid", "bits": 4, "scope": "channel-group", "group_size": 1}, "int4"),
}  # fmt: skip
#: label -> (`onnxhq.lowbit.LowbitOptions` keywords, GPTQ): ``onnxhq lowbit`` forms, straight
#: from the float model; the same grids at another accuracy_level are not fitted again.
LOWBIT_FORMS = {
    "onnxhq lowbit 4-bit/32, nearest": ({}, False),
    "onnxhq lowbit 4-bit/32, GPTQ": ({}, True),
    "onnxhq lowbit 4-bit/32, GPTQ, accuracy 4": ({"accuracy_level": 4}, True),
    "onnxhq lowbit 4/8-bit <= 15 MB, GPTQ, accuracy 4": (
        {"protect_bits": 8, "max_bytes": 15_000_000, "accuracy_level": 4}, True),
    "onnxhq lowbit 4/8-bit <= 20 MB, GPTQ, accuracy 4": (
        {"protect_bits": 8, "max_bytes": 20_000_000, "accuracy_level": 4}, True),
}  # fmt: skip
KEYS = ("cosine", "cosine_min", "sqnr_db")
NBITS_FORMS = (  # label, ops, note
    ("ort MatMulNBits 4-bit", ("MatMul",), "blocks of 32; embedding tables stay float"),
    ("ort MatMulNBits + GatherBlockQuantized 4-bit", ("MatMul", "Gather"), "blocks of 32"),
)


def default_dir() -> Path:
    """``$ONNXHQ_BENCH_MODELS``, else ``~/.cache/onnxhq-bench`` (as `tools.export_encoder`)."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxhq-bench"


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def embed(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from onnxhq.runtime import make_session, run_batched

    session = make_session(model)
    return run_batched(session, feeds, session.get_outputs()[0].name, batch_size=32)


def onnxhq_forms(path: Path, data: dict, hessian, work: Path) -> dict[str, dict]:
    """Each of `ONNXHQ_FORMS` compressed, saved and decoded: label -> {file, stored, note}."""
    import onnxhq
    from onnxhq.decode import decode_file
    from onnxhq.errors import OnnxhqError

    evals = onnxhq.Dataset(inputs=data["eval"])
    forms = {}
    for i, (label, (kw, target)) in enumerate(ONNXHQ_FORMS.items()):
        t = time.perf_counter()
        try:
            result = onnxhq.compress(path, data["calib"], hessian=hessian, eval_data=evals, **kw)
        except (OnnxhqError, TypeError) as exc:  # an option this checkout lacks, an unmet target
            forms[label] = {"file": None, "stored": None, "note": f"failed: {str(exc)[:100]}"}
            continue
        saved = result.save(work / f"form{i}")  # graph, sidecar (, external data)
        graph = saved[0]
        file = work / f"form{i}_{target}.onnx"
        decode_file(graph, file, target=target)
        s = result.report.to_dict()["settings"]
        rate = next(f"{k} {s[k]}" for k in ("k", "bits", "lam", "target_bits") if s[k] is not None)
        forms[label] = {
            "file": file,
            "stored": sum(f.stat().st_size for f in saved),
            "note": f"{s['method']} {rate}, {s['scope']}, --target {target}, "
            f"{time.perf_counter() - t:.0f} s",
        }
    return forms


def statistics_cached(path: Path, calib, hessian: str, stats: Path | None):
    """(importances, layer Hessians of the MatMul weights, seconds) of the encoder, read from
    ``stats`` (``importances.npz``, ``layers.npz``) when there, else estimated (and written there
    when ``stats`` is given)."""
    import onnx

    import onnxhq
    from onnxhq.layer_inputs import SAMPLES, layer_hessians
    from onnxhq.layerwise import LayerHessian
    from onnxhq.lowbit import candidates

    files = (stats / "importances.npz", stats / "layers.npz") if stats else None
    if files and all(f.is_file() for f in files):
        imp = load(files[0])
        raw = load(files[1])
        lh = {k[2:]: LayerHessian(bool(raw["t/" + k[2:]]), 1, (v,), int(raw["n/" + k[2:]]))
              for k, v in raw.items() if k.startswith("h/")}  # fmt: skip
        return imp, lh, 0.0
    t = time.perf_counter()
    imp = dict(onnxhq.estimate_hessian(path, calib, method=hessian, fallback=True))
    model = onnx.load(str(path))
    names = [n for n, op in candidates(model).items() if op == "MatMulNBits" and n in imp]
    lh = layer_hessians(model, calib.inputs, names, samples=SAMPLES)
    seconds = time.perf_counter() - t
    if files:
        stats.mkdir(parents=True, exist_ok=True)
        np.savez(files[0], **imp)
        one = {k: v for k, v in lh.items() if v.groups == 1 and len(v.blocks) == 1}
        arrays = {f"h/{k}": v.blocks[0] for k, v in one.items()}
        arrays.update({f"t/{k}": np.array(v.transpose) for k, v in one.items()})
        arrays.update({f"n/{k}": np.array(v.samples) for k, v in one.items()})
        np.savez(files[1], **arrays)
    return imp, lh, seconds


def lowbit_forms(path: Path, imp, lh, work: Path) -> dict[str, dict]:
    """Each of `LOWBIT_FORMS` written by `onnxhq.lowbit.lower_lowbit`: label -> {file, stored,
    note}. Forms of the same bits, block sizes and rounding are fitted once (`fit_forms`)."""
    import onnx

    from onnxhq.lowbit import LowbitOptions, fit_forms, lower_lowbit

    model = onnx.load(str(path))
    fits: dict[tuple, Any] = {}
    forms: dict[str, dict[str, Any]] = {}
    for i, (label, (kw, gptq)) in enumerate(LOWBIT_FORMS.items()):
        t = time.perf_counter()
        options = LowbitOptions(**kw)
        key = (options.bits, options.protect_bits, options.block_sizes, gptq)
        if key not in fits:
            fits[key] = fit_forms(model, imp, options, layer_hessians=lh if gptq else None)
        lowered = lower_lowbit(model, imp, options, fitted=fits[key])
        file = work / f"lowbit{i}.onnx"
        onnx.save(lowered.model, str(file))
        counts: dict[str, int] = {}
        for c in lowered.choices.values():
            counts[c.label] = counts.get(c.label, 0) + 1
        forms[label] = {
            "file": file,
            "stored": file.stat().st_size,
            "note": ", ".join(f"{n} x {lb}" for lb, n in sorted(counts.items()))
            + f", {time.perf_counter() - t:.0f} s",
        }
    return forms


def ort_forms(path: Path, work: Path) -> dict[str, dict]:
    """onnxruntime's ``quantize_dynamic`` (int8 weights, per tensor: MatMul and the Gather
    tables) and its 4-bit weight-only quantizer (blocks of 32, symmetric) on the MatMul weights
    alone (``MatMulNBits``) and on the Gather tables too (``GatherBlockQuantized``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    forms: dict[str, dict] = {}
    target = work / "ort_int8.onnx"
    quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8)
    forms["ort quantize_dynamic int8"] = {"file": target, "note": "QInt8 weights, per tensor"}
    for label, ops, note in NBITS_FORMS:
        forms[label] = {"file": None, "note": nbits_missing()}
        if forms[label]["note"] is None:
            forms[label] = {"file": nbits(path, ops, work / f"ort_nbits_{len(ops)}.onnx")}
            forms[label]["note"] = note
    for f in forms.values():
        f["stored"] = f["file"].stat().st_size if f["file"] else None
    return forms


def nbits_missing() -> str | None:
    """Why onnxruntime's 4-bit quantizer does not import here (in 1.32 it needs ``onnx-ir``,
    which onnxruntime does not install), or None."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime's 4-bit quantizer does not import ({exc}): pip install onnx-ir"
    return None


def nbits(path: Path, ops: tuple[str, ...], target: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(path)), block_size=32, is_symmetric=True, op_types_to_quantize=ops
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target))
    return target


def check_export(folder: Path, feeds: dict) -> float:
    """Largest difference between onnxruntime's embeddings and torch's (written at export)."""
    ref = load(folder / FILES[3])["embedding"]
    return float(np.abs(embed(str(folder / FILES[0]), feeds) - ref).max())


def bench(folder: Path, args, work: Path) -> list[dict]:
    import onnxhq
    from onnxhq.fidelity import measure

    path = folder / FILES[0]
    data = {"calib": load(folder / FILES[1]), "eval": load(folder / FILES[2])}
    calib = onnxhq.Dataset(inputs=data["calib"])
    original = embed(str(path), data["eval"])
    hessian, layers, hessian_s = statistics_cached(path, calib, args.hessian, args.stats)
    size = path.stat().st_size
    note = f"original file; Hessian {args.hessian} and layer Hessians: {hessian_s:.0f} s"
    forms = {"float": {"file": path, "stored": size, "note": note}}
    if not args.lowbit_only:
        forms.update(onnxhq_forms(path, {"calib": calib, "eval": data["eval"]}, hessian, work))
    forms.update(lowbit_forms(path, hessian, layers, work))
    forms.update(ort_forms(path, work))
    runnable = {k: f["file"] for k, f in forms.items() if f["file"] is not None}
    lat1 = latencies(runnable, {k: v[:1] for k, v in data["eval"].items()}, args.rounds)
    sub = {k: v[:32] for k, v in data["eval"].items()}
    lat32 = latencies(runnable, sub, max(3, args.rounds // 4))
    rows = []
    for label, f in forms.items():
        row = {"form": label, "ratio": size / f["stored"] if f["stored"] else None}
        row["note"] = f["note"]
        if f["file"] is not None:
            got = original if label == "float" else embed(str(f["file"]), data["eval"])
            row.update({k: v for k, v in measure("real", original, got).items() if k in KEYS})
            row["file_bytes"] = f["file"].stat().st_size
            row.update(session_costs(f["file"], folder / FILES[2], args.repeats))
            row["latency1_ms"], row["latency32_ms"] = 1000 * lat1[label], 1000 * lat32[label]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["form", "ratio", "cosine (min)", "SQNR dB", "runnable file", "start s", "start MB"]
    cols += ["run MB", "latency 1 ms", "latency 32 ms", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    b = rows[0]
    for r in rows:
        cells = [r["form"], f"{r['ratio']:.2f}x" if r["ratio"] else "-"]
        if "file_bytes" in r:
            cells += [
                f"{r['cosine']:.4f} ({r['cosine_min']:.4f})",
                "inf" if r["form"] == "float" else f"{r['sqnr_db']:.1f}",
                f"{r['file_bytes']:,}",
                *cost_cells(r, b, mb_digits=0),
                ratio_cell(r["latency1_ms"], b["latency1_ms"]),
                ratio_cell(r["latency32_ms"], b["latency32_ms"], digits=1),
            ]
        else:
            cells += ["-"] * 8
        lines.append("| " + " | ".join(cells + [r["note"]]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help=f"the exported model's folder "
                    f"(default ${ENV} or ~/.cache/onnxhq-bench)")  # fmt: skip
    ap.add_argument(
        "--hessian", default="fisher", help="the onnxhq forms' Hessian (default fisher)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per session measure")
    ap.add_argument("--rounds", type=int, default=20, help="latency runs per form")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--stats", type=Path, help="a folder to keep the importances and layer "
                    "Hessians in and read them back from")  # fmt: skip
    ap.add_argument("--lowbit-only", action="store_true", help="leave out the compress forms "
                    "(float, onnxhq lowbit and onnxruntime's quantizers only)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="check the export only (seconds)")
    args = ap.parse_args(argv)
    folder = args.dir or default_dir()
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        print(f"skipped: {folder / missing[0]} is missing; make it with `{HOW} --dir {folder}`")
        return 0
    diff = check_export(folder, load(folder / FILES[2]))
    print(f"export check: onnxruntime vs torch embeddings, max abs difference {diff:.2e}")
    if args.smoke:
        return 0 if diff < 1e-4 else 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(folder, args, Path(tmp))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
