"""Benchmark onnxhq's index coding against entropy, zlib/bz2/lzma and the pure-Python dahuffman.

    python -m tools.bench_coding [--npz FILE | --sidecar FILE ...] [--repeat 20] [--seed 0]

Without ``--npz`` it codes synthetic index streams shaped like the real ones: Laplacian weights of
LeNet-5 (431,080) and ResNet-32 (464,154) size on a uniform 32-level grid over [min, max], dense,
and 90 % pruned (the smallest magnitudes get index 0; the rest a 31-level grid over the survivors).
``--npz`` codes real index arrays instead (keys = stream names, int values). ``--sidecar`` sums up
whole sidecars as compress wrote them (each tensor its own stream) against the general-purpose
compressors on the same indices, per tensor and concatenated.

Per stream: bits per weight of the order-0 entropy, of the onnxhq payload alone and with its
tables; of zlib -9, bz2 -9 and lzma (preset 9 | EXTREME) on the same indices as uint8 bytes (uint16
when k > 256); and the decode time of the one-stream sidecar against dahuffman decoding its own
Huffman code of the same indices (best of ``--repeat`` runs, dahuffman best of 5). Prints markdown.
``--smoke``: synthetic streams of 20,000 weights and the committed LeNet-5 sidecar, one run each.

``--throughput [--sizes 10M 50M 200M] [--reference DIR]`` measures instead the speed and memory of
coding one large stream: encode (`encode_sidecar`) and decode (`decode_sidecar`) in millions of
indices per second (CPU time, best of ``--repeat``), and the peak of the memory numpy and Python
allocate meanwhile (tracemalloc, the input excluded), per index. Streams: Laplacian weights on a
uniform grid of 16 and of 32 levels (about 3.3 and 4.4 bits per index), 90 % pruned (run coding)
and 4096 levels (uint16). ``--reference DIR`` times the same streams with another onnxhq too: DIR
holds its ``onnxhq`` package, e.g. ``git archive REV onnxhq | tar -x -C DIR``, loaded under another
name; it runs only up to ``--reference-max`` indices (the 0.2-era encoder peaks at ~66 bytes each).
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import importlib.metadata
import importlib.util
import lzma
import os
import platform
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

from onnxhq.sidecar import IndexStream, decode_sidecar, describe_sidecar, encode_sidecar
from tools import datasets

SIZES = {"lenet5": 431_080, "resnet32": 464_154}
SMOKE_SIZES = {"lenet5": 20_000, "resnet32": 20_000}
SMOKE_SIDECAR = datasets.MODELS / "compressed" / "lenet5" / "lenet5.onnxhq"


def synthetic_streams(seed: int, sizes: dict[str, int] = SIZES) -> list[IndexStream]:
    rng = np.random.default_rng(seed)
    streams = []
    for model, n in sizes.items():
        w = rng.laplace(scale=0.05, size=n)
        dense = np.clip(np.digitize(w, np.linspace(w.min(), w.max(), 33)) - 1, 0, 31)
        streams.append(IndexStream(f"{model}_dense", (n,), 32, dense.astype(np.uint8)))
        keep = np.abs(w) >= np.quantile(np.abs(w), 0.9)
        grid = np.linspace(w[keep].min(), w[keep].max(), 32)
        pruned = np.zeros(n, dtype=np.uint8)
        pruned[keep] = np.clip(np.digitize(w[keep], grid), 1, 31)
        streams.append(IndexStream(f"{model}_pruned90", (n,), 32, pruned))
    return streams


def npz_streams(path: str) -> list[IndexStream]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {name: np.asarray(z[name]) for name in z.files}
    return [
        IndexStream(name, a.shape, int(a.max()) + 1 if a.size else 1, a)
        for name, a in sorted(arrays.items())
    ]


def best_time(fn, repeat: int) -> float:
    """Least CPU time of ``repeat`` calls: CPU time, unlike wall time, ignores other jobs' load."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(stream: IndexStream, repeat: int, dahuffman, theirs: int = 5) -> dict:
    n = stream.indices.size
    data = encode_sidecar([stream])
    (layout,) = describe_sidecar(data)
    decoded, _ = decode_sidecar(data)
    assert np.array_equal(decoded[0].indices, stream.indices), "onnxhq round trip failed"
    raw = stream.indices.astype(np.uint8 if stream.alphabet_size <= 256 else np.uint16).tobytes()
    generic = {
        "zlib": len(zlib.compress(raw, 9)),
        "bz2": len(bz2.compress(raw, 9)),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }
    symbols = stream.indices.ravel().tolist()
    codec = dahuffman.HuffmanCodec.from_data(symbols)
    coded = codec.encode(symbols)
    assert codec.decode(coded) == symbols, "dahuffman round trip failed"
    return {
        "name": stream.name,
        "n": n,
        "k": stream.alphabet_size,
        "runs": layout.run_symbol,
        "entropy": layout.entropy_bits,
        "payload": 8 * layout.payload_bytes / n,
        "coded": layout.coded_bits_per_weight,
        "file": 8 * len(data) / n,
        **{key: 8 * size / n for key, size in generic.items()},
        "dahuffman_bits": 8 * len(coded) / n,
        "ours_s": best_time(lambda: decode_sidecar(data), repeat),
        "dahuffman_s": best_time(lambda: codec.decode(coded), theirs),
        "encode_s": best_time(lambda: encode_sidecar([stream]), 1),
    }


def report(rows: list[dict]) -> str:
    lines = [
        "| stream | n | k | coding | entropy | onnxhq payload | onnxhq +tables | vs entropy "
        "| whole file | zlib -9 | bz2 -9 | lzma 9e | dahuffman | decode onnxhq "
        "| decode dahuffman | speed-up |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        coding = "plain" if r["runs"] is None else f"runs of {r['runs']}"
        excess = 100 * (r["coded"] / r["entropy"] - 1) if r["entropy"] else float("nan")
        lines.append(
            f"| {r['name']} | {r['n']:,} | {r['k']} | {coding} | {r['entropy']:.4f} "
            f"| {r['payload']:.4f} | {r['coded']:.4f} | {excess:+.2f} % | {r['file']:.4f} "
            f"| {r['zlib']:.4f} | {r['bz2']:.4f} | {r['lzma']:.4f} | {r['dahuffman_bits']:.4f} "
            f"| {1e3 * r['ours_s']:.1f} ms | {1e3 * r['dahuffman_s']:.0f} ms "
            f"| {r['dahuffman_s'] / r['ours_s']:.0f}x |"
        )
    encode = ", ".join(f"{r['name']} {1e3 * r['encode_s']:.0f} ms" for r in rows)
    lines += [
        "",
        "Sizes in bits per weight. 'onnxhq +tables' adds the code table and the block index; "
        "'whole file'",
        "is the one-stream sidecar with its prefix and compressed header. 'vs entropy' compares "
        "'+tables' with the entropy.",
        "Decode times: least CPU time of the repeats, onnxhq = decode_sidecar of the one-stream "
        "file (CRCs, checks,",
        "run expansion included); dahuffman = HuffmanCodec.decode of its own code of the same "
        "indices.",
        f"Encode times (one run): {encode}.",
    ]
    return "\n".join(lines)


def sidecar_row(path: str, repeat: int, dahuffman, theirs: int) -> str:
    """Every stream coded alone, as compress does, against zlib/bz2/lzma on the same indices;
    decoding the whole file against dahuffman decoding its own code of all the indices."""
    with open(path, "rb") as f:
        data = f.read()
    streams, _ = decode_sidecar(data)
    layouts = describe_sidecar(data, streams=streams)
    n = sum(s.indices.size for s in streams)
    raws = [
        s.indices.astype(np.uint8 if s.alphabet_size <= 256 else np.uint16).tobytes()
        for s in streams
    ]
    whole = b"".join(raws)
    per_tensor = sum(len(lzma.compress(r, preset=9 | lzma.PRESET_EXTREME)) for r in raws)
    coded = sum(x.payload_bytes + x.table_bytes for x in layouts)
    symbols = np.concatenate([s.indices.ravel() for s in streams]).tolist()
    codec = dahuffman.HuffmanCodec.from_data(symbols)
    their_code = codec.encode(symbols)
    ours_s = best_time(lambda: decode_sidecar(data), repeat)
    theirs_s = best_time(lambda: codec.decode(their_code), theirs)
    bits = {
        "zlib": len(zlib.compress(whole, 9)),
        "bz2": len(bz2.compress(whole, 9)),
        "lzma": len(lzma.compress(whole, preset=9 | lzma.PRESET_EXTREME)),
    }
    bits = {key: 8 * size / n for key, size in bits.items()}
    return (
        f"| {os.path.basename(path)} | {len(streams)} | {n:,} | {8 * coded / n:.4f} "
        f"| {8 * len(data) / n:.4f} | {bits['zlib']:.4f} | {bits['bz2']:.4f} "
        f"| {bits['lzma']:.4f} | {8 * per_tensor / n:.4f} "
        f"| {1e3 * ours_s:.1f} / {1e3 * theirs_s:.0f} ms | {theirs_s / ours_s:.0f}x |"
    )


def sidecar_totals(paths: list[str], repeat: int, dahuffman, theirs: int = 5) -> str:
    """One row per sidecar file (:func:`sidecar_row`), markdown."""
    lines = [
        "| sidecar | streams | n | onnxhq payload + tables | whole file | zlib -9 | bz2 -9 "
        "| lzma 9e | lzma per tensor | decode onnxhq / dahuffman | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [sidecar_row(path, repeat, dahuffman, theirs) for path in paths]
    lines += [
        "",
        "Bits per weight over all streams of the file; 'whole file' counts the prefix and header.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- throughput of one large stream


def throughput_stream(kind: str, n: int, seed: int) -> IndexStream:
    """``n`` indices of one of `THROUGHPUT_KINDS`, made a million at a time (no float64 copy of
    the whole stream)."""
    rng = np.random.default_rng(seed)
    k = {"grid16": 16, "grid32": 32, "pruned90": 32, "grid4096": 4096}[kind]
    out = np.empty(n, dtype=np.uint8 if k <= 256 else np.uint16)
    for begin in range(0, n, 1 << 20):
        w = rng.laplace(size=min(1 << 20, n - begin))
        if kind == "pruned90":
            part = np.clip(np.round(w * 4) + 16, 1, 31)
            part[rng.random(w.size) < 0.9] = 0
        else:
            step = {16: 0.4, 32: 0.25, 4096: 0.0025}[k]
            part = np.clip(np.round(w / step) + k // 2, 0, k - 1)
        out[begin : begin + w.size] = part
    return IndexStream(kind, (n,), k, out)


THROUGHPUT_KINDS = ("grid16", "grid32", "pruned90", "grid4096")


def load_reference(folder: str):
    """The ``sidecar`` module of the onnxhq package in ``folder``, imported as
    ``onnxhq_reference``."""
    init = Path(folder) / "onnxhq" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "onnxhq_reference", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None, f"no onnxhq package in {folder}"
    package = importlib.util.module_from_spec(spec)
    sys.modules["onnxhq_reference"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("onnxhq_reference.sidecar")


def peak_bytes(fn) -> int:
    """Peak of the memory traced while ``fn()`` runs, above what was allocated before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def coding_row(module, stream: IndexStream, repeat: int) -> dict:
    stream = module.IndexStream(stream.name, stream.shape, stream.alphabet_size, stream.indices)
    data = module.encode_sidecar([stream])
    decoded, _ = module.decode_sidecar(data)
    assert decoded[0] == stream, "round trip failed"
    n = stream.indices.size
    encode_s = best_time(lambda: module.encode_sidecar([stream]), repeat)
    decode_s = best_time(lambda: module.decode_sidecar(data), repeat)
    return {
        "bits": 8 * len(data) / n,
        "encode": n / encode_s / 1e6,
        "decode": n / decode_s / 1e6,
        "encode_peak": peak_bytes(lambda: module.encode_sidecar([stream])) / n,
        "decode_peak": peak_bytes(lambda: module.decode_sidecar(data)) / n,
    }


def throughput(sizes: list[int], repeat: int, seed: int, reference, reference_max: int) -> str:
    from onnxhq import sidecar

    lines = [
        "| stream | indices | bits/index | code | encode M/s | decode M/s | encode peak B/index "
        "| decode peak B/index |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for n in sizes:
        for kind in THROUGHPUT_KINDS:
            stream = throughput_stream(kind, n, seed)
            codes = [("this", sidecar)]
            if reference is not None and n <= reference_max:
                codes.append(("reference", reference))
            for label, module in codes:
                r = coding_row(module, stream, repeat)
                lines.append(
                    f"| {kind} | {n:,} | {r['bits']:.3f} | {label} | {r['encode']:.1f} "
                    f"| {r['decode']:.1f} | {r['encode_peak']:.2f} | {r['decode_peak']:.2f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
            del stream
    lines += [
        "",
        "M/s: million indices per CPU second (best of the repeats), one stream per sidecar; peak: "
        "bytes per index",
        "allocated at most during one call (tracemalloc), besides its input (the indices, 1 or 2 "
        "bytes each, or the sidecar).",
    ]
    return "\n".join(lines)


def count(text: str) -> int:
    """``10M`` -> 10_000_000, ``500k`` -> 500_000, ``1234`` -> 1234."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--npz", help="real index arrays: keys = stream names, values = integer arrays")
    ap.add_argument("--sidecar", nargs="+", help="whole .onnxhq files written by compress")
    ap.add_argument(
        "--repeat", type=int, default=20, help="decode repeats for onnxhq (best is kept)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="seconds: small streams, one repeat")
    ap.add_argument("--throughput", action="store_true", help="speed and memory of large streams")
    ap.add_argument("--sizes", nargs="+", type=count, default=[10**7, 5 * 10**7, 2 * 10**8])
    ap.add_argument("--reference", help="folder holding another onnxhq package to compare")
    ap.add_argument("--reference-max", type=count, default=2 * 10**7)
    args = ap.parse_args(argv)
    if args.throughput:
        reference = load_reference(args.reference) if args.reference else None
        print("# onnxhq coding throughput\n")
        print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
        print(f"- machine: {platform.platform()}, nproc={os.cpu_count()}, numpy {np.__version__}")
        print(f"- command: python -m tools.bench_coding {' '.join(sys.argv[1:])}\n")
        repeat = 3 if args.repeat == 20 else args.repeat
        print(throughput(args.sizes, repeat, args.seed, reference, args.reference_max))
        return 0
    try:
        import dahuffman
    except ImportError:
        print("error: this benchmark needs dahuffman: pip install dahuffman", file=sys.stderr)
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("# onnxhq index coding benchmark\n")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    cpu = platform.processor() or platform.machine()
    print(f"- machine: {platform.platform()}, {cpu}, nproc={cpus}")
    versions = f"numpy {np.__version__}, dahuffman {importlib.metadata.version('dahuffman')}"
    print(f"- python {platform.python_version()}, {versions}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"- load average (1, 5, 15 min) at start: {load}")
    print(f"- command: python -m tools.bench_coding {' '.join(sys.argv[1:])}")
    if args.smoke:
        streams = synthetic_streams(args.seed, SMOKE_SIZES)
        print(report([measure(s, 1, dahuffman, theirs=1) for s in streams]) + "\n")
        print(sidecar_totals([str(SMOKE_SIDECAR)], 1, dahuffman, theirs=1))
        return 0
    if args.sidecar:
        print(f"- sidecars: {', '.join(args.sidecar)}\n")
        print(sidecar_totals(args.sidecar, args.repeat, dahuffman))
        return 0
    where = f"--npz {args.npz}" if args.npz else f"synthetic Laplacian, seed {args.seed}"
    print(f"- streams: {where}\n")
    streams = npz_streams(args.npz) if args.npz else synthetic_streams(args.seed)
    print(report([measure(s, args.repeat, dahuffman) for s in streams]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
