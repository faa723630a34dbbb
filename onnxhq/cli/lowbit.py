"""``onnxhq lowbit``: a float model straight to a runnable file in onnxruntime's native 4/8-bit
forms (`onnxhq.lowbit`)."""

from __future__ import annotations

from .._io import refuse_overwriting_inputs
from ..options import OptionError
from ..options.vocabulary import LOWBIT_BITS as BITS
from ..options.vocabulary import LOWBIT_BLOCKS as BLOCKS
from .arguments import add_data, add_model, add_output, subcommand
from .common import existing

#: `LowbitOptions` fields -> the flags that set them (option errors name the flags).
LOWBIT_FLAGS = {
    "bits": "--bits",
    "protect_bits": "--protect-bits",
    "block_sizes": "--block-size",
    "max_bytes": "--max-file-mb",
    "max_file_mb": "--max-file-mb",
    "accuracy_level": "--accuracy-level",
    "keep_float": "--keep-float",
}


def add_lowbit(sub) -> None:
    p = subcommand(sub, "lowbit", _run_lowbit)
    add_model(p, "the float .onnx model")
    add_data(
        p,
        ".npz of typical inputs (no labels needed): importances and layer Hessians",
        required=True,
    )
    add_output(p, "runnable .onnx (MatMulNBits / GatherBlockQuantized; onnxruntime only)")
    p.add_argument(
        "--bits",
        type=int,
        default=4,
        choices=BITS,
        help="levels of 2**BITS per block for every weight (default 4)",
    )
    p.add_argument(
        "--protect-bits",
        type=int,
        choices=BITS,
        help="with --max-file-mb: the bits "
        "the most sensitive weights may be raised to within the budget",
    )
    p.add_argument(
        "--block-size",
        type=int,
        nargs="+",
        default=[32],
        choices=BLOCKS,
        metavar="B",
        help="elements per scale along K (MatMul) or the embedding "
        "(Gather); several: chosen per weight (default 32)",
    )
    p.add_argument(
        "--max-file-mb",
        type=float,
        help="budget of the written file in MB (10^6 "
        "bytes); the weights share it by importance-weighted error per byte",
    )
    p.add_argument(
        "--keep-float", action="store_true", help="with --max-file-mb: a weight may stay float"
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        default=0,
        choices=(0, 4),
        help="MatMulNBits' accuracy_level: 0 computes in float32, 4 in int8 (faster; default 0)",
    )
    p.add_argument(
        "--hessian",
        default="fisher",
        help="the importances' estimator (default fisher; activations without gradients)",
    )
    p.add_argument("--samples", type=int, help="samples drawn for the Hessian estimate")
    p.add_argument(
        "--no-gptq",
        action="store_true",
        help="round to nearest instead of GPTQ onto the grids (no layer statistics gathered)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(flags=LOWBIT_FLAGS)


def _run_lowbit(args) -> int:
    """a float model to a runnable 4/8-bit file in onnxruntime's native forms

    Each weight only MatMul (or a plain Gemm) reads becomes MatMulNBits, each embedding table only
    Gather reads GatherBlockQuantized, on block grids whose ranges are clip-searched on the
    Hessian-weighted error and rounded by GPTQ; with --max-file-mb the weights get --bits or
    --protect-bits by weighted error per byte so that the file fits.
    """
    from ..lowbit import LowbitOptions, lowbit_model
    from ..model import save_model

    mb = args.max_file_mb
    if mb is not None and not mb > 0:
        raise OptionError(f"max_file_mb={mb:g} must be positive", "max_file_mb")
    options = LowbitOptions(
        bits=args.bits,
        protect_bits=args.protect_bits,
        block_sizes=tuple(dict.fromkeys(args.block_size)),
        max_bytes=None if mb is None else int(mb * 1e6),
        accuracy_level=args.accuracy_level,
        keep_float=args.keep_float,
    )
    refuse_overwriting_inputs([args.output], existing(args.model, args.data))
    lowered = lowbit_model(
        args.model,
        args.data,
        options,
        hessian=args.hessian,
        samples=args.samples,
        seed=args.seed,
        gptq=not args.no_gptq,
    )
    size = save_model(lowered.model, args.output)
    counts: dict[str, int] = {}
    for c in lowered.choices.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    forms = ", ".join(f"{n} x {label}" for label, n in sorted(counts.items()))
    print(f"wrote {args.output} ({size:,} bytes; {forms})")
    return 0
