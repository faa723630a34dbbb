"""``compress`` and ``sweep``: their flags map onto `CompressOptions`."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import refuse_overwriting_inputs
from ..options import CompressOptions
from .arguments import subcommand
from .common import add_quantizer_flags, existing, option_keywords, write_json


def add_compress(sub) -> None:
    p = subcommand(sub, "compress", _run_compress)
    add_quantizer_flags(p, sweep=False)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--min-fidelity",
        metavar="METRIC=VALUE",
        help="instead of a rate: the smallest artifacts whose outputs on --eval keep this "
        "fidelity to the original (agreement, sequence, iou, cosine, sqnr in dB, at least; kl, "
        "max_abs_error at most), searched over rate and scope",
    )
    target.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="instead of a rate: the smallest artifacts losing at most this many top-1 accuracy "
        "points on the labelled --eval data",
    )
    p.add_argument(
        "--finetune-epochs",
        type=float,
        default=0,
        help="fine-tune the codebook values (indices fixed) for this many epochs over --train",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="assign the codes GPTQ-style: round one input column at a time and move the columns "
        "not yet rounded to cancel the error on each layer's outputs (input statistics from "
        "--data), then refit the codebook values; at a target rate the coded size stays the same",
    )
    p.add_argument("--train", dest="train_data", help="labelled .npz for --finetune-epochs")
    p.add_argument("--finetune-lr", type=float, help="peak Adam learning rate (default 1e-4)")
    p.add_argument("-o", "--outdir", required=True, help="folder for the compressed artifacts")
    p.add_argument("--report-json", help="also write the report as JSON to this file")


def _run_compress(args) -> int:
    """quantize and Huffman-code a model's weights

    Quantize MODEL's weights with one Hessian-weighted codebook, write OUTDIR/<name>.onnx (graph)
    and OUTDIR/<name>.onnxhq (coded indices), print a report.
    """
    options = CompressOptions.from_keywords(
        **option_keywords(args),
        k=args.k,
        bits=args.bits,
        lam=args.lam,
        target_bits=args.target_bits,
        finetune_epochs=args.finetune_epochs,
        train_data=args.train_data,
        finetune_lr=args.finetune_lr,
        max_drop=args.max_drop,
        min_fidelity=args.min_fidelity,
        compensate=args.compensate,
    )
    outdir = Path(args.outdir)
    stem = Path(args.model).stem
    targets: list[str | os.PathLike] = [outdir / f"{stem}.onnx", outdir / f"{stem}.onnxhq"]
    targets += [Path(args.report_json)] if args.report_json else []
    refuse_overwriting_inputs(
        targets,
        existing(
            args.model, args.data, args.eval_data, args.hessian, args.adam_state, args.train_data
        ),
    )
    from ..pipeline import compress  # after the checks: a misconfiguration fails in a blink

    result = compress(
        args.model, args.data, options=options, eval_data=args.eval_data, progress=args.progress
    )
    result.save(outdir)
    print(result.report.to_text())
    if args.report_json:
        write_json(args.report_json, result.report.to_dict())
    return 0


def add_sweep(sub) -> None:
    p = subcommand(sub, "sweep", _run_sweep)
    add_quantizer_flags(p, sweep=True)
    p.add_argument("--no-plot", action="store_true", help="skip sweep.png (no matplotlib needed)")
    p.add_argument("-o", "--outdir", required=True, help="folder for sweep.json and sweep.png")


def _run_sweep(args) -> int:
    """compress at several rates: a rate-accuracy table and plot

    Estimate the Hessian once, compress MODEL at every rate given, evaluate each; print the table
    and write OUTDIR/sweep.json and OUTDIR/sweep.png.
    """
    from ..sweep import sweep

    keywords = option_keywords(args)
    outdir = Path(args.outdir)
    targets: list[str | os.PathLike] = [outdir / "sweep.json"]
    targets += [] if args.no_plot else [outdir / "sweep.png"]
    refuse_overwriting_inputs(
        targets, existing(args.model, args.data, args.eval_data, args.hessian, args.adam_state)
    )
    if not args.no_plot:
        from ..plot import require_matplotlib

        require_matplotlib()  # before the slow part
    result = sweep(
        args.model,
        args.data,
        eval_data=args.eval_data,
        k=args.k or (),
        bits=args.bits or (),
        lam=args.lam or (),
        target_bits=args.target_bits or (),
        progress=args.progress,
        **keywords,
    )
    print(result.to_text())
    write_json(targets[0], result.to_dict())
    if not args.no_plot:
        from ..plot import save_sweep_plot

        save_sweep_plot(result, targets[1])
    print(f"wrote {', '.join(str(t) for t in targets)}")
    return 0
