"""Write models/mnist_sample.npz: 2,000 MNIST test images for the demo and the tests.

    python -m tools.make_mnist_sample [--count 2000] [--out models/mnist_sample.npz] [--smoke]

Keys: ``input`` float32 [N,1,28,28] (pixels / 255, the bundled models' input), ``labels`` int64
and ``test_index`` int32 (positions in the test split). The images are a seeded random choice
from the 10,000 test images of ``$ONNXHQ_SHARED/datasets/mnist.npz`` (see tools/datasets.py).
``--smoke``: draws 100 images from an MNIST-shaped file made of the bundled sample, into a
temporary folder (the bundled sample is not touched).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools import datasets

SEED = 2017


def write_sample(mnist: Path, out: Path, count: int) -> None:
    """Draw ``count`` test images of the MNIST archive ``mnist`` (seed 2017) into ``out``."""
    with np.load(mnist, allow_pickle=False) as z:
        x, y = z["x_test"], z["y_test"]
    chosen = np.sort(np.random.default_rng(SEED).choice(len(x), size=count, replace=False))
    np.savez_compressed(
        out,
        input=(x[chosen].astype(np.float32) / 255)[:, None],
        labels=y[chosen].astype(np.int64),
        test_index=chosen.astype(np.int32),
    )


def smoke(tmp: Path, count: int) -> Path:
    """Run :func:`write_sample` on a stand-in made of the bundled sample; check what it wrote."""
    with np.load(datasets.SAMPLE, allow_pickle=False) as z:
        pixels = np.rint(z["input"][:, 0] * 255).astype(np.uint8)
        labels = z["labels"].astype(np.uint8)
    np.savez(tmp / "mnist.npz", x_test=pixels, y_test=labels)
    out = tmp / "mnist_sample.npz"
    write_sample(tmp / "mnist.npz", out, count)
    with np.load(out, allow_pickle=False) as z:
        index = z["test_index"]
        assert z["input"].shape == (count, 1, 28, 28) and z["input"].dtype == np.float32
        assert np.array_equal(z["labels"], labels[index])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=datasets.SAMPLE)
    ap.add_argument("--smoke", action="store_true", help="seconds, into a temporary folder")
    args = ap.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="onnxhq-smoke-") as tmp:
            out = smoke(Path(tmp), 100)
            print(f"smoke: wrote {out.name} ({out.stat().st_size:,} bytes, 100 images)")
        return 0
    write_sample(datasets.shared_file("datasets", "mnist.npz"), args.out, args.count)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {args.count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
