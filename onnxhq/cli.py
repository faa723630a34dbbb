"""The ``onnxhq`` command line. Exit codes: 0 success, 1 an error (`OnnxhqError`, or an OS error
while writing), 2 usage error; errors are one line on stderr, never a traceback (unless --verbose
and the error is a bug).

One subcommand per pipeline stage (inspect, hessian, prune, compress, decode, report, eval) plus
sweep. Each ``_add_X`` declares a subcommand's flags and each ``_run_X`` maps them onto the
library; the library does the checking, raises `OnnxhqError`, and `main` turns that into one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._io import atomic_write_bytes, refuse_overwriting_inputs
from .errors import ConfigError, OnnxhqError
from .progress import Progress

#: onnxhq.hessian.METHODS less "none", spelled out so that `onnxhq --help` need not import onnxruntime
#: (tests/test_cli.py checks that the two agree).
HESSIAN_METHODS = ("fisher", "empirical-fisher", "hutchinson", "gauss-newton", "adam")


def _existing(*paths) -> list[str]:
    """The given paths that name files: the inputs an output must not overwrite."""
    return [str(p) for p in paths if p and Path(p).is_file()]


def _write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _add_common(p, *, output_name: bool = True, seed: bool = True) -> None:
    if output_name:
        p.add_argument("--output-name", help="the class-score output to use (default: first of rank 2)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


# --- inspect --------------------------------------------------------------------------------------

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


# --- hessian --------------------------------------------------------------------------------------

def _add_hessian(sub) -> None:
    p = sub.add_parser("hessian", help="estimate the Hessian diagonal of a model's weights and save it",
                       description="Estimate the importance h_ii of every quantizable weight and write it as an .npz "
                                   "keyed by weight name; 'compress --hessian H.npz' and 'sweep' reuse it.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", help=".npz of model inputs (labels too for empirical-fisher and hutchinson)")
    p.add_argument("--method", default="fisher", choices=HESSIAN_METHODS, help="estimator (default fisher)")
    p.add_argument("--samples", type=int, default=1000, help="samples drawn from the data (default 1000)")
    p.add_argument("--batch-size", type=int, help="samples per gradient (default: the estimator's)")
    p.add_argument("--adam-state", help=".npz of Adam second moments keyed by weight name (--method adam)")
    p.add_argument("--include-biases", action="store_true", help="cover the biases too (for compress --include-biases)")
    _add_common(p)
    p.add_argument("-o", "--output", required=True, help="the .npz to write")
    p.set_defaults(run=_run_hessian)


def _run_hessian(args) -> int:
    import numpy as np

    from .hessian_io import save_hessian
    from .pipeline import estimate_hessian

    refuse_overwriting_inputs([args.output], _existing(args.model, args.data, args.adam_state))
    start = time.perf_counter()
    diag = estimate_hessian(args.model, args.data, method=args.method, samples=args.samples,
                            batch_size=args.batch_size, seed=args.seed, adam_state=args.adam_state,
                            include_biases=args.include_biases, output=args.output_name, progress=args.progress)
    seconds = time.perf_counter() - start
    size = save_hessian(args.output, diag)
    width = max([6] + [len(n) for n in diag])
    print(f"{'weight':<{width}}  {'shape':<18} {'mean h':>10} {'max h':>10}")
    for name, h in diag.items():
        print(f"{name:<{width}}  {str(h.shape):<18} {float(np.mean(h)):>10.3g} {float(np.max(h)):>10.3g}")
    source = "" if args.method == "adam" else f" from {args.samples} samples"
    print(f"wrote {args.output} ({size:,} bytes): {args.method} diagonal of {len(diag)} weights{source}, {seconds:.1f} s")
    return 0


# --- prune ----------------------------------------------------------------------------------------

def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="zero the least important weights and retrain the rest",
                       description="Prune MODEL's quantizable weights to a sparsity in a few steps, retraining after "
                                   "each with the pruned weights held at zero; write the pruned model.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", required=True, help="labelled .npz for retraining (and the saliency Hessian)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of weights to zero, in [0, 1)")
    p.add_argument("--criterion", default="magnitude", choices=["magnitude", "saliency"],
                   help="rank by |w| or by h*w^2 (default magnitude)")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="one threshold for all weights, or the sparsity in every layer (default global)")
    p.add_argument("--steps", type=int, default=4, help="pruning steps on a cubic schedule (default 4)")
    p.add_argument("--retrain-epochs", type=float, default=1.0, help="epochs of retraining per step (default 1; 0: none)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak Adam learning rate per step (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=64, help="retraining batch size (default 64)")
    p.add_argument("--samples", type=int, default=1000, help="samples for the saliency Hessian (default 1000)")
    p.add_argument("--eval", dest="eval_data", help="labelled .npz: measure accuracy before and after")
    _add_common(p)
    p.add_argument("-o", "--output", required=True, help="the pruned .onnx to write")
    p.set_defaults(run=_run_prune)


def _run_prune(args) -> int:
    from .data import load_data
    from .evaluate import accuracy
    from .model import load_model, save_model
    from .prune import prune_model, sparsity_of

    refuse_overwriting_inputs([args.output], _existing(args.model, args.data, args.eval_data))
    model = load_model(args.model)
    data = load_data(args.data, model, need_labels=args.retrain_epochs > 0)
    test = load_data(args.eval_data, model, need_labels=True) if args.eval_data else None
    pruned, masks = prune_model(model, data, sparsity=args.sparsity, criterion=args.criterion, scope=args.scope,
                                steps=args.steps, retrain_epochs=args.retrain_epochs, lr=args.lr,
                                batch_size=args.batch_size, hessian_samples=args.samples, output=args.output_name,
                                seed=args.seed, progress=args.progress)
    size = save_model(pruned, args.output)
    width = max([len("total")] + [len(n) for n in masks])
    print(f"{'weight':<{width}}  {'params':>9}  {'pruned':>7}")
    for name, mask in masks.items():
        print(f"{name:<{width}}  {mask.size:>9,}  {sparsity_of({name: mask}):>7.2%}")
    print(f"{'total':<{width}}  {sum(m.size for m in masks.values()):>9,}  {sparsity_of(masks):>7.2%}")
    if test is not None:
        before, after = accuracy(model, test, output=args.output_name), accuracy(pruned, test, output=args.output_name)
        print(f"accuracy {before:.2%} -> {after:.2%} ({100 * (after - before):+.2f} points) on {args.eval_data}")
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


# --- compress -------------------------------------------------------------------------------------

def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="quantize and Huffman-code a model's weights",
                       description="Quantize MODEL's weights with one Hessian-weighted codebook, write "
                                   "OUTDIR/<name>.onnx (graph) and OUTDIR/<name>.onnxhq (coded indices), print a report.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", help=".npz of model inputs (for the Hessian estimate)")
    p.add_argument("--eval", dest="eval_data", help="labelled .npz: measure accuracy before and after")
    p.add_argument("--method", default="uniform", choices=["kmeans", "hkmeans", "uniform", "ecsq"],
                   help="quantizer (default uniform, the best accuracy per bit measured)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--k", type=int, help="number of clusters (default 32 for k-means)")
    rate.add_argument("--bits", type=float, help="bits per index: k = 2**bits")
    rate.add_argument("--lambda", dest="lam", type=float, help="rate weight of ECSQ")
    rate.add_argument("--target-bits", type=float,
                      help="target entropy of the indices, bits per weight (default 4 for uniform and ECSQ)")
    p.add_argument("--scope", default="network", choices=["network", "layer", "channel-group"])
    p.add_argument("--group-size", type=int, help="output channels per codebook with --scope channel-group")
    p.add_argument("--hessian", default="fisher",
                   help="estimator (fisher, empirical-fisher, hutchinson, gauss-newton, adam, none), or an .npz "
                        "written by 'onnxhq hessian' (default fisher)")
    p.add_argument("--adam-state", help=".npz of Adam second moments keyed by weight name (--hessian adam)")
    p.add_argument("--samples", type=int, default=1000, help="samples for the Hessian estimate (default 1000)")
    p.add_argument("--include-biases", action="store_true", help="quantize biases too")
    p.add_argument("--extra-ops", nargs="+", default=(), metavar="OP",
                   help="also quantize the weights of these op types (Gather, LSTM, GRU, RNN, Einsum)")
    p.add_argument("--finetune-epochs", type=float, default=0,
                   help="fine-tune the codebook values (indices fixed) for this many epochs over --train")
    p.add_argument("--train", dest="train_data", help="labelled .npz for --finetune-epochs")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="peak Adam learning rate (default 1e-4)")
    _add_common(p)
    p.add_argument("-o", "--outdir", required=True, help="folder for the compressed artifacts")
    p.add_argument("--report-json", help="also write the report as JSON to this file")
    p.set_defaults(run=_run_compress)


def _run_compress(args) -> int:
    from .pipeline import compress

    outdir = Path(args.outdir)
    stem = Path(args.model).stem
    targets = [outdir / f"{stem}.onnx", outdir / f"{stem}.onnxhq"] + ([Path(args.report_json)] if args.report_json else [])
    refuse_overwriting_inputs(targets, _existing(args.model, args.data, args.eval_data, args.hessian, args.adam_state,
                                                 args.train_data))
    hessian = _hessian_option(args.hessian, args.model, args.adam_state)
    result = compress(args.model, args.data, method=args.method, k=args.k, bits=args.bits, lam=args.lam,
                      target_bits=args.target_bits, scope=args.scope, group_size=args.group_size, hessian=hessian,
                      hessian_samples=args.samples, include_biases=args.include_biases,
                      extra_ops=tuple(args.extra_ops), output=args.output_name,
                      finetune_epochs=args.finetune_epochs, train_data=args.train_data, finetune_lr=args.finetune_lr,
                      eval_data=args.eval_data, seed=args.seed, progress=args.progress)
    result.save(outdir)
    print(result.report.to_text())
    if args.report_json:
        _write_json(args.report_json, result.report.to_dict())
    return 0


def _hessian_option(value: str, model: str, adam_state: str | None):
    """``--hessian``: an estimator name for `compress`, or the diagonals of a file (checked against the model)."""
    if adam_state is not None and value != "adam":
        raise ConfigError(f"--adam-state goes with --hessian adam, not --hessian {value}")
    if value == "adam":
        if adam_state is None:
            raise ConfigError("--hessian adam needs --adam-state: an .npz of Adam second moments keyed by weight name")
        from .pipeline import estimate_hessian

        return estimate_hessian(model, None, method="adam", adam_state=adam_state)
    if value in HESSIAN_METHODS or value == "none":
        return value
    if not value.endswith(".npz") and not Path(value).exists():
        raise ConfigError(f"--hessian {value!r} is neither an estimator ({', '.join(HESSIAN_METHODS)}, none) nor "
                          "an .npz file written by 'onnxhq hessian'")
    from .hessian_io import load_hessian
    from .model import load_model

    return load_hessian(value, load_model(model))


# --- decode, report, eval -------------------------------------------------------------------------

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


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="size report of compressed artifacts: layers, codebooks, entropy, bits/weight",
                       description="Read a compressed graph and the sidecar beside it (nothing else) and print the "
                                   "per-layer table, the codebooks and the totals.")
    p.add_argument("compressed", help="the .onnx graph written by 'onnxhq compress' (its sidecar beside it)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from .report import describe_artifacts

    report = describe_artifacts(args.compressed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a model on labelled data")
    p.add_argument("model", help="a runnable .onnx, or a compressed graph (its sidecar beside it)")
    p.add_argument("--data", required=True, help="labelled .npz (inputs + 'labels')")
    _add_common(p, seed=False)
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from .data import load_data
    from .decode import load_runnable
    from .evaluate import accuracy

    model = load_runnable(args.model)
    data = load_data(args.data, model, need_labels=True)
    acc = accuracy(model, data, output=args.output_name)
    print(f"accuracy {acc:.4%} ({round(acc * len(data))}/{len(data)}) on {args.data}")
    return 0


# --- sweep ----------------------------------------------------------------------------------------

def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="compress at several rates: a rate-accuracy table and plot",
                       description="Estimate the Hessian once, compress MODEL at every rate given, evaluate each; "
                                   "print the table and write OUTDIR/sweep.json and OUTDIR/sweep.png.")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", help=".npz of model inputs (for the Hessian estimate)")
    p.add_argument("--eval", dest="eval_data", required=True, help="labelled .npz to measure accuracy on")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--k", type=int, nargs="+", help="cluster counts, e.g. --k 8 16 32")
    rate.add_argument("--lambda", dest="lam", type=float, nargs="+", help="ECSQ rate weights")
    rate.add_argument("--target-bits", type=float, nargs="+", help="target bits per weight, e.g. 2 3 4")
    p.add_argument("--method", default="uniform", choices=["kmeans", "hkmeans", "uniform", "ecsq"],
                   help="quantizer (default uniform, the best accuracy per bit measured)")
    p.add_argument("--scope", default="network", choices=["network", "layer"])
    p.add_argument("--hessian", default="fisher",
                   help="estimator (default fisher) or an .npz written by 'onnxhq hessian'")
    p.add_argument("--adam-state", help=".npz of Adam second moments keyed by weight name (--hessian adam)")
    p.add_argument("--samples", type=int, default=1000, help="samples for the Hessian estimate (default 1000)")
    p.add_argument("--no-plot", action="store_true", help="skip sweep.png (no matplotlib needed)")
    _add_common(p)
    p.add_argument("-o", "--outdir", required=True, help="folder for sweep.json and sweep.png")
    p.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from .sweep import sweep

    outdir = Path(args.outdir)
    targets = [outdir / "sweep.json"] + ([] if args.no_plot else [outdir / "sweep.png"])
    refuse_overwriting_inputs(targets, _existing(args.model, args.data, args.eval_data, args.hessian, args.adam_state))
    if not args.no_plot:
        from .plot import require_matplotlib

        require_matplotlib()  # before the slow part
    hessian = _hessian_option(args.hessian, args.model, args.adam_state)
    result = sweep(args.model, args.data, eval_data=args.eval_data, k=args.k or (), lam=args.lam or (),
                   target_bits=args.target_bits or (), method=args.method, scope=args.scope, hessian=hessian,
                   hessian_samples=args.samples, output=args.output_name, seed=args.seed, progress=args.progress)
    print(result.to_text())
    _write_json(targets[0], result.to_dict())
    if not args.no_plot:
        from .plot import save_sweep_plot

        save_sweep_plot(result, targets[1])
    print(f"wrote {', '.join(str(t) for t in targets)}")
    return 0


# --- entry point ----------------------------------------------------------------------------------

SUBCOMMANDS = (_add_inspect, _add_hessian, _add_prune, _add_compress, _add_decode, _add_report, _add_eval, _add_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxhq", description="Hessian-weighted quantization and Huffman coding "
                                     "of ONNX models (Choi, El-Khamy & Lee, ICLR 2017).")
    parser.add_argument("--version", action="version", version=f"onnxhq {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
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
        print(f"onnxhq: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `onnxhq report … | head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a disk full, a folder where a file should go, no permission
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"onnxhq: error: {where}{_one_line(exc.strerror or exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxhq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, and the traceback under --verbose
        if args.verbose:
            raise
        print(f"onnxhq: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --verbose for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1


def _one_line(message) -> str:
    return " ".join(str(message).split())


if __name__ == "__main__":
    sys.exit(main())
