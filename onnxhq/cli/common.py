"""What the subcommands share: common flags, the option flags of compress and sweep, file
helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_write_bytes
from ..options import (
    DEFAULT_HESSIAN_SAMPLES,
    DEFAULT_METHOD,
    EXTRA_OPS,
    HESSIAN_METHODS,
    METHODS,
    SCOPES,
)


def existing(*paths) -> list[str | os.PathLike]:
    """The given paths that name files: the inputs an output must not overwrite."""
    return [str(p) for p in paths if p and Path(p).is_file()]


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def add_common(p, *, output_name: bool = True, seed: bool = True) -> None:
    if output_name:
        p.add_argument(
            "--output-name", help="the class-score output to use (default: first of rank 2)"
        )
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_hessian_flags(p, *, estimator_flag: str) -> None:
    """The Hessian flags: the source (``--method`` of ``onnxhq hessian``, ``--hessian`` of
    compress and sweep), its draws, and the weights covered."""
    estimators = tuple(m for m in HESSIAN_METHODS if m != "none")
    if estimator_flag == "--method":
        p.add_argument(
            "--method", default="fisher", choices=estimators, help="estimator (default fisher)"
        )
    else:
        p.add_argument(
            "--hessian",
            help=f"estimator ({', '.join(HESSIAN_METHODS)}) or an .npz written by "
            "'onnxhq hessian' (default fisher; none for --method kmeans)",
        )
    p.add_argument(
        "--samples",
        type=int,
        help=f"samples drawn for the Hessian estimate (default {DEFAULT_HESSIAN_SAMPLES})",
    )
    p.add_argument(
        "--batch-size", type=int, help="samples per Hessian gradient (default: the estimator's)"
    )
    p.add_argument(
        "--adam-state", help=".npz of Adam second moments keyed by weight name (Hessian adam)"
    )
    p.add_argument(
        "--include-biases", action="store_true", help="quantize (and weigh) the biases too"
    )
    p.add_argument(
        "--extra-ops",
        nargs="+",
        default=(),
        metavar="OP",
        choices=EXTRA_OPS,
        help=f"also quantize the weights of these op types ({', '.join(EXTRA_OPS)})",
    )
    add_common(p)


def add_quantizer_flags(p, *, sweep: bool) -> None:
    """Flags shared by compress and sweep: data, method, rate(s), scope, Hessian."""
    p.add_argument("model", help="input .onnx model")
    p.add_argument("--data", help=".npz of model inputs (for the Hessian estimate)")
    p.add_argument(
        "--eval", dest="eval_data", required=sweep, help="labelled .npz: measure accuracy"
    )
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=METHODS,
        help=f"quantizer (default {DEFAULT_METHOD}, the best accuracy per bit measured)",
    )
    rate = p.add_mutually_exclusive_group(required=sweep)
    many = "+" if sweep else None
    rate.add_argument("--k", type=int, nargs=many, help="clusters (default 32 for k-means)")
    rate.add_argument("--bits", type=float, nargs=many, help="bits per index: k = 2**bits")
    rate.add_argument("--lambda", dest="lam", type=float, nargs=many, help="rate weight of ECSQ")
    rate.add_argument(
        "--target-bits",
        type=float,
        nargs=many,
        help="target entropy of the indices, bits per weight (default 4 for uniform and ECSQ)",
    )
    p.add_argument(
        "--scope", default="network", choices=SCOPES, help="codebook scope (default network)"
    )
    p.add_argument(
        "--group-size", type=int, help="output channels per codebook with --scope channel-group"
    )
    add_hessian_flags(p, estimator_flag="--hessian")


def option_keywords(args) -> dict:
    """`CompressOptions.from_keywords` keywords of the flags of `add_quantizer_flags`."""
    return dict(
        method=args.method,
        scope=args.scope,
        group_size=args.group_size,
        hessian=args.hessian,
        hessian_samples=args.samples,
        hessian_batch_size=args.batch_size,
        adam_state=args.adam_state,
        include_biases=args.include_biases,
        extra_ops=tuple(args.extra_ops),
        output=args.output_name,
        seed=args.seed,
    )
