"""Benchmark onnxhq's quantizers: Lloyd vs scikit-learn, the exact DP, 61M weights, rate-distortion.

    python -m tools.bench_quantize [--big 61000000] [--repeat 5] [--seed 0] [--out FILE]
                                   [--skip-big] [--smoke]

1. Hessian-weighted k-means at LeNet-5 (431,080) and ResNet-32 (464,154) size: Laplacian float32
   weights, lognormal importances, k = 16, 32, 64. onnxhq ``quantize(method="hkmeans")`` (best of
   ``--repeat``, half before and half after scikit-learn's run, so that one burst of load on a
   shared machine does not decide it; the first two calls in a process also fault in fresh memory
   pages, which on a VM costs about as much as the work) against
   ``sklearn.cluster.KMeans(n_clusters=k, n_init=1).fit(w[:, None], sample_weight=h)`` (default
   lloyd algorithm and tolerance; how sensitivity-weighted k-means in the SqueezeLLM style is
   usually run; one run), and ``exact=True``. Objectives are ``sum h (w - c)^2`` recomputed in
   float64 from each result's centers and labels.
2. ``--big`` weights (default 61M, AlexNet's size) at k = 32, in a subprocess: wall time and peak
   resident memory (``ru_maxrss``) of the whole child, and before the call (inputs alone).
3. At about 4 and 2 bits/weight of entropy: distortion of uniform, hkmeans and ECSQ (iterative and
   exact) on the ResNet-32-size weights, via ``target_bits``.

Prints markdown (and writes it to ``--out``). The machine may be shared: the load average is shown.
``--smoke``: 20,000 weights, k = 16, one repeat, 200,000 weights in the subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from onnxhq.quantize import quantize
from tools.datasets import REPO

SIZES = {"lenet5": 431_080, "resnet32": 464_154}
KS = (16, 32, 64)
SMOKE_SIZES = {"small": 20_000}
SMOKE_KS = (16,)


def synthetic(n: int, seed: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Laplacian weights (scale 0.05) and lognormal importances, float32, made chunk by chunk."""
    rng = np.random.default_rng(seed)
    w, h = np.empty(n, np.float32), np.empty(n, np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        w[s:e] = rng.laplace(scale=0.05, size=e - s)
        h[s:e] = rng.lognormal(size=e - s)
    return w, h


def objective(w, h, centers, labels) -> float:
    return float(
        np.dot(
            h.astype(np.float64),
            (w.astype(np.float64) - np.asarray(centers, np.float64)[labels]) ** 2,
        )
    )


def timed(repeat: int, fn, *args, **kwargs):
    """Best wall time of ``repeat`` calls, and the last result."""
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t)
    return best, out


def versus_sklearn(
    seed: int, repeat: int, sizes: dict[str, int] = SIZES, ks: tuple[int, ...] = KS
) -> list[str]:
    from sklearn.cluster import KMeans

    rows = [
        "| weights | k | onnxhq Lloyd s | scikit-learn s | speed-up | onnxhq objective "
        "| scikit-learn objective | onnxhq / sklearn | exact DP objective | exact DP s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n in sizes.items():
        w, h = synthetic(n, seed)
        for k in ks:
            t_ours, q = timed((repeat + 1) // 2, quantize, w, h, method="hkmeans", k=k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(
                    w[:, None], sample_weight=h
                )
                t_sk = time.perf_counter() - t0
            t_ours = min(t_ours, timed(repeat // 2, quantize, w, h, method="hkmeans", k=k)[0])
            t_dp, qx = timed(1, quantize, w, h, method="hkmeans", k=k, exact=True)
            ours = objective(w, h, q.codebook, q.indices)
            theirs = objective(w, h, km.cluster_centers_[:, 0], km.labels_)
            best = objective(w, h, qx.codebook, qx.indices)
            rows.append(
                f"| {name} ({n:,}) | {k} | {t_ours:.3f} | {t_sk:.2f} | {t_sk / t_ours:.0f}x "
                f"| {ours:.5f} | {theirs:.5f} | {ours / theirs:.4f} | {best:.5f} | {t_dp:.2f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


CHILD = """
import resource, time
from tools.bench_quantize import synthetic
from onnxhq.quantize import quantize
w, h = synthetic({n}, {seed})
before = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024
t = time.perf_counter()
q = quantize(w, h, method='hkmeans', k=32)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(dt, before, peak, q.distortion, q.entropy_bits, len(q.codebook))
"""


def big(n: int, seed: int) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(n=n, seed=seed)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    dt, before, peak, dist, bits, k = out.stdout.split()
    return [
        "| weights | k | time s | peak RSS MiB (whole process) "
        "| RSS before the call MiB (inputs) | objective | entropy bits |",
        "|---|---|---|---|---|---|---|",
        f"| {int(n):,} float32 | {k} | {float(dt):.1f} | {float(peak):.0f} | {float(before):.0f} | "
        f"{float(dist):.2f} | {float(bits):.3f} |",
    ]


def rate_distortion(seed: int, n: int = SIZES["resnet32"]) -> list[str]:
    w, h = synthetic(n, seed + 1)
    rows = [
        "| target bits | method | entropy bits | distortion | vs uniform | codewords | time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in (4.0, 2.0):
        base = None
        for label, kwargs in (
            ("uniform", {"method": "uniform"}),
            ("hkmeans", {"method": "hkmeans"}),
            ("ecsq", {"method": "ecsq"}),
            ("ecsq exact", {"method": "ecsq", "exact": True}),
        ):
            t, q = timed(1, quantize, w, h, target_bits=target, **kwargs)
            base = q.distortion if base is None else base
            rows.append(
                f"| {target:g} | {label} | {q.entropy_bits:.3f} | {q.distortion:.3f} | "
                f"{q.distortion / base:.3f} | {q.codebook.size} | {t:.2f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("numpy", "scikit-learn"))
    python = f"Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {python}, {versions}; load average {load}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--big", type=int, default=61_000_000, help="weights in the large run (default 61M)"
    )
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="onnxhq runs per timing (best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--smoke", action="store_true", help="seconds: small sizes, one repeat")
    args = ap.parse_args(argv)
    sizes, ks, rd_n = SIZES, KS, SIZES["resnet32"]
    if args.smoke:
        sizes, ks, rd_n = SMOKE_SIZES, SMOKE_KS, SMOKE_SIZES["small"]
        args.repeat, args.big = 1, 200_000
    start = time.perf_counter()
    lines = [
        "# onnxhq quantize benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- command: `python -m tools.bench_quantize {' '.join(sys.argv[1:])}`",
        "",
        "## Hessian-weighted k-means: onnxhq vs scikit-learn KMeans(sample_weight=h, n_init=1)",
        "",
        "Laplacian float32 weights (scale 0.05), lognormal importances. Times are wall seconds.",
        "",
    ]
    lines += versus_sklearn(args.seed, args.repeat, sizes, ks)
    if not args.skip_big:
        lines += ["", f"## {args.big:,} weights, k = 32 (onnxhq alone, in a subprocess)", ""]
        lines += big(args.big, args.seed)
    lines += ["", "## Rate-distortion at a target entropy (ResNet-32 size, Laplacian weights)", ""]
    lines += rate_distortion(args.seed, rd_n)
    lines += [
        "",
        f"Total benchmark time: {time.perf_counter() - start:.0f} s; load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
