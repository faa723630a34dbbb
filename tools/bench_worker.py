"""The gradient worker's overhead: gradients through the worker process against the same
gradients built and run in-process, on LeNet-5 and ResNet-32.

    python -m tools.bench_worker [--reps 30] [--out FILE.md] [--skip-resnet] [--smoke]

For each model, over its quantizable weights (as the Hessian estimators take them), with one
onnxruntime thread: the seconds to build the gradient session (``GradientEngine``; the worker's
start-up is timed apart, once), and the milliseconds per ``loss_and_gradients`` call for a batch
(64 MNIST images for LeNet-5, 32 CIFAR-sized inputs for ResNet-32) and for a single sample (what
the empirical Fisher runs). Parameters are the same every call, as in the estimators, so the
worker is sent each batch but not the weights again; the gradients come back every call.

The in-process side needs an interpreter whose onnxruntime is onnxruntime-training: the one the
worker uses (``$ONNXHQ_TRAINING_PYTHON``, this one, or the ``onnxhq setup-training`` cache), run
on this checkout with ``ONNXHQ_TRAINING_INPROCESS=1``. Both sides run the same engine code; their
gradients are compared (max relative difference). LeNet-5 is ``models/lenet5_mnist.onnx`` with
the bundled MNIST sample, ResNet-32 ``$ONNXHQ_SHARED/models/resnet32_cifar10.npz`` (BatchNorm
folded; skipped with a note when absent) on random inputs: timings do not depend on the values.
``--smoke``: 3 repetitions, ResNet-20 with random weights.

Prints a markdown report (date, machine, command), and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tools.bench_hessian import machine

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"LeNet-5": 64, "ResNet-32": 32, "ResNet-20 (random)": 32}


def load(name: str, smoke: bool):
    """(model, inputs (N, ...) float32, labels (N,) int64) for model ``name``."""
    from onnxhq.model import load_model

    if name == "LeNet-5":
        with np.load(ROOT / "models" / "mnist_sample.npz") as z:
            x, y = z["input"][:64].astype(np.float32), z["labels"][:64].astype(np.int64)
        return load_model(ROOT / "models" / "lenet5_mnist.onnx"), x, y
    from tools import datasets

    model = datasets.resnet(32, smoke=smoke)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 32, 32)).astype(np.float32)
    return model, x, rng.integers(0, 10, 32).astype(np.int64)


def measure(name: str, reps: int, smoke: bool) -> dict:
    """Build time, ms per batch and per sample, and the gradients of one batch, in this process's
    gradient mode (worker, or in-process with ONNXHQ_TRAINING_INPROCESS=1)."""
    from onnxhq.model import quantizable_weights
    from onnxhq.training import worker
    from onnxhq.training.engine import GradientEngine, in_process

    model, x, y = load(name, smoke)
    names = [w.name for w in quantizable_weights(model)]
    start = 0.0
    if not in_process():
        t0 = time.perf_counter()
        worker.shared_worker()
        start = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = GradientEngine(model, params=names, threads=1)
    build = time.perf_counter() - t0
    key = next(iter(engine._forward_session.get_inputs())).name
    result = {
        "start_s": start,
        "build_s": build,
        "params": sum(engine.values[n].size for n in names),
    }
    for label, n in (("batch_ms", len(x)), ("sample_ms", 1)):
        engine.loss_and_gradients({key: x[:n]}, y[:n])  # warm-up
        times = []
        for i in range(reps):
            j = i % (len(x) - n + 1)
            t0 = time.perf_counter()
            engine.loss_and_gradients({key: x[j : j + n]}, y[j : j + n])
            times.append(time.perf_counter() - t0)
        result[label] = 1e3 * float(np.median(times))
    _, grads = engine.loss_and_gradients({key: x}, y)
    result["grads"] = {k: v.tolist() for k, v in grads.items()}
    return result


def in_process_run(name: str, reps: int, smoke: bool) -> dict | None:
    """`measure` in the training interpreter with ONNXHQ_TRAINING_INPROCESS=1 (None: no such)."""
    from onnxhq.training import worker

    python = worker.find_training_python()
    if python is None:
        return None
    env = {**os.environ, "ONNXHQ_TRAINING_INPROCESS": "1", "PYTHONPATH": str(ROOT)}
    argv = [python, "-m", "tools.bench_worker", "--measure", name, "--reps", str(reps)]
    done = subprocess.run(
        argv + (["--smoke"] if smoke else []), env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"in-process run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="timed calls per figure (median)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 calls, a random ResNet-20")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one model, JSON out: the child's part
    args = ap.parse_args(argv)
    reps = 3 if args.smoke else args.reps
    if args.measure:
        print(json.dumps(measure(args.measure, reps, args.smoke)))
        return 0
    from onnxhq.training import worker

    shown = sys.argv[1:] if argv is None else argv
    names = ["LeNet-5"]
    if not args.skip_resnet:
        names.append("ResNet-20 (random)" if args.smoke else "ResNet-32")
    lines = [
        "# Gradient worker overhead (tools/bench_worker.py)",
        "",
        f"- date: {datetime.date.today()}; machine: {machine()}",
        f"- command: python -m tools.bench_worker {' '.join(shown)}",
        f"- worker python: {worker.find_training_python()}; one onnxruntime thread; median of "
        f"{reps} calls",
        "",
        "| model | params | batch | path | start s | build s | ms/batch | ms/sample | rel diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        try:
            remote = measure(name, reps, args.smoke)
        except SystemExit as exc:  # the shared models are optional: tools.datasets says why
            lines.append(f"| {name} | skipped: {exc} | | | | | | | |")
            continue
        local = in_process_run(name, reps, args.smoke)
        rows = [("worker", remote, "")]
        if local is not None:
            rows.append(
                ("in-process", local, f"{max_rel_diff(remote['grads'], local['grads']):.1e}")
            )
        for path, r, diff in rows:
            lines.append(
                f"| {name} | {r['params']:,} | {BATCH[name]} | {path} | {r['start_s']:.2f} | "
                f"{r['build_s']:.2f} | {r['batch_ms']:.1f} | {r['sample_ms']:.2f} | {diff} |"
            )
        if local is not None:
            lines.append(
                f"| {name} | | | worker / in-process | | "
                f"{remote['build_s'] / local['build_s']:.1f}x | "
                f"{remote['batch_ms'] / local['batch_ms']:.2f}x | "
                f"{remote['sample_ms'] / local['sample_ms']:.1f}x | |"
            )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
