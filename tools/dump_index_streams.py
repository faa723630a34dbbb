"""Write the real index streams of the reference models for ``bench_coding.py --npz``.

    python tools/dump_index_streams.py

tools/_cache/streams_dense.npz: LeNet-5 and ResNet-32 (BN folded), one Hessian-weighted codebook of
k = 32 for all weights, all layers' indices concatenated into one stream per model.
tools/_cache/streams_pruned.npz: the committed 95 %-pruned LeNet-5 (models/compressed/lenet5), its
streams concatenated into one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "models"))

import onnxhq  # noqa: E402
from onnxhq.decode import sidecar_path  # noqa: E402
from onnxhq.model import load_model  # noqa: E402
from onnxhq.sidecar import read_sidecar  # noqa: E402


def concatenated(result) -> np.ndarray:
    return np.concatenate([c.indices.ravel() for c in result.quantized.tensors.values()]).astype(np.int64)


def main() -> int:
    from resnet_cifar import load_resnet_cifar

    if not SHARED.is_dir():
        print(f"error: {SHARED} is missing", file=sys.stderr)
        return 1
    out = ROOT / "tools" / "_cache"
    out.mkdir(parents=True, exist_ok=True)
    lenet = onnxhq.compress(ROOT / "models" / "lenet5_mnist.onnx", ROOT / "models" / "mnist_sample.npz",
                            method="hkmeans", k=32)
    resnet = onnxhq.compress(load_resnet_cifar(str(SHARED / "models" / "resnet32_cifar10.npz"), fold_batchnorm=True),
                             method="kmeans", k=32)
    np.savez(out / "streams_dense.npz", lenet5_dense=concatenated(lenet), resnet32_dense=concatenated(resnet))
    graph = ROOT / "models" / "compressed" / "lenet5" / "lenet5.onnx"
    streams, _ = read_sidecar(sidecar_path(graph, load_model(graph)))
    np.savez(out / "streams_pruned.npz",
             lenet5_pruned95=np.concatenate([s.indices.ravel() for s in streams]).astype(np.int64))
    print(f"wrote {out}/streams_dense.npz and streams_pruned.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
