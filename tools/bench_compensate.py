"""Error-compensated assignment (``compress --compensate``) against plain rounding, same settings.

    python -m tools.bench_compensate [--nets lenet5 resnet32 rec] [--rates 3 4]
                                     [--scopes network layer] [--method uniform]
                                     [--calib 2000] [--eval-limit N] [--prune 0.5]
                                     [--out FILE.md] [--smoke]

For each net, the importances (Fisher, 1,000 samples) and the layer input statistics
(`onnxhq.layer_inputs`, 1,024 samples) are computed once from ``--calib`` training samples; then
every (scope, target bits) is compressed twice, with and without compensation (which includes
the bias correction of `onnxhq.biascorrect`), and evaluated on
the test set (all of it unless ``--eval-limit``): coded bits per weight, compression ratio (every
byte of graph + sidecar), top-1 accuracy. No retraining, no fine-tuning. ``--prune S`` adds
one-shot pruning to sparsity S (per layer, no retraining) by magnitude and by ``obs``
(SparseGPT, `onnxhq.prune.obs_prune`), with the pruned models' accuracies, and quantizes the
obs-pruned model at every (scope, rate) with and without compensation (pruned weights keep the
0.0 codeword; importances and layer statistics gathered again on the pruned model).

Nets: ``lenet5`` (``models/lenet5_mnist.onnx``, MNIST from ``$ONNXHQ_SHARED``), ``resnet32``
(``$ONNXHQ_SHARED/models/resnet32_cifar10.npz``, BatchNorm folded, CIFAR-10) and ``rec`` (the
PaddleOCR recognizer of `tools.bench_real`; its accuracy column is the share of decoded strings
identical to the float model's, see `bench_rec`; ``--prune`` does not apply to it). ``--smoke``: the
bundled MNIST sample for LeNet-5 and a random-weight ResNet-20 on 64 random images, one rate and
scope, pruning to 0.5: a shape-only run, its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from onnxhq.evaluate import accuracy
from onnxhq.importances import estimate_importances
from onnxhq.layer_inputs import SAMPLES, gather_layer_hessians
from onnxhq.model import load_model
from onnxhq.options import CompressOptions
from onnxhq.pipeline import compress_with
from onnxhq.prune import prune_model, sparsity_of
from tools import datasets

LENET = Path(__file__).resolve().parent.parent / "models" / "lenet5_mnist.onnx"


def load_net(name: str, *, calib: int, eval_limit: int | None, smoke: bool):
    """(model, calibration data, test data)."""
    if name == "lenet5":
        model = load_model(LENET)
        train = datasets.mnist("train", limit=calib, smoke=smoke)
        test = datasets.mnist("test", limit=eval_limit, smoke=smoke)
    elif name == "resnet32":
        model = datasets.resnet(32, smoke=smoke)
        train = datasets.cifar10("train", limit=calib, smoke=smoke)
        test = datasets.cifar10("test", limit=eval_limit, smoke=smoke)
    else:
        raise SystemExit(f"unknown net {name!r}; choose lenet5 or resnet32")
    return model, train, test


def bench_net(name: str, args) -> list[str]:
    """Markdown rows of one net."""
    model, train, test = load_net(
        name, calib=args.calib, eval_limit=args.eval_limit, smoke=args.smoke
    )
    base = CompressOptions.from_keywords(
        method=args.method, target_bits=args.rates[0], hessian_samples=args.hessian_samples
    )
    t0 = time.perf_counter()
    importances = estimate_importances(model, train, base, None)
    t1 = time.perf_counter()
    layers = gather_layer_hessians(model, train, base)
    t2 = time.perf_counter()
    float_acc = accuracy(model, test)
    print(f"{name}: float {float_acc:.4f}; importances {t1 - t0:.0f} s, layer inputs "
          f"{t2 - t1:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    rows = [f"| {name} | float | | | | | {100 * float_acc:.2f} % | |"]
    obs = None
    for criterion in ("magnitude", "obs") if args.prune is not None else ():
        start = time.perf_counter()
        pruned, masks = prune_model(model, train, sparsity=args.prune, criterion=criterion,
                                    scope="layer", steps=1, retrain_epochs=0,
                                    hessian_samples=SAMPLES)  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append(f"| {name} | pruned {100 * sparsity_of(masks):.0f} %, {criterion} | | | | | "
                    f"{100 * accuracy(pruned, test):.2f} % | {seconds:.0f} s |")  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
        obs = pruned if criterion == "obs" else obs
    rows += quantized_rows(name, model, importances, layers, test, args)
    if obs is not None:  # the obs-pruned model quantized the same ways (its own statistics)
        label = f"{name} pruned {100 * args.prune:g} % obs"
        importances = estimate_importances(obs, train, base, None)
        layers = gather_layer_hessians(obs, train, base)
        rows += quantized_rows(label, obs, importances, layers, test, args)
    return rows


def quantized_rows(label: str, model, importances, layers, test, args) -> list[str]:
    """Every (scope, rate) with and without compensation on ``model``, as markdown rows."""
    rows = []
    for scope in args.scopes:
        for rate in args.rates:
            for comp in (False, True):
                options = CompressOptions.from_keywords(
                    method=args.method, target_bits=rate, scope=scope, compensate=comp,
                    hessian_samples=args.hessian_samples, name=label.split()[0],
                )  # fmt: skip
                start = time.perf_counter()
                result = compress_with(
                    model, model, options, importances, layer_hessians=layers if comp else None
                )
                seconds = time.perf_counter() - start
                acc = accuracy(result.model(), test)
                r = result.report
                rows.append(
                    f"| {label} | {scope} | {rate:g} | {'yes' if comp else 'no'} | "
                    f"{r.bits_per_weight:.3f} | {r.compression_ratio:.2f}x | {100 * acc:.2f} % | "
                    f"{seconds:.0f} s |"
                )
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bench_rec(args) -> list[str]:
    """Rows of the OCR recognizer (``$ONNXHQ_SHARED/models/real``): per scope and rate, with and
    without compensation; the accuracy column is the share of greedy-CTC strings identical to
    the float model's on `tools.bench_real`'s 48 rendered lines (calibration: 64 other lines).
    No Hessian (``hessian="none"``), as `tools.bench_real`."""
    import onnxhq
    from onnxhq.fidelity import measure
    from tools.bench_real import KINDS, run
    from tools.render_text import line_batch

    path = str(datasets.shared_file("models", "real", "ch_PP-OCRv4_rec_infer.onnx"))
    feeds = {"x": line_batch(48, width=320, seed=0)[0]}
    calib = {"x": line_batch(64, width=320, seed=1)[0]}
    original = run(path, feeds)
    rows = ["| rec | float | | | | | (reference) | |"]
    for scope in args.scopes:
        for rate in args.rates:
            for comp in (False, True):
                start = time.perf_counter()
                result = onnxhq.compress(path, calib, hessian="none", scope=scope,
                                         target_bits=rate, compensate=comp)  # fmt: skip
                seconds = time.perf_counter() - start
                got = measure(KINDS["rec"], original, run(result.model(), feeds))
                r = result.report
                rows.append(
                    f"| rec | {scope} | {rate:g} | {'yes' if comp else 'no'} | "
                    f"{r.bits_per_weight:.3f} | {r.compression_ratio:.2f}x | "
                    f"{100 * got['sequence']:.1f} % same strings | {seconds:.0f} s |"
                )
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=["lenet5", "resnet32"])
    p.add_argument("--rates", nargs="+", type=float, default=[3.0, 4.0])
    p.add_argument("--scopes", nargs="+", default=["network", "layer"])
    p.add_argument("--method", default="uniform")
    p.add_argument("--calib", type=int, default=2000, help="training samples for the statistics")
    p.add_argument("--hessian-samples", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test samples only")
    p.add_argument("--prune", type=float, help="also prune one-shot to this sparsity")
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates, args.scopes, args.calib, args.hessian_samples = [3.0], ["layer"], 64, 32
        args.prune = 0.5
    started = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# bench_compensate, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Command: "
        f"`python -m tools.bench_compensate {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Method {args.method}, target bits per weight per codebook, {args.calib} calibration "
        f"samples, test set {'first ' + str(args.eval_limit) if args.eval_limit else 'all'}; "
        "no retraining, no fine-tuning.",
        "",
        "| net | scope | bits | compensate | bits/weight | ratio | accuracy | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.nets:
        lines += bench_rec(args) if name == "rec" else bench_net(name, args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
