"""The argument builders the subcommands share, each flag written once, and the library keywords
those flags map to."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

from ..options import DEFAULT_HESSIAN_SAMPLES, EXTRA_OPS, HESSIAN_METHODS
from ..options.vocabulary import MIN_HESSIAN_SAMPLES

Run = Callable[[argparse.Namespace], int]


def subcommand(sub: Any, name: str, run: Run) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, whose ``args.run`` is ``run``.

    ``run``'s docstring is the help: its first paragraph the one-line summary of ``onnxhq -h``,
    the rest (if any) the description of ``onnxhq NAME -h``.
    """
    summary, _, rest = inspect.cleandoc(run.__doc__ or "").partition("\n\n")
    description = " ".join(rest.split()) or None
    p = sub.add_parser(name, help=" ".join(summary.split()), description=description)
    p.set_defaults(run=run)
    return p


def add_model(p: argparse.ArgumentParser, help: str = "input .onnx model") -> None:
    p.add_argument("model", help=help)


def add_compressed(p: argparse.ArgumentParser) -> None:
    """The positional of the readers of compressed artifacts (decode, report)."""
    p.add_argument(
        "compressed", help="the .onnx graph written by 'onnxhq compress' (its sidecar beside it)"
    )


def add_data(p: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    p.add_argument("--data", required=required, help=help)


def add_output(p: argparse.ArgumentParser, what: str) -> None:
    """The required ``-o/--output`` file; ``what`` says what it holds."""
    p.add_argument("-o", "--output", required=True, help=f"the {what} to write")


def add_common(
    p: argparse.ArgumentParser, *, output_name: bool = True, seed: bool = True, several=False
) -> None:
    """``--output-name`` (given once, or with ``several`` once per output) and ``--seed``."""
    if output_name and several:
        p.add_argument(
            "--output-name",
            action="append",
            metavar="NAME[:KIND]",
            help="an output the Hessian reads, and its kind (classes, bernoulli, real); once per "
            "output: their Fishers are summed (default: the first float output, kind detected)",
        )
    elif output_name:
        p.add_argument(
            "--output-name", help="the class-score output to use (default: first of rank 2)"
        )
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_cell_value(p: argparse.ArgumentParser) -> None:
    """``--cell-value mean|grid``: what the uniform quantizer puts in the codebook
    (``CompressOptions.cell_value``)."""
    from ..options.vocabulary import CELL_VALUES

    p.add_argument(
        "--cell-value",
        default=CELL_VALUES[0],
        choices=CELL_VALUES,
        help="uniform quantizer's codebook values: each cell's weighted mean (default, least "
        "error) or its grid point (then decode --target int8|int4 writes onnxruntime's native "
        "integer forms)",
    )


def add_hessian_flags(p: argparse.ArgumentParser, *, estimator_flag: str) -> None:
    """The Hessian flags: the source (``--method`` of ``onnxhq hessian``, ``--hessian`` of
    compress and sweep), its draws, and the weights covered; `hessian_keywords` reads them."""
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
        help="samples drawn for the Hessian estimate (default: as many as a fixed budget of "
        f"multiply-adds buys on the model, {MIN_HESSIAN_SAMPLES} to {DEFAULT_HESSIAN_SAMPLES})",
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
    add_common(p, several=True)


def hessian_keywords(args: argparse.Namespace, *, prefix: str = "") -> dict[str, Any]:
    """The values of the flags of `add_hessian_flags` (but the source) keyed as
    `onnxhq.estimate_hessian` takes them; ``prefix="hessian_"`` names the draws as
    `CompressOptions.from_keywords` does (``hessian_samples``, ``hessian_batch_size``)."""
    return {
        f"{prefix}samples": args.samples,
        f"{prefix}batch_size": args.batch_size,
        "adam_state": args.adam_state,
        "include_biases": args.include_biases,
        "extra_ops": tuple(args.extra_ops),
        "output": _outputs(args.output_name),
        "seed": args.seed,
    }


def _outputs(given: list[str] | None) -> str | tuple[str, ...] | None:
    """``--output-name`` given never (None), once (its text) or more (a tuple)."""
    if not given:
        return None
    return given[0] if len(given) == 1 else tuple(given)
