"""Issue 2's end-to-end measurement: LeNet-5 on the full MNIST test set, one Hessian-weighted codebook.

    python tools/bench_e2e.py [--k 32] [--method hkmeans] [--samples 1000]

Hessian (diagonal Fisher, labels sampled from the model) from --samples MNIST *training* images;
accuracy of the float and the decoded compressed model on all 10,000 test images; every byte of
both artifacts counted. No pruning, no fine-tuning. Prints a markdown row for tools/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
import lenet  # noqa: E402

import onnxhq  # noqa: E402
from onnxhq.data import Dataset  # noqa: E402

MNIST = ROOT.parent / "shared" / "datasets" / "mnist.npz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "lenet5_mnist.onnx"))
    ap.add_argument("--k", type=int, nargs="+", default=[32])
    ap.add_argument("--method", default="hkmeans")
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()
    if not MNIST.is_file():
        print(f"error: {MNIST} is missing; this benchmark needs the shared MNIST data", file=sys.stderr)
        return 1
    x_train, _ = lenet.load_mnist(str(MNIST), "train", limit=args.samples)
    x_test, y_test = lenet.load_mnist(str(MNIST), "test")
    calib, test = Dataset({"input": x_train}), Dataset({"input": x_test}, y_test)
    print(f"date {date.today()}, machine: {platform.machine()} {platform.processor() or ''} "
          f"{__import__('os').cpu_count()} cores, python {platform.python_version()}")
    print(f"command: python tools/bench_e2e.py {' '.join(sys.argv[1:])}\n")
    print("| model | method | k | float acc. | compressed acc. | drop (points) | bytes | ratio (all bytes) | paper Eq. 1 | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in args.k:
        t0 = time.time()
        r = onnxhq.compress(args.model, calib, method=args.method, k=k, eval_data=test, hessian_samples=args.samples)
        rep = r.report
        drop = 100 * (rep.accuracy_original - rep.accuracy_compressed)
        print(f"| {Path(args.model).stem} | {args.method} | {k} | {rep.accuracy_original:.2%} | "
              f"{rep.accuracy_compressed:.2%} | {drop:.2f} | {rep.compressed_bytes:,} | "
              f"{rep.compression_ratio:.2f}x | {rep.paper_ratio:.2f}x | {time.time() - t0:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
