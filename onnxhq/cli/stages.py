"""The subcommands of one stage each: inspect, hessian, prune, decode, report, eval."""

from __future__ import annotations

import json
import time

from .._io import refuse_overwriting_inputs
from ..options import DEFAULT_HESSIAN_SAMPLES, PRUNE_CRITERIA, PRUNE_SCOPES
from .common import add_common, add_hessian_flags, existing


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's quantizable weights, sizes and opset")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from ..model import default_opset, load_model, quantizable_weights, runtime_inputs
    from ..text import inspect_table

    model = load_model(args.model)
    info = {
        "model": args.model,
        "opset": default_opset(model),
        "ir_version": model.ir_version,
        "inputs": [i.name for i in runtime_inputs(model)],
        "outputs": [o.name for o in model.graph.output],
        "weights": [
            {
                "name": w.name,
                "shape": list(w.shape),
                "dtype": w.dtype.name,
                "params": w.size,
                "used_by": [f"{op} {node}" for node, op, _ in w.consumers],
            }
            for w in quantizable_weights(model)
        ],
    }
    print(json.dumps(info, indent=2) if args.json else inspect_table(info))
    return 0


def add_hessian(sub) -> None:
    p = sub.add_parser(
        "hessian",
        help="estimate the Hessian diagonal of a model's weights and save it",
        description="Estimate the importance h_ii of every quantizable weight and write it as "
        "an .npz keyed by weight name; 'compress --hessian H.npz' and 'sweep' reuse it.",
    )
    p.add_argument("model", help="input .onnx model")
    p.add_argument(
        "--data", help=".npz of model inputs (labels too for empirical-fisher and hutchinson)"
    )
    add_hessian_flags(p, estimator_flag="--method")
    p.add_argument("-o", "--output", required=True, help="the .npz to write")
    p.set_defaults(run=_run_hessian, flags={"hessian": "--method"})


def _run_hessian(args) -> int:
    from ..hessian.files import save_hessian
    from ..importances import estimate_hessian
    from ..text import hessian_table

    refuse_overwriting_inputs([args.output], existing(args.model, args.data, args.adam_state))
    start = time.perf_counter()
    diag = estimate_hessian(
        args.model,
        args.data,
        method=args.method,
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        adam_state=args.adam_state,
        include_biases=args.include_biases,
        extra_ops=tuple(args.extra_ops),
        output=args.output_name,
        progress=args.progress,
    )
    seconds = time.perf_counter() - start
    size = save_hessian(args.output, diag)
    print(hessian_table(diag))
    samples = args.samples or DEFAULT_HESSIAN_SAMPLES
    source = "" if args.method == "adam" else f" from {samples} samples"
    print(
        f"wrote {args.output} ({size:,} bytes): {args.method} diagonal of {len(diag)} weights"
        f"{source}, {seconds:.1f} s"
    )
    return 0


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="zero the least important weights and retrain the rest",
        description="Prune MODEL's quantizable weights to a sparsity in a few steps, retraining "
        "after each with the pruned weights held at zero; write the pruned model.",
    )
    p.add_argument("model", help="input .onnx model")
    p.add_argument(
        "--data", required=True, help="labelled .npz for retraining (and the saliency Hessian)"
    )
    p.add_argument(
        "--sparsity", type=float, required=True, help="fraction of weights to zero, in [0, 1)"
    )
    p.add_argument(
        "--criterion",
        default=PRUNE_CRITERIA[0],
        choices=PRUNE_CRITERIA,
        help="rank by |w| or by h*w^2 (default magnitude)",
    )
    p.add_argument(
        "--scope",
        default=PRUNE_SCOPES[0],
        choices=PRUNE_SCOPES,
        help="one threshold for all weights, or the sparsity in every layer (default global)",
    )
    p.add_argument(
        "--steps", type=int, default=4, help="pruning steps on a cubic schedule (default 4)"
    )
    p.add_argument(
        "--retrain-epochs",
        type=float,
        default=1.0,
        help="epochs of retraining per step (default 1; 0: none)",
    )
    p.add_argument(
        "--lr", type=float, default=3e-4, help="peak Adam learning rate per step (default 3e-4)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="retraining batch size (default 64)")
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_HESSIAN_SAMPLES,
        help=f"samples for the saliency Hessian (default {DEFAULT_HESSIAN_SAMPLES})",
    )
    p.add_argument(
        "--eval", dest="eval_data", help="labelled .npz: measure accuracy before and after"
    )
    add_common(p)
    p.add_argument("-o", "--output", required=True, help="the pruned .onnx to write")
    p.set_defaults(run=_run_prune)


def _run_prune(args) -> int:
    from ..data import load_data
    from ..evaluate import accuracy
    from ..model import load_model, save_model
    from ..prune import prune_model
    from ..text import prune_table

    refuse_overwriting_inputs([args.output], existing(args.model, args.data, args.eval_data))
    model = load_model(args.model)
    data = load_data(args.data, model, need_labels=args.retrain_epochs > 0)
    test = load_data(args.eval_data, model, need_labels=True) if args.eval_data else None
    pruned, masks = prune_model(
        model,
        data,
        sparsity=args.sparsity,
        criterion=args.criterion,
        scope=args.scope,
        steps=args.steps,
        retrain_epochs=args.retrain_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        hessian_samples=args.samples,
        output=args.output_name,
        seed=args.seed,
        progress=args.progress,
    )
    size = save_model(pruned, args.output)
    print(prune_table(masks))
    if test is not None:
        before = accuracy(model, test, output=args.output_name)
        after = accuracy(pruned, test, output=args.output_name)
        print(
            f"accuracy {before:.2%} -> {after:.2%} ({100 * (after - before):+.2f} points) on "
            f"{args.eval_data}"
        )
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


def add_decode(sub) -> None:
    p = sub.add_parser(
        "decode", help="join a compressed graph and its sidecar into a runnable model"
    )
    p.add_argument(
        "compressed", help="the .onnx graph written by 'onnxhq compress' (its sidecar beside it)"
    )
    p.add_argument("-o", "--output", required=True, help="the runnable .onnx to write")
    p.add_argument(
        "--dequantize", action="store_true", help="plain float weights instead of dequantize nodes"
    )
    p.set_defaults(run=_run_decode)


def _run_decode(args) -> int:
    from ..decode import decode_file

    refuse_overwriting_inputs([args.output], [args.compressed])
    size = decode_file(args.compressed, args.output, dequantize=args.dequantize)
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="size report of compressed artifacts: layers, codebooks, entropy, bits/weight",
        description="Read a compressed graph and the sidecar beside it (nothing else) and print "
        "the per-layer table, the codebooks and the totals.",
    )
    p.add_argument(
        "compressed", help="the .onnx graph written by 'onnxhq compress' (its sidecar beside it)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from ..describe import describe_artifacts

    report = describe_artifacts(args.compressed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a model on labelled data")
    p.add_argument("model", help="a runnable .onnx, or a compressed graph (its sidecar beside it)")
    p.add_argument("--data", required=True, help="labelled .npz (inputs + 'labels')")
    add_common(p, seed=False)
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from ..data import load_data
    from ..decode import load_runnable
    from ..evaluate import accuracy

    model = load_runnable(args.model)
    data = load_data(args.data, model, need_labels=True)
    acc = accuracy(model, data, output=args.output_name)
    print(f"accuracy {acc:.4%} ({round(acc * len(data))}/{len(data)}) on {args.data}")
    return 0
