"""The subcommands of one stage each: inspect, hessian, prune, decode, report, eval."""

from __future__ import annotations

import json
import time

from .._io import refuse_overwriting_inputs
from ..options import DEFAULT_HESSIAN_SAMPLES, PRUNE_CRITERIA, PRUNE_SCOPES
from ..options.vocabulary import DECODE_TARGETS
from .arguments import (
    add_common,
    add_compressed,
    add_data,
    add_hessian_flags,
    add_model,
    add_output,
    hessian_keywords,
    subcommand,
)
from .common import existing


def add_inspect(sub) -> None:
    p = subcommand(sub, "inspect", _run_inspect)
    add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_inspect(args) -> int:
    """list a model's quantizable weights, sizes and opset"""
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
    p = subcommand(sub, "hessian", _run_hessian)
    add_model(p)
    add_data(p, ".npz of model inputs (labels too for empirical-fisher and hutchinson)")
    add_hessian_flags(p, estimator_flag="--method")
    add_output(p, ".npz")
    p.set_defaults(flags={"hessian": "--method"})


def _run_hessian(args) -> int:
    """estimate the Hessian diagonal of a model's weights and save it

    Estimate the importance h_ii of every quantizable weight and write it as an .npz keyed by
    weight name; 'compress --hessian H.npz' and 'sweep' reuse it.
    """
    from ..hessian.files import save_hessian
    from ..importances import estimate_hessian
    from ..text import hessian_table

    refuse_overwriting_inputs([args.output], existing(args.model, args.data, args.adam_state))
    start = time.perf_counter()
    diag = estimate_hessian(
        args.model, args.data, method=args.method, progress=args.progress, **hessian_keywords(args)
    )
    seconds = time.perf_counter() - start
    size = save_hessian(args.output, diag)
    print(hessian_table(diag))
    samples, distinct = diag.source.samples, diag.distinct
    source = "" if samples is None else f" from {samples} samples"
    if distinct is not None and samples is not None and distinct < samples:
        source = f" from {samples} draws of the data's {distinct} samples"
    print(
        f"wrote {args.output} ({size:,} bytes): {diag.source.method} diagonal of {len(diag)} "
        f"weights{source}, {seconds:.1f} s"
    )
    return 0


def add_prune(sub) -> None:
    p = subcommand(sub, "prune", _run_prune)
    add_model(p)
    add_data(p, "labelled .npz for retraining (and the saliency Hessian)", required=True)
    p.add_argument(
        "--sparsity", type=float, required=True, help="fraction of weights to zero, in [0, 1)"
    )
    p.add_argument(
        "--criterion",
        default=PRUNE_CRITERIA[0],
        choices=PRUNE_CRITERIA,
        help="rank by |w|, by h*w^2, or obs: SparseGPT on each layer's input statistics, the "
        "surviving weights updated to cancel the pruned ones (no labels needed with "
        "--retrain-epochs 0) (default magnitude)",
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
    add_output(p, "pruned .onnx")
    p.set_defaults(flags=PRUNE_FLAGS)


def _run_prune(args) -> int:
    """zero the least important weights and retrain the rest

    Prune MODEL's quantizable weights to a sparsity in a few steps, retraining after each with
    the pruned weights held at zero; write the pruned model.
    """
    from ..data import load_data
    from ..evaluate import accuracy
    from ..model import load_model, save_model
    from ..options.pruning import check_prune_options
    from ..prune import prune_model
    from ..text import prune_table

    check_prune_options(**_prune_keywords(args))  # usage errors before anything is read
    refuse_overwriting_inputs([args.output], existing(args.model, args.data, args.eval_data))
    model = load_model(args.model)
    data = load_data(args.data, model, need_labels=args.retrain_epochs > 0)
    test = load_data(args.eval_data, model, need_labels=True) if args.eval_data else None
    pruned, masks = prune_model(
        model, data, output=args.output_name, progress=args.progress, **_prune_keywords(args)
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


#: `prune_model` keywords (as `OptionError.fields` names them) -> the flags of ``onnxhq prune``.
PRUNE_FLAGS = {
    "sparsity": "--sparsity",
    "criterion": "--criterion",
    "steps": "--steps",
    "retrain_epochs": "--retrain-epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "hessian_samples": "--samples",
}


def _prune_keywords(args) -> dict:
    """The flags of ``onnxhq prune`` as the keywords `prune_model` and `check_prune_options`
    take."""
    return {
        "sparsity": args.sparsity,
        "criterion": args.criterion,
        "scope": args.scope,
        "steps": args.steps,
        "retrain_epochs": args.retrain_epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "hessian_samples": args.samples,
        "seed": args.seed,
    }


def add_decode(sub) -> None:
    p = subcommand(sub, "decode", _run_decode)
    add_compressed(p)
    add_output(p, "runnable .onnx")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--dequantize", action="store_true", help="plain float weights instead of dequantize nodes"
    )
    weights.add_argument(
        "--target",
        choices=DECODE_TARGETS,
        default="gather",
        help="the weights' form: gather (codebook lookups, any codebook; default), "
        "gather-unpacked (the same with a byte per index: a larger file, less session memory), "
        "int8 or int4 (onnxruntime's native low-bit forms; codebooks on a uniform grid only)",
    )


def _run_decode(args) -> int:
    """join a compressed graph and its sidecar into a runnable model"""
    from ..decode import decode_file

    refuse_overwriting_inputs([args.output], existing(args.compressed))
    size = decode_file(args.compressed, args.output, dequantize=args.dequantize, target=args.target)
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


def add_report(sub) -> None:
    p = subcommand(sub, "report", _run_report)
    add_compressed(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_report(args) -> int:
    """size report of compressed artifacts: layers, codebooks, entropy, bits/weight

    Read a compressed graph and the sidecar beside it (nothing else) and print the per-layer
    table, the codebooks and the totals.
    """
    from ..describe import describe_artifacts

    report = describe_artifacts(args.compressed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def add_eval(sub) -> None:
    p = subcommand(sub, "eval", _run_eval)
    add_model(p, "a runnable .onnx, or a compressed graph (its sidecar beside it)")
    add_data(p, "labelled .npz (inputs + 'labels'; labels optional with --against)", required=True)
    p.add_argument(
        "--against",
        metavar="ORIGINAL",
        help="the original .onnx: compare MODEL's outputs with its outputs (fidelity by output "
        "kind, label-free; accuracy too where labels exist)",
    )
    add_common(p, seed=False)


def _run_eval(args) -> int:
    """top-1 accuracy of a model on labelled data, or its fidelity to the original (--against)"""
    from ..data import load_data
    from ..decode import load_runnable
    from ..evaluate import accuracy

    model = load_runnable(args.model)
    if args.against:
        from ..evaluate import fidelity, reference_outputs
        from ..model import load_model
        from ..text import fidelity_lines

        original = load_model(args.against)
        data = load_data(args.data, original)
        reference = reference_outputs(original, data, output=args.output_name)
        print("\n".join(fidelity_lines(fidelity(reference, model, data))[1:]))
        return 0
    data = load_data(args.data, model, need_labels=True)
    acc = accuracy(model, data, output=args.output_name)
    print(f"accuracy {acc:.4%} ({round(acc * len(data))}/{len(data)}) on {args.data}")
    return 0
