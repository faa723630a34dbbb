"""Session costs shared by `tools.bench_real`, `tools.bench_encoder` and `tools.deploy_forms`:
start seconds and peak memory growth of an onnxruntime session in a fresh process, latency of
sessions taking turns in this process, and the table cells that show them against a baseline.

All sessions are CPU, one intra-op thread, log severity 3. Memory is ``VmHWM`` growth in MB
(1024 kB) over the child's peak before the session starts.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The child a `session_costs` measure runs (``python -c``; arguments: model, feed, pair flag).
_CHILD = (
    "import sys; from tools.session_cost import probe; probe(*sys.argv[1:3], sys.argv[3] == '1')"
)


def peak_kb() -> int:
    """This process's peak resident memory in kB: ``VmHWM`` of /proc/self/status (ru_maxrss
    would carry over a large parent's peak through fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_session(path: str | Path) -> Any:
    """An onnxruntime CPU session on ``path``: one intra-op thread, warnings off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def probe(path: str, feed: str, pair: bool = False) -> None:
    """Child process: start a session on ``path`` (``onnxhq.InferenceSession`` on a compressed
    pair with ``pair``), run one input, print ``[start s, MB after start, MB after run]``.

    ``feed``: a ``.npz`` file (the first row of each array, by input name; loaded before the
    measure) or a shape ``"d0,d1,..."`` (float32 zeros on the first input)."""
    import onnxruntime  # noqa: F401  (first, as before the move: the import order shifts VmHWM)

    if pair:  # the modules decode needs (onnx: ~25 MB, ~0.5 s) load before the measure
        import onnxhq
        import onnxhq.decode
    feeds = None
    if feed.endswith(".npz"):
        with np.load(feed, allow_pickle=False) as z:
            feeds = {k: z[k][:1] for k in z.files}

    before = peak_kb()
    t = time.perf_counter()
    session = onnxhq.InferenceSession(path, threads=1) if pair else cpu_session(path)
    start = time.perf_counter() - t
    peak = peak_kb()
    if feeds is None:
        x = np.zeros([int(d) for d in feed.split(",")], np.float32)
        feeds = {session.get_inputs()[0].name: x}
    session.run(None, feeds)
    print(json.dumps([start, (peak - before) / 1024, (peak_kb() - before) / 1024]))


def session_costs(path: Path | str, feed: Path | tuple[int, ...], repeats: int,
                  pair: bool = False) -> dict[str, float]:  # fmt: skip
    """Median ``start_s``, ``start_mb`` and ``run_mb`` of `probe` over ``repeats`` fresh
    processes; ``feed`` a ``.npz`` path or an input shape."""
    arg = str(feed) if isinstance(feed, (str, Path)) else ",".join(str(d) for d in feed)
    cmd = [sys.executable, "-c", _CHILD, str(path), arg, "1" if pair else "0"]
    runs = [json.loads(subprocess.check_output(cmd, text=True)) for _ in range(repeats)]
    med = [statistics.median(r[i] for r in runs) for i in range(3)]
    return {"start_s": med[0], "start_mb": med[1], "run_mb": med[2]}


def latencies(paths: dict[str, Path], feed: np.ndarray | dict[str, np.ndarray],
              rounds: int) -> dict[str, float]:  # fmt: skip
    """Median seconds per run of ``feed`` (an array for the first input, or inputs by name) for
    each model, sessions in this process, the models taking turns so that load on the machine
    falls on all alike; the first round is a warm-up and is left out."""
    sessions = {k: cpu_session(p) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds + 1):
        for k, s in sessions.items():
            run = feed if isinstance(feed, dict) else {s.get_inputs()[0].name: feed}
            t = time.perf_counter()
            s.run(None, run)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def cost_cells(row: dict, base: dict, mb_digits: int = 1) -> list[str]:
    """Table cells ``start s``, ``start MB``, ``run MB`` of ``row``, each against ``base``
    (start as a ratio, MB as a difference, MB with ``mb_digits`` decimals)."""
    d = mb_digits
    return [
        f"{row['start_s']:.3f} ({row['start_s'] / base['start_s']:.2f}x)",
        f"{row['start_mb']:.{d}f} ({row['start_mb'] - base['start_mb']:+.{d}f})",
        f"{row['run_mb']:.{d}f} ({row['run_mb'] - base['run_mb']:+.{d}f})",
    ]


def ratio_cell(value: float, base: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals and its ratio to ``base``: ``"1.23 (0.98x)"``."""
    return f"{value:.{digits}f} ({value / base:.2f}x)"
