"""The ``onnxhq`` command line. Exit codes: 0 success, 1 an error (`OnnxhqError`, or an OS error
while writing), 2 a usage error (argparse's, or an option value `onnxhq.options` refuses); errors
are one line on stderr, never a traceback (unless --verbose and the error is a bug).

One subcommand per pipeline stage (`stages`: inspect, hessian, prune, decode, report, eval; and
`compress`) plus sweep. Each ``add_X`` declares a subcommand's flags and its ``_run_X`` maps them
onto the library. The flags' choices come from `onnxhq.options`; compress and sweep build their
`CompressOptions` from the same flags (`common`), and an option error names the flag, not the
Python keyword.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .. import __version__
from ..errors import OnnxhqError
from ..options import OptionError
from ..progress import Progress
from . import compress, lowbit, repack, setup, stages

#: `compress` keywords (as `OptionError.fields` names them) -> the flags that set them.
FLAGS = {
    "method": "--method",
    "k": "--k",
    "bits": "--bits",
    "lam": "--lambda",
    "target_bits": "--target-bits",
    "scope": "--scope",
    "group_size": "--group-size",
    "hessian": "--hessian",
    "hessian_samples": "--samples",
    "hessian_batch_size": "--batch-size",
    "adam_state": "--adam-state",
    "include_biases": "--include-biases",
    "extra_ops": "--extra-ops",
    "finetune_epochs": "--finetune-epochs",
    "train_data": "--train",
    "finetune_lr": "--finetune-lr",
    "output": "--output-name",
    "seed": "--seed",
    "data": "--data",
    "eval_data": "--eval",
    "guard": "--guard",
    "max_drop": "--max-drop",
    "min_fidelity": "--min-fidelity",
    "compensate": "--compensate",
    "cell_value": "--cell-value",
    "fold_batchnorm": "--no-fold-batchnorm",
    "compact_names": "--keep-names",
}


SUBCOMMANDS = (
    stages.add_inspect,
    stages.add_hessian,
    stages.add_prune,
    compress.add_compress,
    stages.add_decode,
    repack.add_repack,
    lowbit.add_lowbit,
    stages.add_report,
    stages.add_eval,
    compress.add_sweep,
    setup.add_setup_training,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxhq",
        description="Hessian-weighted quantization and Huffman "
        "coding of ONNX models (Choi, El-Khamy & Lee, ICLR 2017).",
    )
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
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.progress = Progress(enabled=False if args.quiet else None)
    try:
        return args.run(args)
    except OptionError as exc:  # a usage error found by the option types: name the flags
        flags = {**FLAGS, **getattr(args, "flags", {})}
        print(f"onnxhq: error: {flag_spelling(_one_line(exc), exc.fields, flags)}", file=sys.stderr)
        return 2
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
        print(
            f"onnxhq: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with "
            "--verbose for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def flag_spelling(message: str, fields, flags=FLAGS) -> str:
    """``message`` with the keyword names of ``fields`` spelled as flags: ``group_size=0`` becomes
    ``--group-size 0`` and a bare ``group_size`` ``--group-size``."""
    for name in sorted(set(fields), key=len, reverse=True):  # target_bits before bits
        flag = flags.get(name)
        if flag is not None:
            message = re.sub(rf"(?<![\w.'-]){re.escape(name)}=", f"{flag} ", message)
            message = re.sub(rf"(?<![\w.'-]){re.escape(name)}(?![\w'=-])", flag, message)
    return message


def _one_line(message) -> str:
    return " ".join(str(message).split())
