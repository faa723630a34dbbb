"""Where the tools find their data: the bundled sample in ``models/`` and the shared data sets.

The shared data (MNIST, CIFAR-10, the pretrained CIFAR-10 ResNets) live outside the repository,
in the folder named by the environment variable ``ONNXHQ_SHARED``; by default ``../shared``
beside the checkout. Its layout::

    datasets/mnist.npz            x_train, y_train, x_test, y_test (uint8)
    datasets/cifar10.npz          the same keys, images [N, 32, 32, 3] uint8
    models/resnet<D>_cifar10.npz  flat PyTorch weights of the CIFAR-10 ResNet-D

Every tool also takes ``--smoke``: a run of seconds on the bundled sample
(``models/mnist_sample.npz``: 1,000 of its images stand in for MNIST's training split, the other
1,000 for its test split) and, where a CIFAR-10 ResNet is needed, a ResNet-20 with random weights
on random images. Smoke runs check that a tool works, not what it measures.

Run the tools as modules from the repository root, e.g. ``python -m tools.bench_e2e --smoke``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from onnxhq.data import Dataset

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CACHE = REPO / "tools" / "_cache"
LENET5 = MODELS / "lenet5_mnist.onnx"
LENET5_ADAM = MODELS / "lenet5_mnist_adam.npz"
LENET300 = MODELS / "lenet300_mnist.onnx"
LENET300_ADAM = MODELS / "lenet300_mnist_adam.npz"
SAMPLE = MODELS / "mnist_sample.npz"
ENV = "ONNXHQ_SHARED"
SPLITS = ("train", "test")
SMOKE_TRAIN = 1000  # sample images that stand in for the training split under --smoke


def shared_root() -> Path:
    """The shared data folder: ``$ONNXHQ_SHARED``, else ``../shared`` beside the checkout."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under :func:`shared_root`, not checked."""
    return shared_root().joinpath(*parts)


def shared_file(*parts: str) -> Path:
    """A file under :func:`shared_root`; a clear message and exit status 1 when it is missing."""
    path = shared_path(*parts)
    if not path.is_file():
        raise SystemExit(
            f"error: {path} is missing; set {ENV} to the folder holding datasets/ and models/ "
            f"(default: ../shared beside the checkout), or run with --smoke on the bundled sample"
        )
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")


def mnist(split: str, *, limit: int | None = None, smoke: bool = False) -> Dataset:
    """MNIST ``input`` float32 [N, 1, 28, 28] (pixels / 255) with int64 labels [N].

    ``smoke``: the bundled sample's first 1,000 images as ``train``, the rest as ``test``.
    """
    _check_split(split)
    if smoke:
        with np.load(SAMPLE, allow_pickle=False) as z:
            x, y = z["input"], z["labels"]
        cut = slice(None, SMOKE_TRAIN) if split == "train" else slice(SMOKE_TRAIN, None)
        x, y = x[cut], y[cut]
    else:
        with np.load(shared_file("datasets", "mnist.npz"), allow_pickle=False) as z:
            x = (z[f"x_{split}"].astype(np.float32) / 255.0)[:, None]
            y = z[f"y_{split}"].astype(np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return Dataset({"input": np.ascontiguousarray(x)}, y)


def cifar10(split: str, *, limit: int | None = None, smoke: bool = False) -> Dataset:
    """CIFAR-10 ``input`` float32 [N, 3, 32, 32] (RGB pixels / 255) with int64 labels [N].

    ``smoke``: 64 random images and labels (seeded by the split), for a shape-only run.
    """
    _check_split(split)
    if smoke:
        rng = np.random.default_rng(SPLITS.index(split))
        n = min(limit or 64, 64)
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n)
    else:
        with np.load(shared_file("datasets", "cifar10.npz"), allow_pickle=False) as z:
            x, y = z[f"x_{split}"][:limit], z[f"y_{split}"][:limit]
    x = (x.astype(np.float32) / 255).transpose(0, 3, 1, 2)
    return Dataset({"input": np.ascontiguousarray(x)}, y.astype(np.int64))


def resnet(depth: int = 32, *, fold_batchnorm: bool = True, smoke: bool = False):
    """The pretrained CIFAR-10 ResNet-``depth`` as an onnx.ModelProto (BatchNorm folded).

    ``smoke``: ResNet-20 with random weights (seed 0) instead, the classifier's scaled down so that
    the class scores (about +-2) leave the softmax unsaturated and the Fisher nonzero.
    """
    from models.resnet_cifar import build_resnet_cifar, load_resnet_cifar, random_weights

    if smoke:
        weights = random_weights(20, seed=0)
        weights["linear.weight"] *= np.float32(0.01)
        return build_resnet_cifar(weights, fold_batchnorm=fold_batchnorm)
    path = shared_file("models", f"resnet{depth}_cifar10.npz")
    return load_resnet_cifar(str(path), fold_batchnorm=fold_batchnorm)
