"""Write the real index streams of the reference models for ``bench_coding --npz``.

    python -m tools.dump_index_streams [--out tools/_cache] [--smoke]

<out>/streams_dense.npz: LeNet-5 and ResNet-32 (BN folded), one Hessian-weighted codebook of
k = 32 for all weights, all layers' indices concatenated into one stream per model.
<out>/streams_pruned.npz: the committed 95 %-pruned LeNet-5 (models/compressed/lenet5), its
streams concatenated into one. ResNet-32 comes from ``$ONNXHQ_SHARED`` (see tools/datasets.py).
``--smoke``: a ResNet-20 with random weights instead, into a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import onnxhq
from onnxhq.decode import sidecar_path
from onnxhq.model import load_model
from onnxhq.sidecar import read_sidecar
from tools import datasets

PRUNED = datasets.MODELS / "compressed" / "lenet5" / "lenet5.onnx"


def concatenated(result) -> np.ndarray:
    """All quantized tensors' indices of a compress result, flattened into one int64 stream."""
    tensors = result.quantized.tensors.values()
    return np.concatenate([c.indices.ravel() for c in tensors]).astype(np.int64)


def dump(out: Path, *, smoke: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lenet = onnxhq.compress(datasets.LENET5, datasets.SAMPLE, method="hkmeans", k=32)
    resnet = onnxhq.compress(datasets.resnet(32, smoke=smoke), method="kmeans", k=32)
    np.savez(
        out / "streams_dense.npz",
        lenet5_dense=concatenated(lenet),
        resnet32_dense=concatenated(resnet),
    )
    streams, _ = read_sidecar(sidecar_path(PRUNED, load_model(PRUNED)))
    pruned = np.concatenate([s.indices.ravel() for s in streams]).astype(np.int64)
    np.savez(out / "streams_pruned.npz", lenet5_pruned95=pruned)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=datasets.CACHE)
    ap.add_argument("--smoke", action="store_true", help="random ResNet-20, temporary folder")
    args = ap.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="onnxhq-smoke-") as tmp:
            dump(Path(tmp), smoke=True)
            print("smoke: wrote streams_dense.npz and streams_pruned.npz")
        return 0
    dump(args.out, smoke=False)
    print(f"wrote {args.out}/streams_dense.npz and streams_pruned.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
