"""What compress and sweep share: the option flags and the `CompressOptions` keywords they map
to; and the file helpers of every subcommand."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_write_bytes
from ..options import DEFAULT_METHOD, GUARDS, METHODS, SCOPES
from .arguments import add_cell_value, add_data, add_hessian_flags, add_model, hessian_keywords


def existing(*paths) -> list[str | os.PathLike]:
    """The given paths that name files, with every file an ``.onnx`` among them reads (its
    external data files, the sidecar of a compressed graph): the inputs an output must not
    overwrite."""
    from ..model import model_files  # onnx loads only once a command runs

    found: list[str | os.PathLike] = []
    for p in paths:
        if p and Path(p).is_file():
            found += model_files(p) if str(p).endswith(".onnx") else [str(p)]
    return found


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def add_quantizer_flags(p, *, sweep: bool) -> None:
    """Flags shared by compress and sweep: data, method, rate(s), scope, Hessian, guard."""
    add_model(p)
    add_data(p, ".npz of model inputs (for the Hessian estimate)")
    p.add_argument(
        "--eval",
        dest="eval_data",
        required=sweep,
        help=".npz of inputs: compare the outputs with the original's (labels too: accuracy)",
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
    p.add_argument(
        "--guard",
        default=GUARDS[0],
        choices=GUARDS,
        help="a tensor a shared codebook leaves far worse off than one of its own: give it its "
        "own (requantize, the default), flag it in the report (warn), or do not check (off)",
    )
    add_cell_value(p)
    p.add_argument(
        "--no-fold-batchnorm",
        dest="fold_batchnorm",
        action="store_false",
        help="keep BatchNormalization nodes as they are (by default each is folded into the "
        "Conv, ConvTranspose or Gemm before it where the maths stay the same)",
    )
    p.add_argument(
        "--keep-names",
        dest="compact_names",
        action="store_false",
        help="keep the model's value and node names, doc strings and default attributes in the "
        "written graph (by default internal names become short counters; inputs and outputs keep "
        "theirs)",
    )


def option_keywords(args) -> dict:
    """`CompressOptions.from_keywords` keywords of the flags of `add_quantizer_flags`."""
    return dict(
        method=args.method,
        scope=args.scope,
        group_size=args.group_size,
        hessian=args.hessian,
        guard=args.guard,
        cell_value=args.cell_value,
        fold_batchnorm=args.fold_batchnorm,
        compact_names=args.compact_names,
        **hessian_keywords(args, prefix="hessian_"),
    )
