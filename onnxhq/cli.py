"""The ``onnxhq`` command line. Exit codes: 0 success, 1 `OnnxhqError`, 2 usage error."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from ._io import atomic_write_bytes, refuse_overwriting_inputs
from .errors import ConfigError, OnnxhqError
from .progress import Progress


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="quantize and Huffman-code a model's weights",
                       description="Quantize MODEL's weights with one Hessian-weighted codebook, write "
                                   "OUTDIR/<name>.onnx (graph) and OUTDIR/<name>.onnxhq (coded indices), print a report.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", help=".npz of model inputs (for the Hessian estimate)")
    p.add_argument("--eval", dest="eval_data", help="labelled .npz: measure accuracy before and after")
    p.add_argument("--method", default="hkmeans", choices=["kmeans", "hkmeans", "uniform", "ecsq"])
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--k", type=int, help="number of clusters (default 32)")
    rate.add_argument("--bits", type=float, help="bits per index: k = 2**bits")
    rate.add_argument("--lambda", dest="lam", type=float, help="rate weight of ECSQ")
    rate.add_argument("--target-bits", type=float, help="target average code length, bits per weight")
    p.add_argument("--scope", default="network", choices=["network", "layer", "channel-group"])
    p.add_argument("--group-size", type=int, help="output channels per codebook with --scope channel-group")
    p.add_argument("--hessian", default="fisher", help="estimator name, or an .npz of diagonals keyed by weight")
    p.add_argument("--samples", type=int, default=1000, help="samples for the Hessian estimate (default 1000)")
    p.add_argument("--include-biases", action="store_true", help="quantize biases too")
    p.add_argument("--output-name", help="the class-score output to use (default: first of rank 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--outdir", required=True, help="folder for the compressed artifacts")
    p.add_argument("--report-json", help="also write the report as JSON to this file")
    p.set_defaults(run=_run_compress)


def _run_compress(args) -> int:
    from .pipeline import compress

    outdir = Path(args.outdir)
    stem = Path(args.model).stem
    targets = [outdir / f"{stem}.onnx", outdir / f"{stem}.onnxhq"] + ([Path(args.report_json)] if args.report_json else [])
    inputs = [p for p in (args.model, args.data, args.eval_data, args.hessian) if p and Path(p).exists()]
    refuse_overwriting_inputs(targets, inputs)
    hessian = _load_hessian(args.hessian)
    result = compress(args.model, args.data, method=args.method, k=args.k, bits=args.bits, lam=args.lam,
                      target_bits=args.target_bits, scope=args.scope, group_size=args.group_size, hessian=hessian,
                      hessian_samples=args.samples, include_biases=args.include_biases, output=args.output_name,
                      eval_data=args.eval_data, seed=args.seed, progress=args.progress)
    result.save(outdir)
    print(result.report.to_text())
    if args.report_json:
        atomic_write_bytes(args.report_json, (json.dumps(result.report.to_dict(), indent=2) + "\n").encode())
    return 0


def _load_hessian(value: str):
    if not value.endswith(".npz"):
        return value
    import numpy as np

    from .errors import DataError

    try:
        with np.load(value, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the Hessian file {value}: {exc}") from None


def _add_decode(sub) -> None:
    p = sub.add_parser("decode", help="join a compressed graph and its sidecar into a runnable model")
    p.add_argument("compressed", help="the .onnx graph written by 'onnxhq compress' (its sidecar beside it)")
    p.add_argument("-o", "--output", required=True, help="the runnable .onnx to write")
    p.add_argument("--dequantize", action="store_true", help="plain float weights instead of dequantize nodes")
    p.set_defaults(run=_run_decode)


def _run_decode(args) -> int:
    from .decode import decode_file

    refuse_overwriting_inputs([args.output], [args.compressed])
    size = decode_file(args.compressed, args.output, dequantize=args.dequantize)
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a model on labelled data")
    p.add_argument("model", help="a runnable .onnx, or a compressed graph (its sidecar beside it)")
    p.add_argument("--data", required=True, help="labelled .npz (inputs + 'labels')")
    p.add_argument("--output-name", help="the class-score output to use (default: first of rank 2)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .data import load_data
    from .evaluate import accuracy

    from .decode import load_runnable

    model = load_runnable(args.model)
    data = load_data(args.data, model, need_labels=True)
    acc = accuracy(model, data, output=args.output_name)
    print(f"accuracy {acc:.4%} ({round(acc * len(data))}/{len(data)}) on {args.data}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's quantizable weights, sizes and opset")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from .model import default_opset, load_model, quantizable_weights, runtime_inputs

    model = load_model(args.model)
    weights = quantizable_weights(model)
    info = {
        "model": args.model, "opset": default_opset(model), "ir_version": model.ir_version,
        "inputs": [i.name for i in runtime_inputs(model)], "outputs": [o.name for o in model.graph.output],
        "weights": [{"name": w.name, "shape": list(w.shape), "dtype": w.dtype.name, "params": w.size,
                     "used_by": [f"{op} {node}" for node, op, _ in w.consumers]} for w in weights],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}: opset {info['opset']}, IR {info['ir_version']}, inputs {info['inputs']}, outputs {info['outputs']}")
    width = max([6] + [len(w.name) for w in weights])
    print(f"{'weight':<{width}}  {'shape':<18} {'dtype':<8} {'params':>10}  used by")
    for w in info["weights"]:
        print(f"{w['name']:<{width}}  {str(tuple(w['shape'])):<18} {w['dtype']:<8} {w['params']:>10,}  {', '.join(w['used_by'])}")
    print(f"{len(weights)} quantizable weights, {sum(w.size for w in weights):,} parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxhq", description="Hessian-weighted quantization and Huffman coding "
                                     "of ONNX models (Choi, El-Khamy & Lee, ICLR 2017).")
    parser.add_argument("--version", action="version", version=f"onnxhq {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_compress, _add_decode, _add_eval):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.progress = Progress(enabled=False if args.quiet else None)
    try:
        return args.run(args)
    except OnnxhqError as exc:
        print(f"onnxhq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxhq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
