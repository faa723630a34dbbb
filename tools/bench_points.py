"""Single compress points on the real models, with and without the graph clean-up of issue 13
(BatchNormalization folded into the layers before it, short names in the written graph).

    python -m tools.bench_points --model cls --out /tmp/fold/cls.jsonl \
        --points network:4 network:4:c layer:4 --modes after before
    python -m tools.bench_points --smoke    # the bundled LeNet-5, two points, both modes

Per mode (``after``: `compress`'s defaults, fold and short names; ``before``: both off, the
graph as onnxhq wrote it until 2026-12-05), the Hessian and each layer's input statistics are
estimated once on the calibration inputs of `tools.bench_real.inputs`, then every point
(``SCOPE:TARGET_BITS[:FLAGS]``, flags ``c`` = error compensation, ``b`` = biases quantized too)
is compressed with `onnxhq.pipeline.compress_point` and measured on the eval inputs against the
original model. One JSON line per point is appended to ``--out`` as it finishes; points already
there are skipped, so a cut run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tools.bench_real import FILES, KEYS, inputs

MODES = {"after": (True, True), "before": (False, False)}  # mode -> (fold_batchnorm, compact)


def parse_point(text: str) -> dict:
    """``"network:4:cb"`` -> scope, target_bits, compensate (``c``), include_biases (``b``)."""
    scope, bits, *flags = text.split(":")
    flag = flags[0] if flags else ""
    return {"scope": scope, "target_bits": float(bits), "compensate": "c" in flag,
            "include_biases": "b" in flag}  # fmt: skip


def done_points(out: Path) -> set[tuple[str, str]]:
    if not out.is_file():
        return set()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {(r["mode"], r["point"]) for r in rows}


def bench_mode(model: str, path: Path, mode: str, points: list[str], args, out: Path) -> None:
    from onnxhq.data import Dataset
    from onnxhq.evaluate import reference_outputs
    from onnxhq.model import load_model
    from onnxhq.options import CompressOptions
    from onnxhq.pipeline import compress_point, estimate_statistics, fold_layers

    fold, compact = MODES[mode]
    todo = [p for p in points if (mode, p) not in done_points(out)]
    if not todo:
        return
    feeds, calib = inputs(model)
    test, data = Dataset(feeds), Dataset(calib)
    flags = [parse_point(p) for p in todo]
    every = {key: any(f[key] for f in flags) for key in ("compensate", "include_biases")}
    base = CompressOptions.from_keywords(hessian=args.hessian, hessian_samples=args.samples,
                                         fold_batchnorm=fold, compact_names=compact,
                                         **every)  # fmt: skip
    proto = load_model(path)
    reference = reference_outputs(proto, test)
    folded = fold_layers(base, proto)
    t = time.perf_counter()
    statistics = estimate_statistics(proto, data, base)
    estimate_s = time.perf_counter() - t
    for point in todo:
        kw = parse_point(point)
        options = replace(CompressOptions.from_keywords(
            hessian=args.hessian, hessian_samples=args.samples, fold_batchnorm=fold,
            compact_names=compact, **kw), hessian=base.hessian)  # fmt: skip
        t = time.perf_counter()
        result = compress_point(path, proto, options, statistics, reference, test, label=point)
        r = result.report
        (fid,) = r.fidelity.values()
        row = {
            "model": model, "mode": mode, "point": point, "folded_batchnorms": folded,
            "graph_bytes": r.graph_bytes, "sidecar_bytes": r.sidecar_bytes,
            "compressed_bytes": r.compressed_bytes, "ratio": r.compression_ratio,
            "bits_per_weight": r.bits_per_weight, "unquantized_params": r.unquantized_params,
            **{k: fid.get(k) for k in (*KEYS[model], "kl") if k in fid},
            "seconds": time.perf_counter() - t, "estimate_seconds": estimate_s,
            "hessian": args.hessian, "samples": args.samples,
        }  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(out: Path) -> str:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    lines = ["| model | mode | point | graph | sidecar | total | ratio | fidelity | s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        fid = ", ".join(
            f"{k} {r[k]:.4g}" for k in (*KEYS[r["model"]], "kl") if r.get(k) is not None
        )
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['point']} | {r['graph_bytes']:,} | "
            f"{r['sidecar_bytes']:,} | {r['compressed_bytes']:,} | {r['ratio']:.2f}x | {fid} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(FILES))
    ap.add_argument("--points", nargs="+", default=["network:4"], help="SCOPE:BITS[:c][b]")
    ap.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    ap.add_argument("--hessian", default="fisher")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", help="JSON lines, appended (resumable)")
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    ap.add_argument("--smoke", action="store_true", help="the bundled LeNet-5 only, in seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke(args)
    if args.model is None or args.out is None:
        ap.error("--model and --out are needed (or --smoke)")
    out = Path(args.out)
    if not args.table:
        from tools.datasets import shared_file

        path = Path(shared_file("models", "real", FILES[args.model]))
        for mode in args.modes:
            bench_mode(args.model, path, mode, args.points, args, out)
    print(table(out))
    return 0


def smoke(args) -> int:
    """Both modes, a plain and a compensated point, on the bundled LeNet-5 and its sample."""
    repo = Path(__file__).resolve().parents[1]
    args.points, args.samples = ["network:4", "network:4:c"], 32
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "points.jsonl"
        for mode in MODES:
            bench_mode("lenet5", repo / "models" / "lenet5_mnist.onnx", mode, args.points, args,
                       out)  # fmt: skip
        print(table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
