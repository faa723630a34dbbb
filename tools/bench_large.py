"""Time and peak memory of compress and decode on large synthetic models (issue 14, item 4).

Chain models ``x[N, 4096] -> MatMul W0 -> ... -> MatMul Wk`` (float32 4096x4096 weights of
64 MiB, all in one external data file) of about 0.5, 1 and 3 GiB are written under
``--scratch/onnxhq_bench_large`` (default /tmp), with a tiny ``--data`` file for the forward-only
Hessian. Each measurement runs the CLI in a child process (``onnxhq compress --hessian none``,
``--hessian activations``, ``onnxhq decode``) and records its wall time and peak RSS
(``resource.getrusage(RUSAGE_CHILDREN)`` of a fresh ``python -c`` runner per command), and MB/s
of float weights. Results go to a JSON file (``--results``); a measurement already there is
skipped, so an interrupted run resumes.

    python -m tools.bench_large --sizes 0.5 1 3
    python -m tools.bench_large --smoke      # one tiny model, seconds

SAFETY: the 3 GiB case runs only after the 1 GiB compress peaked at <= 3 GiB; run the whole
tool under ``ulimit -v 12000000`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIDE = 4096
LAYER_BYTES = SIDE * SIDE * 4
GIB = 2**30
#: Peak RSS of the 1 GiB compress under which the 3 GiB case may run.
SAFE_PEAK_FOR_3 = 3 * GIB

#: Runs a command as a child and prints its wall time and the children's peak RSS (bytes).
_RUNNER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss": peak}))
"""


def make_chain(folder: Path, layers: int, side: int = SIDE, seed: int = 0) -> Path:
    """A chain of ``layers`` MatMuls of ``side x side`` float32 weights, one external data file,
    written tensor by tensor (the generator never holds more than one weight)."""
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"chain{layers}x{side}.onnx"
    if path.exists():
        return path
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((side, side), dtype=np.float32) / np.sqrt(side)).astype(
                np.float32
            )
            f.write(w.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", w.nbytes)):
                t.external_data.add(key=key, value=str(value))
            offset += w.nbytes
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"W{i}"],
                                          [f"h{i + 1}" if i < layers - 1 else "y"]))  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", side])
    graph = helper.make_graph(nodes, "chain", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    np.savez(folder / "data.npz", x=rng.standard_normal((8, side), dtype=np.float32))
    return path


def measure(command: list[str]) -> dict:
    """Wall time and peak RSS of ``command`` run as a grandchild of a fresh runner process."""
    out = subprocess.run([sys.executable, "-c", _RUNNER, *command], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"runner failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(path: Path, scratch: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "onnxhq", "--quiet"]
    stem = path.stem
    out = {h: scratch / f"{stem}_{h}" for h in ("none", "activations")}
    return {
        "compress_none": [*cli, "compress", str(path), "--hessian", "none", "-o", str(out["none"])],
        "compress_activations": [
            *cli,
            "compress",
            str(path),
            "--hessian",
            "activations",
            "--data",
            str(path.parent / "data.npz"),
            "--samples",
            "8",
            "-o",
            str(out["activations"]),
        ],
        "decode": [
            *cli,
            "decode",
            str(out["none"] / f"{stem}.onnx"),
            "-o",
            str(scratch / f"{stem}_decoded.onnx"),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[0.5, 1.0, 3.0], help="GiB")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp"), help="folder for the models")
    ap.add_argument("--results", type=Path, default=None, help="JSON results (resumable)")
    ap.add_argument("--only", nargs="*", default=None, help="measure only these cases")
    ap.add_argument("--smoke", action="store_true", help="one tiny model (2 layers of 256)")
    args = ap.parse_args(argv)
    scratch = args.scratch / "onnxhq_bench_large"
    results_path = args.results or scratch / ("smoke.json" if args.smoke else "results.json")
    scratch.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    sizes = [("smoke", 2, 256)] if args.smoke else [
        (f"{s:g}GiB", max(1, round(s * GIB / LAYER_BYTES)), SIDE) for s in args.sizes
    ]  # fmt: skip
    for label, layers, side in sizes:
        if label == "3GiB":
            peak = results.get("1GiB", {}).get("compress_none", {}).get("peak_rss")
            if peak is None or peak > SAFE_PEAK_FOR_3:
                print(f"skip {label}: the 1 GiB compress peak ({peak}) is unknown or > 3 GiB")
                continue
        folder = scratch / (f"smoke{side}" if args.smoke else f"chain{layers}")
        t = time.perf_counter()
        path = make_chain(folder, layers, side)
        weight_bytes = layers * side * side * 4
        print(f"{label}: {layers} x {side}^2 float32 = {weight_bytes / 1e6:,.0f} MB "
              f"(made in {time.perf_counter() - t:.1f} s)")  # fmt: skip
        done = results.setdefault(label, {"weight_bytes": weight_bytes, "layers": layers})
        for name, command in cases(path, scratch).items():
            if (args.only is not None and name not in args.only) or name in done:
                continue
            r = measure(command)
            r["mb_per_s"] = weight_bytes / 1e6 / r["wall_s"]
            r["command"] = " ".join(command[1:])
            done[name] = r
            results_path.write_text(json.dumps(results, indent=1))
            print(f"  {name:22s} rc={r['rc']} {r['wall_s']:7.1f} s  peak "
                  f"{r['peak_rss'] / GIB:5.2f} GiB  {r['mb_per_s']:6.1f} MB/s")  # fmt: skip
            if r["rc"] != 0:
                return 1
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
