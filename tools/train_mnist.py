"""Train the bundled MNIST reference models (LeNet-5, LeNet-300-100) with onnxhq's gradient engine.

    python -m tools.train_mnist {lenet5,lenet300} [--epochs 15] [--out models/] [--smoke]

Reads MNIST from ``$ONNXHQ_SHARED/datasets/mnist.npz`` (see tools/datasets.py). Adam with a
cosine learning-rate schedule and random shifts of up to 2 pixels. Checkpoints after every epoch
under tools/_cache/train_<name>/ and resumes from the newest. Writes models/<name>_mnist.onnx and
models/<name>_mnist_adam.npz (bias-corrected Adam second moment, keyed by initializer name), and
prints test accuracy. ``--smoke``: one epoch on the bundled sample, everything written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import lenet
from onnxhq.evaluate import accuracy
from onnxhq.model import replace_initializers, save_model
from onnxhq.training.engine import GradientEngine
from onnxhq.training.train import AdamState, cosine_lr, train
from tools import datasets

BUILDERS = {"lenet5": lenet.build_lenet5, "lenet300": lenet.build_lenet300}


def random_shift(feed: dict, rng: np.random.Generator, pad: int = 2) -> dict:
    """Shift each image by up to ``pad`` pixels in each direction (zero fill)."""
    x = feed["input"]
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oy, ox = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.arange(w)
    out = padded[np.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
    return {"input": np.ascontiguousarray(out, dtype=np.float32)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("name", choices=sorted(BUILDERS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=datasets.MODELS)
    ap.add_argument("--smoke", action="store_true", help="one epoch on the bundled sample")
    args = ap.parse_args(argv)
    if not args.smoke:
        return run(args, datasets.CACHE / f"train_{args.name}")
    with tempfile.TemporaryDirectory(prefix="onnxhq-smoke-") as tmp:
        args.epochs, args.out = 1, Path(tmp)
        return run(args, Path(tmp) / "cache")


def run(args: argparse.Namespace, cache: Path) -> int:
    train_data = datasets.mnist("train", smoke=args.smoke)
    test = datasets.mnist("test", smoke=args.smoke)
    model = BUILDERS[args.name](args.seed)
    engine = GradientEngine(model, threads=2)
    cache.mkdir(parents=True, exist_ok=True)
    state, start = None, 0
    done = sorted(cache.glob("epoch_*.npz"))
    if done:
        start, state = load_checkpoint(done[-1], engine)
        print(f"resuming after epoch {start} from {done[-1]}")
    schedule = cosine_lr(args.lr)  # over the whole run, from lr down to lr / 100
    for epoch in range(start, args.epochs):
        t0 = time.time()
        params, state = train(
            engine,
            train_data.inputs,
            train_data.labels,
            epochs=1,
            batch_size=args.batch_size,
            lr=lambda f, e=epoch: schedule((e + f) / args.epochs),
            seed=args.seed * 1000 + epoch,
            state=state,
            augment=random_shift,
        )
        acc = accuracy(replace_initializers(model, params), test)
        print(
            f"epoch {epoch + 1}/{args.epochs}: test accuracy {acc:.4%} ({time.time() - t0:.0f} s)",
            flush=True,
        )
        save_checkpoint(cache / f"epoch_{epoch + 1:03d}.npz", params, state)
    final = replace_initializers(model, engine.values)
    out = args.out / f"{args.name}_mnist.onnx"
    save_model(final, out)
    np.savez_compressed(args.out / f"{args.name}_mnist_adam.npz", **state.second_moment())
    print(f"final test accuracy {accuracy(final, test):.4%}; wrote {out}")
    return 0


def save_checkpoint(path: Path, params: dict, state: AdamState) -> None:
    arrays = {f"p/{k}": v for k, v in params.items()}
    arrays.update({f"m/{k}": v for k, v in state.m.items()})
    arrays.update({f"v/{k}": v for k, v in state.v.items()})
    np.savez(path, step=np.int64(state.step), **arrays)


def load_checkpoint(path: Path, engine: GradientEngine) -> tuple[int, AdamState]:
    with np.load(path) as z:
        params = {k[2:]: z[k] for k in z.files if k.startswith("p/")}
        m, v = ({k[2:]: z[k] for k in z.files if k.startswith(p)} for p in ("m/", "v/"))
        state = AdamState(m=m, v=v, step=int(z["step"]))
    engine.with_values(params)
    return int(path.stem.split("_")[1]), state


if __name__ == "__main__":
    sys.exit(main())
