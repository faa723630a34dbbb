"""Write models/mnist_sample.npz: 2,000 MNIST test images for the demo and the tests.

    python tools/make_mnist_sample.py [--count 2000]

Keys: ``input`` float32 [N,1,28,28] (pixels / 255, the bundled models' input) and ``labels`` int64.
The images are a seeded random choice from the 10,000 test images of ../shared/datasets/mnist.npz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist.npz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "mnist_sample.npz")
    args = ap.parse_args()
    if not MNIST.is_file():
        print(f"error: {MNIST} is missing; this script needs the shared MNIST data", file=sys.stderr)
        return 1
    with np.load(MNIST, allow_pickle=False) as z:
        x, y = z["x_test"], z["y_test"]
    chosen = np.sort(np.random.default_rng(2017).choice(len(x), size=args.count, replace=False))
    np.savez_compressed(args.out, input=(x[chosen].astype(np.float32) / 255)[:, None], labels=y[chosen].astype(np.int64),
                        test_index=chosen.astype(np.int32))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {args.count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
