"""Benchmark the Hessian-diagonal estimators: cost, and effect on LeNet-5 quantization.

    python -m tools.bench_hessian [--lenet-samples 1000] [--resnet-samples 128] [--seeds 3]
                                  [--out FILE.md] [--skip-resnet] [--smoke]

1. Seconds per 1,000 samples of each estimator on LeNet-5 (``models/lenet5_mnist.onnx``, MNIST
   training images) and ResNet-32 (``$ONNXHQ_SHARED/models/resnet32_cifar10.npz`` with BatchNorm
   folded, CIFAR-10 training images; see tools/datasets.py). The Hessian covers the quantizable
   weights only, as in the pipeline. ResNet-32 runs fewer samples and the time is scaled to 1,000
   (the estimators' cost is linear in the samples). Building the gradient graphs is a one-off
   cost, shown apart.
2. LeNet-5 top-1 accuracy on the 10,000 MNIST test images after Hessian-weighted k-means with one
   codebook for all layers (k = 8, 16, 32), for each estimator; mean over ``--seeds`` k-means seeds.

Timings are wall-clock; on a shared machine run with ``--threads 1`` (the default): onnxruntime's
thread pool spin-waits, so with other processes on the cores two threads can be several times
slower than one.

Prints a markdown report (date, machine, command), and writes it to ``--out`` if given.
``--smoke``: 32 images of the bundled sample for LeNet-5, 16 random images through a ResNet-20
with random weights, one seed, k = 8.
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

from onnxhq import hessian
from onnxhq.data import Dataset
from onnxhq.evaluate import accuracy
from onnxhq.model import load_model, quantizable_weights, read_initializers, replace_initializers
from onnxhq.options import HESSIAN_METHODS
from onnxhq.quantize import quantize_weights
from onnxhq.training.engine import GradientEngine, ProjectionEngine
from tools import datasets

METHODS = HESSIAN_METHODS  # the table's rows, in this order


def time_estimators(
    model,
    data: Dataset,
    samples: dict[str, int],
    *,
    threads: int,
    adam_state=None,
    batch_size: int = 16,
) -> dict:
    """Seconds per 1,000 samples per method, the one-off build times, and the estimates."""
    names = [w.name for w in quantizable_weights(model)]
    t0 = time.perf_counter()
    engine = GradientEngine(model, params=names, threads=threads)
    build_ce = time.perf_counter() - t0
    t0 = time.perf_counter()
    view = ProjectionEngine(model, params=names, threads=threads)
    build_gn = time.perf_counter() - t0
    shapes = {n: engine.values[n].shape for n in names}
    bs = batch_size
    runs = {
        "fisher": lambda n: hessian.fisher(engine, data, samples=n, batch_size=bs),
        "empirical-fisher": lambda n: hessian.empirical_fisher(engine, data, samples=n),
        "hutchinson": lambda n: hessian.hutchinson(engine, data, samples=n, batch_size=bs),
        "gauss-newton": lambda n: hessian.gauss_newton(view, data, samples=n, batch_size=bs),
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
        log(f"  {method}: {n} samples in {seconds:.2f} s ({cpu:.2f} s CPU)")
    return {
        "build": (build_ce, build_gn),
        "timings": timings,
        "estimates": estimates,
        "names": names,
    }


def quantized_accuracy(
    model, weights: dict, importances, test: Dataset, *, k: int, seed: int
) -> float:
    result = quantize_weights(
        weights, importances, scope="network", method="hkmeans", k=k, seed=seed
    )
    return accuracy(replace_initializers(model, result.dequantize_all()), test)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=datasets.REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lenet-samples", type=int, default=1000)
    ap.add_argument(
        "--resnet-samples", type=int, default=128, help="per method (empirical-fisher: a quarter)"
    )
    ap.add_argument("--seeds", type=int, default=3, help="k-means seeds per accuracy cell")
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads for the estimators (0: onnxruntime chooses)",
    )
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--smoke", action="store_true", help="seconds on the bundled sample")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lenet_samples, args.resnet_samples, args.seeds, args.ks = 32, 16, 1, [8]
    started = time.perf_counter()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# Hessian estimators: cost and effect on quantization",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}",
        f"- commit: {commit()} (working tree)",
        f"- command: `python -m tools.bench_hessian {' '.join(sys.argv[1:])}`",
        f"- onnxruntime threads for the estimators: {args.threads or 'onnxruntime default'}; "
        f"load average at start {load}",
        "",
    ]

    log("LeNet-5")
    model = load_model(datasets.LENET5)
    lenet_run = time_estimators(
        model,
        datasets.mnist("train", limit=10_000, smoke=args.smoke),
        {"default": args.lenet_samples},
        threads=args.threads,
        adam_state=datasets.LENET5_ADAM,
    )
    resnet_run = None
    if not args.skip_resnet:
        log("ResNet-32 (BatchNorm folded)")
        resnet = datasets.resnet(32, fold_batchnorm=True, smoke=args.smoke)
        n = args.resnet_samples
        resnet_run = time_estimators(
            resnet,
            datasets.cifar10("train", limit=2_000, smoke=args.smoke),
            {"default": n, "empirical-fisher": max(n // 4, 16)},
            threads=args.threads,
        )
    lines += cost_table(lenet_run, resnet_run, args)

    log("LeNet-5 quantization")
    test = datasets.mnist("test", smoke=args.smoke)
    names = lenet_run["names"]
    weights = {n: w.astype(np.float32) for n, w in read_initializers(model, names).items()}
    lines += accuracy_table(model, weights, lenet_run["estimates"], test, args)
    lines += ["", f"Total bench time {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


def cost_table(lenet_run: dict, resnet_run: dict | None, args) -> list[str]:
    out = [
        "## Cost: seconds per 1,000 samples, wall (CPU) (quantizable weights only, batch 16 "
        "where batched)",
        "",
        "| method | LeNet-5 s / 1,000 | LeNet-5 measured | ResNet-32 s / 1,000 "
        "| ResNet-32 measured |",
        "|---|---|---|---|---|",
    ]
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
    build = f"LeNet-5 {lenet_run['build'][0]:.2f} s + {lenet_run['build'][1]:.2f} s"
    if resnet_run is not None:
        build += f"; ResNet-32 {resnet_run['build'][0]:.2f} s + {resnet_run['build'][1]:.2f} s"
    resnet = "ResNet-32 was skipped."
    if resnet_run is not None:
        n = args.resnet_samples
        resnet = (
            f"ResNet-32 used {n} (empirical-fisher {max(n // 4, 16)}) of the first 2,000 CIFAR-10 "
            "training images, scaled linearly to 1,000."
        )
    out += [
        "",
        "One-off graph building (cross-entropy gradient graph; projection graph for "
        f"gauss-newton): {build}.",
        f"LeNet-5 used {args.lenet_samples} samples per method from the first 10,000 MNIST "
        f"training images; {resnet}",
        "empirical-fisher takes one gradient per sample; fisher and gauss-newton one per batch; "
        "hutchinson two per batch (central differences).",
        "",
    ]
    return out


def accuracy_table(model, weights: dict, estimates: dict, test: Dataset, args) -> list[str]:
    base = accuracy(model, test)
    out = [
        "## LeNet-5: MNIST test accuracy after quantization (one codebook for all layers, hkmeans)",
        "",
        f"Float model: {base:.2%}. Mean over {args.seeds} k-means seeds (min-max in brackets).",
        "",
        "| Hessian | " + " | ".join(f"k = {k}" for k in args.ks) + " |",
        "|---|" + "---|" * len(args.ks),
    ]
    for method in ("none", *(m for m in METHODS if m in estimates)):
        importances = None if method == "none" else estimates[method]
        cells = []
        for k in args.ks:
            accs = [
                quantized_accuracy(model, weights, importances, test, k=k, seed=s)
                for s in range(args.seeds)
            ]
            cells.append(f"{np.mean(accs):.2%} [{min(accs):.2%}-{max(accs):.2%}]")
            log(f"  {method} k={k}: {cells[-1]}")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
