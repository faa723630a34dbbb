"""Benchmark the Hessian-diagonal estimators: cost, and effect on LeNet-5 quantization.

    python tools/bench_hessian.py [--lenet-samples 1000] [--resnet-samples 128] [--seeds 3]
                                  [--out /work/scratch/bench_hessian_results.md]

1. Seconds per 1,000 samples of each estimator on LeNet-5 (``models/lenet5_mnist.onnx``, MNIST
   training images) and ResNet-32 (``../shared/models/resnet32_cifar10.npz`` with BatchNorm folded,
   CIFAR-10 training images). The Hessian covers the quantizable weights only, as in the pipeline.
   ResNet-32 runs fewer samples and the time is scaled to 1,000 (the estimators' cost is linear in
   the samples). Building the gradient graphs is a one-off cost, shown apart.
2. LeNet-5 top-1 accuracy on the 10,000 MNIST test images after Hessian-weighted k-means with one
   codebook for all layers (k = 8, 16, 32), for each estimator; mean over ``--seeds`` k-means seeds.

Timings are wall-clock; on a shared machine run with ``--threads 1`` (the default): onnxruntime's
thread pool spin-waits, so with other processes on the cores two threads can be several times
slower than one.

Writes a markdown report (date, machine, command) to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
import lenet  # noqa: E402
from resnet_cifar import load_resnet_cifar  # noqa: E402

from onnxhq import hessian  # noqa: E402
from onnxhq.data import Dataset  # noqa: E402
from onnxhq.evaluate import accuracy  # noqa: E402
from onnxhq.gradients import GradientEngine  # noqa: E402
from onnxhq.hessian_gn import ProjectionEngine  # noqa: E402
from onnxhq.model import load_model, quantizable_weights, read_initializers, replace_initializers  # noqa: E402

SHARED = ROOT.parent / "shared"
MNIST = SHARED / "datasets" / "mnist.npz"
CIFAR = SHARED / "datasets" / "cifar10.npz"
RESNET = SHARED / "models" / "resnet32_cifar10.npz"
LENET = ROOT / "models" / "lenet5_mnist.onnx"
LENET_ADAM = ROOT / "models" / "lenet5_mnist_adam.npz"
METHODS = ("fisher", "empirical-fisher", "hutchinson", "gauss-newton", "adam", "none")


def cifar_train(limit: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 training images as the ResNet takes them: float32 [N, 3, 32, 32] in [0, 1]."""
    with np.load(CIFAR, allow_pickle=False) as z:
        x, y = z["x_train"][:limit], z["y_train"][:limit]
    return np.ascontiguousarray((x.astype(np.float32) / 255).transpose(0, 3, 1, 2)), y.astype(np.int64)


def time_estimators(model, data: Dataset, samples: dict[str, int], *, threads: int, adam_state=None,
                    batch_size: int = 16) -> dict:
    """Seconds per 1,000 samples per method, the one-off build times, and the estimates themselves."""
    names = [w.name for w in quantizable_weights(model)]
    t0 = time.perf_counter()
    engine = GradientEngine(model, params=names, threads=threads)
    build_ce = time.perf_counter() - t0
    t0 = time.perf_counter()
    view = ProjectionEngine(model, params=names, threads=threads)
    build_gn = time.perf_counter() - t0
    shapes = {n: engine.values[n].shape for n in names}
    runs = {
        "fisher": lambda n: hessian.fisher(engine, data, samples=n, batch_size=batch_size),
        "empirical-fisher": lambda n: hessian.empirical_fisher(engine, data, samples=n),
        "hutchinson": lambda n: hessian.hutchinson(engine, data, samples=n, batch_size=batch_size),
        "gauss-newton": lambda n: hessian.gauss_newton(view, data, samples=n, batch_size=batch_size),
    }
    if adam_state is not None:
        runs["adam"] = lambda n: hessian.adam(adam_state, shapes)
    timings, estimates = {}, {}
    for method, run in runs.items():
        n = samples.get(method, samples["default"])
        t0, c0 = time.perf_counter(), time.process_time()
        estimates[method] = run(n)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        scale = 1000 / n if method != "adam" else 1.0
        timings[method] = (n, seconds, seconds * scale, cpu * scale)
        print(f"  {method}: {n} samples in {seconds:.2f} s ({cpu:.2f} s CPU)", file=sys.stderr, flush=True)
    return {"build": (build_ce, build_gn), "timings": timings, "estimates": estimates, "names": names}


def quantized_accuracy(model, weights: dict, importances, test: Dataset, *, k: int, seed: int) -> float:
    from onnxhq.quantize import quantize_weights

    result = quantize_weights(weights, importances, scope="network", method="hkmeans", k=k, seed=seed)
    return accuracy(replace_initializers(model, result.dequantize_all()), test)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lenet-samples", type=int, default=1000)
    ap.add_argument("--resnet-samples", type=int, default=128, help="per method (empirical-fisher: a quarter)")
    ap.add_argument("--seeds", type=int, default=3, help="k-means seeds per accuracy cell")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads for the estimators (0: onnxruntime chooses)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/work/scratch/bench_hessian_results.md"))
    args = ap.parse_args()
    for path in (LENET, MNIST):
        if not path.is_file():
            print(f"error: {path} is missing", file=sys.stderr)
            return 1
    started = time.perf_counter()
    lines = [f"# Hessian estimators: cost and effect on quantization", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"- machine: {machine()}", f"- commit: {commit()} (working tree)",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- onnxruntime threads for the estimators: {args.threads or 'onnxruntime default'}; load average at "
             f"start {' '.join(f'{v:.1f}' for v in os.getloadavg())}", ""]

    print("LeNet-5", file=sys.stderr)
    model = load_model(LENET)
    x_train, y_train = lenet.load_mnist(str(MNIST), "train", 10_000)
    lenet_run = time_estimators(model, Dataset({"input": x_train}, y_train), {"default": args.lenet_samples},
                                threads=args.threads, adam_state=LENET_ADAM)
    resnet_run = None
    if not args.skip_resnet:
        print("ResNet-32 (BatchNorm folded)", file=sys.stderr)
        resnet = load_resnet_cifar(str(RESNET), fold_batchnorm=True)
        x_c, y_c = cifar_train(2_000)
        n = args.resnet_samples
        resnet_run = time_estimators(resnet, Dataset({"input": x_c}, y_c),
                                     {"default": n, "empirical-fisher": max(n // 4, 16)}, threads=args.threads)
    lines += cost_table(lenet_run, resnet_run, args)

    print("LeNet-5 quantization", file=sys.stderr)
    x_test, y_test = lenet.load_mnist(str(MNIST), "test")
    test = Dataset({"input": x_test}, y_test)
    names = lenet_run["names"]
    weights = {n: w.astype(np.float32) for n, w in read_initializers(model, names).items()}
    lines += accuracy_table(model, weights, lenet_run["estimates"], test, args)
    lines += ["", f"Total bench time {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def cost_table(lenet_run: dict, resnet_run: dict | None, args) -> list[str]:
    out = ["## Cost: seconds per 1,000 samples, wall (CPU) (quantizable weights only, batch 16 where batched)", "",
           "| method | LeNet-5 s / 1,000 | LeNet-5 measured | ResNet-32 s / 1,000 | ResNet-32 measured |",
           "|---|---|---|---|---|"]
    for method in METHODS:
        if method == "none":
            out.append("| none | 0 | - | 0 | - |")
            continue
        cells = []
        for run in (lenet_run, resnet_run):
            if run is None or method not in run["timings"]:
                cells += ["n/a", "-"]
                continue
            n, seconds, per, cpu = run["timings"][method]
            if method == "adam":
                cells += [f"{per:.2f} ({cpu:.2f}): reads the state, no samples", "-"]
            else:
                cells += [f"{per:.2f} ({cpu:.2f})", f"{n} samples, {seconds:.1f} s"]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += ["", "One-off graph building (cross-entropy gradient graph; projection graph for gauss-newton): "
            f"LeNet-5 {lenet_run['build'][0]:.2f} s + {lenet_run['build'][1]:.2f} s"
            + ("" if resnet_run is None else
               f"; ResNet-32 {resnet_run['build'][0]:.2f} s + {resnet_run['build'][1]:.2f} s") + ".",
            f"LeNet-5 used {args.lenet_samples} samples per method from the first 10,000 MNIST training images; "
            + ("ResNet-32 was skipped." if resnet_run is None else
               f"ResNet-32 used {args.resnet_samples} (empirical-fisher {max(args.resnet_samples // 4, 16)}) of the "
               "first 2,000 CIFAR-10 training images, scaled linearly to 1,000."),
            "empirical-fisher takes one gradient per sample; fisher and gauss-newton one per batch; hutchinson two "
            "per batch (central differences).", ""]
    return out


def accuracy_table(model, weights: dict, estimates: dict, test: Dataset, args) -> list[str]:
    base = accuracy(model, test)
    out = [f"## LeNet-5: MNIST test accuracy after quantization (one codebook for all layers, hkmeans)", "",
           f"Float model: {base:.2%}. Mean over {args.seeds} k-means seeds (min-max in brackets).", "",
           "| Hessian | " + " | ".join(f"k = {k}" for k in args.ks) + " |",
           "|---|" + "---|" * len(args.ks)]
    for method in ("none",) + tuple(m for m in METHODS if m in estimates):
        importances = None if method == "none" else estimates[method]
        cells = []
        for k in args.ks:
            accs = [quantized_accuracy(model, weights, importances, test, k=k, seed=s) for s in range(args.seeds)]
            cells.append(f"{np.mean(accs):.2%} [{min(accs):.2%}-{max(accs):.2%}]")
            print(f"  {method} k={k}: {cells[-1]}", file=sys.stderr, flush=True)
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
