"""Issue 2's end-to-end measurement: LeNet-5 on the full MNIST test set, one Hessian codebook.

    python -m tools.bench_e2e [--k 32] [--method hkmeans] [--samples 1000] [--smoke]

Hessian (diagonal Fisher, labels sampled from the model) from --samples MNIST *training* images;
accuracy of the float and the decoded compressed model on all 10,000 test images; every byte of
both artifacts counted. No pruning, no fine-tuning. Prints a markdown row for tools/RESULTS.md.
``--smoke``: the bundled sample instead of MNIST (see tools/datasets.py), k = 8, 100 samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import onnxhq
from onnxhq.options import METHODS
from tools import datasets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=datasets.LENET5)
    ap.add_argument("--k", type=int, nargs="+", default=[32])
    ap.add_argument("--method", default="hkmeans", choices=METHODS)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="seconds on the bundled sample")
    args = ap.parse_args(argv)
    if args.smoke:
        args.k, args.samples = [8], 100
    calib = datasets.mnist("train", limit=args.samples, smoke=args.smoke)
    test = datasets.mnist("test", smoke=args.smoke)
    print(
        f"date {date.today()}, machine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"command: python -m tools.bench_e2e {' '.join(sys.argv[1:])}\n")
    print(
        "| model | method | k | float acc. | compressed acc. | drop (points) | bytes "
        "| ratio (all bytes) | paper Eq. 1 | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in args.k:
        t0 = time.time()
        rep = onnxhq.compress(
            args.model,
            calib,
            method=args.method,
            k=k,
            eval_data=test,
            hessian_samples=args.samples,
        ).report
        drop = 100 * (rep.accuracy_original - rep.accuracy_compressed)
        print(
            f"| {args.model.stem} | {args.method} | {k} | {rep.accuracy_original:.2%} | "
            f"{rep.accuracy_compressed:.2%} | {drop:.2f} | {rep.compressed_bytes:,} | "
            f"{rep.compression_ratio:.2f}x | {rep.paper_ratio:.2f}x | {time.time() - t0:.1f} s |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
