"""Real models, every form side by side: onnxhq's artifacts and decoded models against the float
model and onnxruntime's own quantizers.

    python -m tools.bench_real [--models rec det cls] [--hessian none] [--json out.json]
    python -m tools.bench_real --models cls --target [--baseline]   # --baseline: no fold, names
    python -m tools.bench_real --models rec --target-only [--eval-lines 200 --calib-lines 64]
    python -m tools.bench_real --smoke          # the bundled LeNet-5 on its sample, seconds

For each model (the three PaddleOCR models of ``$ONNXHQ_SHARED/models/real``; inputs rendered
from text by `tools.render_text`, deterministic) and each form, one row:

- ``ratio``: the original file's bytes over the compressed artifacts' (graph + sidecar, every byte)
  for onnxhq; over the runnable file for onnxruntime's quantizers, which have no other artifact.
- fidelity against the original model's own outputs (`onnxhq.fidelity.measure`): the recognizer's
  share of identical greedy-CTC strings, the detector's map IoU at 0.5 and max abs error, the
  classifier's agreement; on the eval inputs (those the target search chooses its point on) and,
  as ``held-out``, on inputs disjoint from the eval and calibration ones (another seed, no shared
  text): the search selects on the eval set, the held-out figure says whether the point holds.
  Sizes per model in `COUNTS` (the recognizer: 200 eval lines, so 0.99 allows 2 differing; 64
  calibration lines; 200 held-out), changed with ``--eval-lines``, ``--calib-lines``,
  ``--heldout-lines``.
- the runnable file (``decode`` output) and its onnxruntime session: file bytes, session start
  and peak memory while starting (``VmHWM`` growth in a fresh subprocess, median of 3), and
  latency (median, one input, one thread), the float model's measured in the same process.

Forms: onnxhq's defaults (``--hessian``, default ``none``: the gradient Hessians need minutes per
model on a shared 2-core machine), ``--scope layer``, 6 bits per layer, and one symmetric grid
per output channel (max |row| / 127 and / 7 per step, as onnxruntime's per-channel quantizers)
decoded to ``--target int8`` and ``int4``; onnxruntime's ``quantize_dynamic`` (uint8 weights,
per tensor: its CPU build runs ConvInteger for uint8 weights only) and its 4-bit ``MatMulNBits``
where the installed build has the quantizer; and `tools.deploy_forms.native_forms`: compress
``--cell-value grid --bits 4 --scope layer`` decoded to ``gather``, ``int8`` and ``int4``.
The transformer encoder has its own tool, `tools/bench_encoder.py` (the model exported by
`tools/export_encoder.py` in `.venv-export`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tools.session_cost import cost_cells, latencies, ratio_cell, session_costs

REAL = ("rec", "det", "cls")
FILES = {
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
KINDS = {"rec": "classes", "det": "bernoulli", "cls": "classes", "lenet5": "classes"}
KEYS = {"rec": ("sequence",), "det": ("iou", "max_abs_error"), "cls": ("agreement",)}
KEYS["lenet5"] = KEYS["cls"]
ONNXHQ_FORMS = {  # label -> compress keywords (beside the Hessian)
    "onnxhq default": {},
    "onnxhq --scope layer": {"scope": "layer"},
    "onnxhq 6 bits, layer": {"scope": "layer", "target_bits": 6.0},
}
GRID_FORMS = {"onnxhq rows +-127 -> int8": (127, "int8"), "onnxhq rows +-7 -> int4": (7, "int4")}
#: The issue-13 goals, searched for by the "onnxhq target" form (`compress --min-fidelity`).
TARGETS = {"rec": "sequence=0.99", "det": "iou=0.98", "cls": "agreement=0.995"}
TARGETS["lenet5"] = "agreement=0.99"


#: Per model: (eval, calibration, held-out) sizes in lines (pages for det, images for lenet5).
#: The recognizer's goal (0.99 identical strings) needs >= 100 eval lines to allow one differing
#: line; 200 allow two. Held-out lines come from another seed and share no text with the others
#: (`heldout`).
COUNTS = {"rec": (200, 64, 200), "cls": (128, 32, 128), "det": (6, 4, 6), "lenet5": (200, 64, 200)}
SEEDS = {"rec": (0, 1, 6), "cls": (2, 3, 7), "det": (4, 5, 8)}  # eval, calibration, held-out
#: Held-out lines drawn per line kept: the phrases come from one paragraph, about half of them
#: repeat an eval or calibration line's text and are dropped.
HELD_DRAWS = 4


def inputs(name: str, counts: tuple[int, ...] | None = None) -> tuple[dict, dict]:
    """(evaluation inputs, calibration inputs) of model ``name``, keyed by its input name;
    ``counts`` (eval, calibration) overrides `COUNTS`."""
    return _sets(name, counts or COUNTS[name])[:2]


def heldout(name: str, counts: tuple[int, ...] | None = None) -> dict:
    """Held-out inputs of ``name`` (``counts``: (eval, calibration, held-out), default `COUNTS`):
    another seed (for lenet5 the test images after the eval ones), and no line whose text the
    eval or calibration lines hold: the first that many such lines of `HELD_DRAWS` times as many
    drawn (fewer only if the draws run out)."""
    return _sets(name, counts or COUNTS[name], held=True)[2]


def _sets(name: str, counts: tuple[int, ...], held: bool = False) -> tuple[dict, dict, dict]:
    from tools.render_text import line_batch, page_batch

    n_eval, n_calib = counts[:2]
    n_held = counts[2] if held else 0
    if name == "lenet5":
        from tools.datasets import mnist

        test = mnist("test", smoke=True, limit=n_eval + n_held).inputs["input"]
        calib = mnist("train", smoke=True, limit=n_calib).inputs
        return {"input": test[:n_eval]}, calib, {"input": test[n_eval:]}
    seeds = SEEDS[name]
    if name == "det":
        sizes = (n_eval, n_calib, n_held)
        pages = [page_batch(n, height=320, width=480, seed=s) if n else None
                 for n, s in zip(sizes, seeds)]  # fmt: skip
        return {"x": pages[0]}, {"x": pages[1]}, {"x": pages[2]}
    kw = {"width": 320} if name == "rec" else {"width": 192, "flip_every": 2}
    ev, ev_text = line_batch(n_eval, seed=seeds[0], **kw)
    cal, cal_text = line_batch(n_calib, seed=seeds[1], **kw)
    if not n_held:
        return {"x": ev}, {"x": cal}, {}
    x, text = line_batch(HELD_DRAWS * n_held, seed=seeds[2], **kw)
    seen = set(ev_text) | set(cal_text)
    keep = np.flatnonzero([t not in seen for t in text])[:n_held]
    return {"x": ev}, {"x": cal}, {"x": x[keep]}


def run(model, feeds: dict) -> np.ndarray:
    from onnxhq.runtime import make_session, run_batched

    session = make_session(model)
    return run_batched(session, feeds, session.get_outputs()[0].name, batch_size=16)


def grid_model(proto, names, levels: int, stem: str, original_bytes: int):
    """Each weight row (output channel) on its own symmetric grid ``max|row| / levels * j``,
    ``|j| <= levels`` (per-channel, as onnxruntime's quantizers can do), Huffman-coded: the
    artifacts and the decoded gather model. compress's grids (``--cell-value grid``) span each
    codebook's weights, not ``+-max|row|``, so this builds the codes itself; channel-group
    codebooks need opset 15, so older models are converted first."""
    from onnx import version_converter

    from onnxhq.decode import load_from_bytes
    from onnxhq.encode import index_streams_of, split_artifacts
    from onnxhq.model import default_opset, read_initializers
    from onnxhq.rewrite import rewrite

    if default_opset(proto) < 15:
        proto = version_converter.convert_version(proto, 17)
    books, tensors = {}, {}
    grid = np.arange(-levels, levels + 1, dtype=np.float32)
    for name, w in read_initializers(proto, names).items():
        rows = w.reshape(w.shape[0] if w.ndim > 1 else 1, -1)
        top = np.abs(rows).max(axis=1, keepdims=True)
        step = (np.where(top > 0, top, 1.0) / levels).astype(np.float32)
        j = np.clip(np.round(rows / step), -levels, levels).astype(np.int64) + levels
        books[name] = step * grid  # (rows, 2 levels + 1)
        group = 1 if w.ndim > 1 else None
        tensors[name] = SimpleNamespace(codebook=name, indices=j.reshape(w.shape), group_size=group)
        if group is None:
            books[name] = books[name].reshape(-1)
    art = split_artifacts(
        rewrite(proto, books, tensors),
        stem,
        streams=index_streams_of(tensors, books),
        original_bytes=original_bytes,
    )
    return art, load_from_bytes(art.graph_bytes, art.sidecar_bytes)


def ort_forms(proto, work: Path) -> dict[str, tuple[Path | None, str]]:
    """onnxruntime's quantizers on the float model (its Constant-node weights made initializers,
    which they need): label -> (file, note)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnxhq.model import save_model

    path = work / "float_initializers.onnx"
    save_model(proto, path)
    out: dict[str, tuple[Path | None, str]] = {}
    target = work / "ort_int8.onnx"
    try:
        quantize_dynamic(str(path), str(target), weight_type=QuantType.QUInt8)
        out["ort quantize_dynamic int8"] = (target, "")
    except Exception as exc:  # report, do not stop the bench
        out["ort quantize_dynamic int8"] = (None, f"failed: {str(exc)[:80]}")
    quantizer = _nbits_quantizer()
    if isinstance(quantizer, str):
        out["ort MatMulNBits 4-bit"] = (None, quantizer)
        return out
    import onnx

    matmuls = sum(n.op_type == "MatMul" for n in proto.graph.node)
    nbits = quantizer(onnx.load(str(path)), block_size=32, is_symmetric=True)
    nbits.process()
    target = work / "ort_nbits.onnx"
    nbits.model.save_model_to_file(str(target))
    out["ort MatMulNBits 4-bit"] = (target, f"MatMul weights only ({matmuls} MatMul nodes)")
    return out


def _nbits_quantizer():
    """onnxruntime's 4-bit MatMul quantizer class (its name changed in 1.20), or why it is
    missing."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        return MatMulNBitsQuantizer
    except ImportError:
        pass
    try:
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer

        return MatMul4BitsQuantizer
    except ImportError as exc:
        return f"not in this onnxruntime build ({str(exc)[:60]})"


def bench_model(name: str, path: Path, args, work: Path) -> list[dict]:
    import onnxhq
    from onnxhq.errors import OnnxhqError
    from onnxhq.fidelity import measure
    from onnxhq.model import load_model, save_model
    from onnxhq.native import lower
    from onnxhq.runtime import make_session

    proto = load_model(path)
    counts = counts_of(name, args)
    feeds, calib = inputs(name, counts)
    held = heldout(name, counts)
    x1 = {k: v[:1] for k, v in feeds.items()}
    shape = next(iter(x1.values())).shape
    original, original_held = run(proto, feeds), run(proto, held)
    original_bytes = path.stat().st_size
    forms: dict[str, dict] = {"float": {"file": path, "ratio": 1.0, "note": "original file"}}
    names = None
    if args.target:
        forms["onnxhq target"] = target_form(name, path, calib, feeds, args, work, original_bytes)
    others = {} if args.target_only else ONNXHQ_FORMS
    for label, kw in others.items():
        t = time.perf_counter()
        result = onnxhq.compress(path, calib, hessian=args.hessian, **kw, **args.clean_up)
        names = list(result.quantized.tensors)
        a = result.artifacts
        file = work / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        save_model(result.model(), file)
        k = sorted({len(b.reshape(-1)) for b in result.quantized.codebooks.values()})
        forms[label] = {
            "file": file,
            "ratio": original_bytes / (len(a.graph_bytes) + len(a.sidecar_bytes)),
            "note": f"k {k[0]}..{k[-1]}, graph {len(a.graph_bytes):,} B, "
            f"{time.perf_counter() - t:.0f} s",
        }
    for label, (k, target) in ({} if args.target_only else GRID_FORMS).items():
        art, gather = grid_model(proto, names, k, name, original_bytes)
        file = work / f"grid_{target}.onnx"
        save_model(lower(gather, target), file)
        ratio = original_bytes / (len(art.graph_bytes) + len(art.sidecar_bytes))
        forms[label] = {"file": file, "ratio": ratio, "note": f"--target {target}"}
    from tools.deploy_forms import native_forms  # compress --cell-value grid -> each target

    if not args.target_only:
        forms.update(native_forms(path, calib, args.hessian, work, original_bytes))
    if not (args.smoke or args.target_only):
        for label, (file, note) in ort_forms(proto, work).items():
            ratio = original_bytes / file.stat().st_size if file else None
            forms[label] = {"file": file, "ratio": ratio, "note": note}
    for f in forms.values():
        if f["file"] is not None:
            try:
                make_session(str(f["file"]))
            except OnnxhqError as exc:
                f["file"], f["note"] = None, f"does not run: {str(exc)[:90]}"
    runnable = {k: f["file"] for k, f in forms.items() if f["file"] is not None}
    lat = latencies(runnable, next(iter(x1.values())), args.rounds)
    rows = []
    for label, f in forms.items():
        row = {"model": name, "form": label, "ratio": f["ratio"], "note": f["note"]}
        if "search" in f:
            row["search"] = f["search"]
        if f["file"] is not None:
            got = original if label == "float" else run(str(f["file"]), feeds)
            metrics = measure(KINDS[name], original, got)
            row.update({m: metrics.get(m) for m in KEYS[name]})
            got = original_held if label == "float" else run(str(f["file"]), held)
            metrics = measure(KINDS[name], original_held, got)
            row["heldout"] = {m: metrics.get(m) for m in KEYS[name]}
            row["lines"] = (len(original), len(original_held))
            row["file_bytes"] = Path(f["file"]).stat().st_size
            row.update(session_costs(Path(f["file"]), shape, args.repeats))
            row["latency_ms"] = 1000 * lat[label]
        rows.append(row)
    return rows


def target_form(name, path, calib, feeds, args, work, original_bytes) -> dict:
    """compress --min-fidelity TARGETS[name] on the eval inputs (the whole search: one Hessian
    estimate with ``--target-hessian``, layer statistics, then the points of `onnxhq.search`)."""
    import onnxhq
    from onnxhq.model import save_model

    t = time.perf_counter()
    result = onnxhq.compress(path, calib, eval_data=feeds, min_fidelity=TARGETS[name],
                             hessian=args.target_hessian,
                             hessian_samples=args.target_samples, **args.clean_up)  # fmt: skip
    r, a = result.report, result.artifacts
    file = work / "target.onnx"
    save_model(result.model(), file)
    chosen = f"{r.settings['scope']} {r.settings['target_bits']} bits"
    chosen += ", compensated" if r.settings["compensate"] else ""
    return {
        "file": file,
        "ratio": original_bytes / (len(a.graph_bytes) + len(a.sidecar_bytes)),
        "note": f"{TARGETS[name]}: {chosen}; graph {len(a.graph_bytes):,} B; {len(r.search)} "
        f"tried, {time.perf_counter() - t:.0f} s",
        "search": [p.__dict__ for p in r.search],
    }


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return n


def table(rows: list[dict]) -> str:
    cols = ["model", "form", "ratio", "fidelity", "held-out", "runnable file", "start s"]
    cols += ["start MB"]
    cols += ["run MB", "latency ms", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base: dict[str, dict] = {}
    for r in rows:
        if r["form"] == "float":
            base[r["model"]] = r
        fid = ", ".join(f"{k} {r[k]:.4g}" for k in KEYS[r["model"]] if r.get(k) is not None)
        held = r.get("heldout", {})
        out = ", ".join(f"{k} {v:.4g}" for k, v in held.items() if v is not None)
        cells = [r["model"], r["form"], f"{r['ratio']:.2f}x" if r["ratio"] else "-", fid or "-"]
        cells.append(out or "-")
        if "file_bytes" in r:
            b = base[r["model"]]
            cells += [f"{r['file_bytes']:,}", *cost_cells(r, b)]
            cells.append(ratio_cell(r["latency_ms"], b["latency_ms"]))
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells + [r["note"]]) + " |")
    return "\n".join(lines)


def counts_of(name: str, args) -> tuple[int, int, int]:
    """(eval, calibration, held-out) sizes of ``name``: `COUNTS` unless the flags say."""
    given = (args.eval_lines, args.calib_lines, args.heldout_lines)
    return tuple(g if g is not None else d for g, d in zip(given, COUNTS[name]))  # type: ignore


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=REAL, default=list(REAL))
    ap.add_argument("--hessian", default="none", help="compress --hessian for the onnxhq forms")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per session measure")
    ap.add_argument("--rounds", type=int, default=20, help="latency runs per model")
    ap.add_argument("--json", help="also write the rows here (after each model)")
    ap.add_argument("--resume", action="store_true", help="keep the models --json already has")
    ap.add_argument("--target", action="store_true", help="add the 'onnxhq target' form")
    ap.add_argument("--target-hessian", default="fisher", help="its --hessian")
    ap.add_argument("--target-samples", type=int, default=64, help="its --samples")
    ap.add_argument(
        "--target-only",
        action="store_true",
        help="the float model and the 'onnxhq target' form only (implies --target)",
    )
    for flag, what in (
        ("eval", "measured and searched on"),
        ("calib", "for the Hessian and layer statistics"),
        ("heldout", "re-measured on, disjoint from both"),
    ):
        ap.add_argument(f"--{flag}-lines", type=_positive, metavar="N",
                        help=f"lines (det: pages, lenet5: images) {what}; default per model: "
                        + ", ".join(f"{m} {c[('eval', 'calib', 'heldout').index(flag)]}"
                                    for m, c in COUNTS.items()))  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="the bundled LeNet-5 only, in seconds")
    ap.add_argument("--baseline", action="store_true", help="onnxhq forms without the graph "
                    "clean-up (--no-fold-batchnorm --keep-names)")  # fmt: skip
    args = ap.parse_args(argv)
    args.target = args.target or args.target_only
    args.clean_up = {"fold_batchnorm": False, "compact_names": False} if args.baseline else {}
    from tools.datasets import LENET5, shared_file

    if args.smoke:
        args.repeats, args.rounds = 1, 3
        todo = {"lenet5": LENET5}
    else:
        todo = {m: shared_file("models", "real", FILES[m]) for m in args.models}
    rows: list[dict] = []
    if args.resume and args.json and Path(args.json).is_file():
        rows = json.loads(Path(args.json).read_text())
        todo = {m: p for m, p in todo.items() if m not in {r["model"] for r in rows}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in todo.items():
            work = Path(tmp) / name
            work.mkdir()
            rows += bench_model(name, Path(path), args, work)
            if args.json:  # saved after each model: --resume goes on from here
                clean = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
                         for r in rows]  # fmt: skip
                Path(args.json).write_text(json.dumps(clean, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
