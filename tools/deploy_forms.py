"""The forms a compressed model runs in, side by side: session start, peak session memory, file
size and latency of the float model, the decoded files (each ``decode --target``) and
``onnxhq.InferenceSession`` on the compressed pair.

    python -m tools.deploy_forms [--models lenet5 resnet32 rec det cls] [--repeats 3]

Each model is compressed with ``--cell-value grid --scope layer --hessian none`` at ``--bits 8``
(256 grid cells per layer: decoded to ``gather`` and ``int8``) and ``--bits 4`` (16 cells:
``gather``, ``gather-unpacked`` and ``int4``); each other form is compared with the gather form
of its grid. Session costs are measured in a fresh child process per run (start seconds;
``VmHWM`` growth in MB after the session starts and after one run on one input), the median of
``--repeats``; latency is the median of ``--rounds`` single-input runs, every form's session in
this process taking turns.
`native_forms` gives `tools.bench_real` the same decoded files for its table.

    python -m tools.deploy_forms --lowbit [--models rec lenet5] [--hessian fisher]

compares instead the float model with ``onnxhq lowbit`` files (`LOWBIT_FORMS`: MatMul / Gemm
weights as MatMulNBits, embedding tables as GatherBlockQuantized, straight from the float model;
other weights stay float) by fidelity to the float model on the evaluation inputs
(`tools.bench_real.KEYS`), size, session costs and latency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.session_cost import cost_cells, latencies, ratio_cell, session_costs

MODELS = ("lenet5", "resnet32", "rec", "det", "cls")
#: Grid cells per layer (``--bits``) -> the targets decoded from them: 256 cells fit int8, 16 int4.
GRIDS = {8: ("gather", "int8"), 4: ("gather", "gather-unpacked", "int4")}
#: label -> (`onnxhq.lowbit.LowbitOptions` keywords, GPTQ) for ``--lowbit``.
LOWBIT_FORMS = {
    "onnxhq lowbit 4-bit/32, nearest": ({}, False),
    "onnxhq lowbit 4-bit/32, GPTQ": ({}, True),
    "onnxhq lowbit 4-bit/32, GPTQ, accuracy 4": ({"accuracy_level": 4}, True),
    "onnxhq lowbit 8-bit/32, GPTQ, accuracy 4": ({"bits": 8, "accuracy_level": 4}, True),
}


def native_forms(path, calib, hessian: str, work: Path, original_bytes: int) -> dict[str, dict]:
    """``path`` compressed on grids (each of `GRIDS`) and decoded to the targets it serves: label
    -> {file, ratio, note, graph}, as `tools.bench_real` keeps its forms; files under ``work``."""
    import onnxhq
    from onnxhq.decode import decode_file

    forms = {}
    for bits, targets in GRIDS.items():
        kw = {"cell_value": "grid", "bits": bits, "scope": "layer"}
        result = onnxhq.compress(path, calib, hessian=hessian, **kw)
        graph = result.save(work / f"cell_grid_{bits}")[0]
        a = result.artifacts
        for target in targets:
            file = work / f"cell_grid_{bits}_{target}.onnx"
            decode_file(graph, file, target=target)
            forms[f"onnxhq grid {bits} bits -> {target}"] = {
                "file": file,
                "ratio": original_bytes / (len(a.graph_bytes) + len(a.sidecar_bytes)),
                "note": f"--cell-value grid --bits {bits} --scope layer, --target {target}",
                "graph": graph,
            }
    return forms


def model_and_inputs(name: str, work: Path):
    """(float model file, evaluation inputs, calibration inputs) of ``name``."""
    from tools.bench_real import FILES, inputs
    from tools.datasets import LENET5, shared_file

    if name == "resnet32":
        from onnxhq.model import save_model
        from tools.datasets import cifar10, resnet

        path = work / "resnet32.onnx"
        save_model(resnet(32), path)
        data = cifar10("test", smoke=True, limit=64).inputs
        return path, data, data
    path = Path(LENET5) if name == "lenet5" else shared_file("models", "real", FILES[name])
    return path, *inputs(name)


def bench(name: str, args, work: Path) -> list[dict]:
    from tools.bench_real import run

    path, feeds, calib = model_and_inputs(name, work)
    x1 = next(iter(feeds.values()))[:1]
    forms = {"float": {"file": Path(path), "ratio": 1.0, "note": "original file"}}
    forms.update(native_forms(path, calib, "none", work, Path(path).stat().st_size))
    graph = forms["onnxhq grid 8 bits -> gather"]["graph"]
    lat = latencies({k: f["file"] for k, f in forms.items()}, x1, args.rounds)
    sub = {k: v[:32] for k, v in feeds.items()}
    outputs = {label: run(str(f["file"]), sub) for label, f in forms.items()}
    rows = []
    for label, f in forms.items():
        row = {"model": name, "form": label, "file_bytes": Path(f["file"]).stat().st_size}
        row.update(session_costs(f["file"], x1.shape, args.repeats))
        row["latency_ms"] = 1000 * lat[label]
        gather = outputs.get(label.rsplit(" -> ", 1)[0] + " -> gather")
        diff = None if gather is None or label == "float" else np.abs(outputs[label] - gather)
        row["max_diff_vs_gather"] = None if diff is None else float(diff.max())
        row["max_diff_vs_float"] = float(np.abs(outputs[label] - outputs["float"]).max())
        rows.append(row)
    pair = {"model": name, "form": "onnxhq.InferenceSession (pair)"}
    pair["file_bytes"] = sum(p.stat().st_size for p in Path(graph).parent.iterdir())
    pair.update(session_costs(graph, x1.shape, args.repeats, pair=True))
    rows.append(pair)
    return rows


def bench_lowbit(name: str, args, work: Path) -> list[dict]:
    """The float model and its `LOWBIT_FORMS`: fidelity to the float model, size, session costs
    and latency (same process, turns)."""
    import onnx

    from onnxhq.data import Dataset
    from onnxhq.fidelity import measure
    from onnxhq.lowbit import LowbitOptions, lowbit_model, with_accuracy_level
    from tools.bench_real import KEYS, KINDS, run

    path, feeds, calib = model_and_inputs(name, work)
    x1 = next(iter(feeds.values()))[:1]
    forms = {"float": {"file": Path(path), "note": "original file"}}
    made: dict[tuple, Any] = {}
    for i, (label, (kw, gptq)) in enumerate(LOWBIT_FORMS.items()):
        t = time.perf_counter()
        grids = {k: v for k, v in kw.items() if k != "accuracy_level"}
        key = (tuple(sorted(grids.items())), gptq)
        if key not in made:
            made[key] = lowbit_model(path, Dataset(inputs=calib), LowbitOptions(**grids),
                                     hessian=args.hessian, gptq=gptq)  # fmt: skip
        lowered = made[key]
        file = work / f"lowbit{i}.onnx"
        model = with_accuracy_level(lowered.model, kw.get("accuracy_level", 0))
        onnx.save(model, str(file))
        n = len(lowered.choices)
        forms[label] = {
            "file": file,
            "note": f"{n} weights lowered, {time.perf_counter() - t:.0f} s",
        }
    lat = latencies({k: f["file"] for k, f in forms.items()}, x1, args.rounds)
    original = run(str(path), feeds)
    rows = []
    for label, f in forms.items():
        row = {"model": name, "form": label, "file_bytes": Path(f["file"]).stat().st_size}
        got = original if label == "float" else run(str(f["file"]), feeds)
        fid = measure(KINDS[name], original, got)
        keys = KEYS[name] + (("agreement", "kl") if KINDS[name] == "classes" else ())
        row["fidelity"] = ", ".join(f"{k} {fid[k]:.4g}" for k in dict.fromkeys(keys))
        row.update(session_costs(f["file"], x1.shape, args.repeats))
        row["latency_ms"] = 1000 * lat[label]
        row["note"] = f["note"]
        rows.append(row)
    return rows


def lowbit_table(rows: list[dict]) -> str:
    head = ["model", "form", "file bytes", "fidelity", "start s", "start MB", "run MB"]
    lines = ["| " + " | ".join([*head, "latency ms", "note"]) + " |", "|---" * 9 + "|"]
    base = {}
    for r in rows:
        if r["form"] == "float":
            base[r["model"]] = r
        b = base[r["model"]]
        cells = [r["model"], r["form"], f"{r['file_bytes']:,}", r["fidelity"],
                 *cost_cells(r, b), ratio_cell(r["latency_ms"], b["latency_ms"]),
                 r["note"]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ["model", "form", "file bytes", "start s", "start MB", "run MB", "latency ms"]
    lines = ["| " + " | ".join([*head, "max diff vs gather"]) + " |", "|---" * 8 + "|"]
    base = {}
    for r in rows:
        if r["form"] == "float":
            base[r["model"]] = r
        b = base[r["model"]]
        cells = [r["model"], r["form"], f"{r['file_bytes']:,}", *cost_cells(r, b)]
        cells.append(ratio_cell(r["latency_ms"], b["latency_ms"]) if "latency_ms" in r else "-")
        diff = r.get("max_diff_vs_gather")
        cells.append("-" if diff is None else f"{diff:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per session measure")
    ap.add_argument("--rounds", type=int, default=20, help="latency runs per form")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: the bundled LeNet-5 only, one process and two runs per form",
    )
    ap.add_argument("--lowbit", action="store_true", help="the onnxhq lowbit forms instead")
    ap.add_argument("--hessian", default="fisher", help="--lowbit's importances (default fisher)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.repeats, args.rounds = ["lenet5"], 1, 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            work = Path(tmp) / name
            work.mkdir()
            show = lowbit_table if args.lowbit else table
            rows += (bench_lowbit if args.lowbit else bench)(name, args, work)
            print(show([r for r in rows if r["model"] == name]), flush=True)
            if args.json:  # after each model: a cut run keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
