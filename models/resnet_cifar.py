"""CIFAR-10 ResNets (He et al. 2016, option-A shortcuts) as ONNX graphs.

Builds the ResNet-20/32/44/56 of ``akamaster/pytorch_resnet_cifar10`` from the flat
numpy weights described in ``../shared/models/README.md`` using only ``onnx.helper``
and numpy.

Graph contract
--------------
* input  ``"input"``:  float32 ``[N, 3, 32, 32]``, RGB pixels / 255 (in [0, 1]).
  The per-channel normalization (mean 0.485/0.456/0.406, std 0.229/0.224/0.225)
  happens inside the graph (``Sub`` ``input_mean``, ``Div`` ``input_std``).
* output ``"logits"``: float32 ``[N, 10]``.
* Weights are initializers named by the PyTorch keys (``conv1.weight``,
  ``layer1.0.bn1.weight``, ``linear.weight`` ...). With ``fold_batchnorm=True`` the
  BatchNormalization nodes disappear and each conv gets a folded weight (same name)
  plus a bias named ``<conv>.bias`` (e.g. ``layer1.0.conv1.bias``).
* Only ops with gradients in onnxruntime-training on the weight paths:
  Conv, BatchNormalization, Relu, Add, Slice, Pad, GlobalAveragePool, Flatten, Gemm.

CLI::

    python -m models.resnet_cifar --weights ../shared/models/resnet32_cifar10.npz \\
        -o resnet32_cifar10.onnx [--fold-batchnorm] [--check]

(from the repository root; ``../shared`` is the default of ``$ONNXHQ_SHARED``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BN_EPS = 1e-5
NUM_CLASSES = 10
STAGE_PLANES = (16, 32, 64)
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)
SUPPORTED_DEPTHS = (20, 32, 44, 56)

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


# --------------------------------------------------------------------------- helpers
def infer_depth(weights: Mapping[str, np.ndarray]) -> int:
    """Depth 6n+2 from the number of blocks in ``layer1``."""
    pat = re.compile(r"^layer1\.(\d+)\.conv1\.weight$")
    blocks = {int(m.group(1)) for k in weights for m in [pat.match(k)] if m}
    if not blocks:
        raise ValueError("cannot infer depth: no 'layer1.<b>.conv1.weight' keys in the weights")
    n = max(blocks) + 1
    if blocks != set(range(n)):
        raise ValueError(f"cannot infer depth: layer1 blocks are {sorted(blocks)}, not 0..{n - 1}")
    return 6 * n + 2


def expected_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every array a ResNet-<depth> checkpoint holds."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
    n = (depth - 2) // 6
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}
    for s in _BN_SUFFIXES:
        shapes[f"bn1.{s}"] = (16,)
    in_planes = 16
    for si, planes in enumerate(STAGE_PLANES, start=1):
        for b in range(n):
            p = f"layer{si}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, in_planes, 3, 3)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            for s in _BN_SUFFIXES:
                shapes[f"{p}.bn1.{s}"] = (planes,)
                shapes[f"{p}.bn2.{s}"] = (planes,)
            in_planes = planes
    shapes["linear.weight"] = (NUM_CLASSES, 64)
    shapes["linear.bias"] = (NUM_CLASSES,)
    return shapes


def random_weights(depth: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the checkpoint's key names and shapes (for tests)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shp in expected_shapes(depth).items():
        if k.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shp)
        elif k.endswith("running_mean") or k.endswith("bias"):
            a = rng.normal(0.0, 0.1, shp)
        elif k.startswith("bn") or ".bn" in k:  # BN gamma
            a = rng.uniform(0.5, 1.5, shp)
        else:  # conv / linear weights, He-style scale
            fan_in = int(np.prod(shp[1:]))
            a = rng.normal(0.0, np.sqrt(2.0 / fan_in), shp)
        out[k] = a.astype(np.float32)
    return out


def _check_weights(weights: Mapping[str, np.ndarray], depth: int) -> None:
    shapes = expected_shapes(depth)
    missing = [k for k in shapes if k not in weights]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"ResNet-{depth} weights are missing {missing[:5]}{more}")
    bad = [
        f"{k}: {tuple(np.shape(weights[k]))} != {shp}"
        for k, shp in shapes.items()
        if tuple(np.shape(weights[k])) != shp
    ]
    if bad:
        raise ValueError(f"ResNet-{depth} weights have wrong shapes: " + "; ".join(bad[:5]))
    extra = sorted(k for k in weights if k not in shapes and not k.endswith("num_batches_tracked"))
    if extra:
        raise ValueError(f"unexpected keys for ResNet-{depth}: {extra[:5]} (wrong depth?)")


def fold_bn(
    w: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BN_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference BatchNorm into the preceding bias-free conv (computed in float64)."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    w_f = w.astype(np.float64) * scale[:, None, None, None]
    b_f = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return w_f.astype(np.float32), b_f.astype(np.float32)


# --------------------------------------------------------------------------- builder
class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def init(self, name: str, arr: np.ndarray) -> str:
        if name in self._names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        if name in self._names:
            raise ValueError(f"duplicate node/tensor name {name!r}")
        self._names.add(name)
        out = out or name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def build_resnet_cifar(
    weights: Mapping[str, np.ndarray],
    *,
    depth: int | None = None,
    fold_batchnorm: bool = False,
) -> onnx.ModelProto:
    """Build the ONNX graph (opset 17, IR 8) of a CIFAR-10 ResNet from PyTorch-named weights."""
    inferred = infer_depth(weights)
    if depth is None:
        depth = inferred
    elif depth != inferred:
        raise ValueError(f"depth={depth} given but the weights are a ResNet-{inferred}")
    _check_weights(weights, depth)
    n = (depth - 2) // 6
    W = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    g = _Graph()

    def conv_bn(x: str, conv: str, bn: str, stride: int) -> str:
        """conv (3x3, pad 1) + BN; returns the BN (or folded conv) output."""
        w = W[f"{conv}.weight"]
        kw = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride])
        if fold_batchnorm:
            wf, bf = fold_bn(w, *(W[f"{bn}.{s}"] for s in _BN_SUFFIXES))
            ins = [x, g.init(f"{conv}.weight", wf), g.init(f"{conv}.bias", bf)]
            return g.node("Conv", ins, conv, out=f"{conv}.out", **kw)
        y = g.node("Conv", [x, g.init(f"{conv}.weight", w)], conv, out=f"{conv}.out", **kw)
        ins = [y] + [g.init(f"{bn}.{s}", W[f"{bn}.{s}"]) for s in _BN_SUFFIXES]
        return g.node("BatchNormalization", ins, bn, out=f"{bn}.out", epsilon=BN_EPS)

    # input normalization
    mean = np.array(INPUT_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(INPUT_STD, np.float32).reshape(1, 3, 1, 1)
    x = g.node("Sub", ["input", g.init("input_mean", mean)], "input_sub_mean")
    x = g.node("Div", [x, g.init("input_std", std)], "input_normalized")

    # stem
    x = conv_bn(x, "conv1", "bn1", 1)
    x = g.node("Relu", [x], "relu1")

    # option-A shortcut constants (shared)
    sl_starts = sl_ends = sl_axes = sl_steps = None
    in_planes = 16
    for si, planes in enumerate(STAGE_PLANES, start=1):
        for b in range(n):
            p = f"layer{si}.{b}"
            stride = 2 if (si > 1 and b == 0) else 1
            y = conv_bn(x, f"{p}.conv1", f"{p}.bn1", stride)
            y = g.node("Relu", [y], f"{p}.relu1")
            y = conv_bn(y, f"{p}.conv2", f"{p}.bn2", 1)
            if stride != 1 or in_planes != planes:
                if sl_starts is None:
                    sl_starts = g.init("shortcut_slice_starts", np.array([0, 0], np.int64))
                    sl_ends = g.init(
                        "shortcut_slice_ends", np.array([np.iinfo(np.int64).max] * 2, np.int64)
                    )
                    sl_axes = g.init("shortcut_slice_axes", np.array([2, 3], np.int64))
                    sl_steps = g.init("shortcut_slice_steps", np.array([2, 2], np.int64))
                pad_c = planes // 4
                sc = g.node(
                    "Slice", [x, sl_starts, sl_ends, sl_axes, sl_steps], f"{p}.shortcut.subsample"
                )
                pads = g.init(
                    f"{p}.shortcut.pads", np.array([0, pad_c, 0, 0, 0, pad_c, 0, 0], np.int64)
                )
                sc = g.node("Pad", [sc, pads], f"{p}.shortcut.pad", mode="constant")
            else:
                sc = x
            y = g.node("Add", [y, sc], f"{p}.add")
            x = g.node("Relu", [y], f"{p}.relu2")
            in_planes = planes

    x = g.node("GlobalAveragePool", [x], "avgpool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    g.node(
        "Gemm",
        [x, g.init("linear.weight", W["linear.weight"]), g.init("linear.bias", W["linear.bias"])],
        "linear",
        out="logits",
        transB=1,
    )

    graph = helper.make_graph(
        g.nodes,
        f"resnet{depth}_cifar10" + ("_bnfolded" if fold_batchnorm else ""),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxhq",
        doc_string=(
            f"CIFAR-10 ResNet-{depth} (He et al. 2016, option-A shortcuts; weights by "
            "Y. Idelbayev, akamaster/pytorch_resnet_cifar10, BSD-2-Clause). Input: RGB/255 "
            "NCHW; normalization (mean 0.485,0.456,0.406 / std 0.229,0.224,0.225) inside."
            + (" BatchNorm folded into conv." if fold_batchnorm else "")
        ),
    )
    model.ir_version = IR_VERSION
    return model


# --------------------------------------------------------------------------- loaders
def load_resnet_cifar(path: str, **kw) -> onnx.ModelProto:
    """``np.load(path, allow_pickle=False)`` + :func:`build_resnet_cifar`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(
            f"ResNet weights not found: {path!r} (expected e.g. "
            "../shared/models/resnet32_cifar10.npz; see ../shared/models/README.md)"
        ) from None
    return build_resnet_cifar(weights, **kw)


def load_cifar10_test(
    path: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test split: x float32 [N,3,32,32] in [0,1] (RGB), y int64 [N].

    ``path`` defaults to ``datasets/cifar10.npz`` under ``$ONNXHQ_SHARED`` (see tools/datasets.py).
    """
    if path is None:
        from tools.datasets import shared_path

        path = shared_path("datasets", "cifar10.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            x = z["x_test"]
            y = z["y_test"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {str(path)!r} (expected $ONNXHQ_SHARED/datasets/cifar10.npz, "
            "by default ../shared beside the checkout; see its datasets/README.md)"
        ) from None
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = (x.astype(np.float32) / np.float32(255.0)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), y.astype(np.int64)


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 500) -> int:
    """Number of correct top-1 predictions with onnxruntime (CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), batch):
        (logits,) = sess.run(["logits"], {"input": x[i : i + batch]})
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a CIFAR-10 ResNet ONNX model from .npz weights")
    ap.add_argument("--weights", required=True, help="e.g. ../shared/models/resnet32_cifar10.npz")
    ap.add_argument("-o", "--output", help="where to write the .onnx model")
    ap.add_argument("--fold-batchnorm", action="store_true", help="fold BN into the convs")
    ap.add_argument(
        "--check",
        action="store_true",
        help="top-1 accuracy on the 10,000 CIFAR-10 test images (onnxruntime)",
    )
    ap.add_argument("--data", help="CIFAR-10 npz (default: $ONNXHQ_SHARED/datasets/cifar10.npz)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    args = ap.parse_args(argv)

    try:
        model = load_resnet_cifar(args.weights, fold_batchnorm=args.fold_batchnorm)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    onnx.checker.check_model(model, full_check=True)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(
        f"{model.graph.name}: {len(model.graph.node)} nodes, {len(model.graph.initializer)} "
        f"initializers, {n_params:,} values; check_model(full_check=True) OK"
    )
    if args.output:
        onnx.save(model, args.output)
        print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)")
    if args.check:
        try:
            x, y = load_cifar10_test(args.data, limit=args.limit)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        correct = evaluate(model, x, y, batch=500)
        dt = time.perf_counter() - t0
        print(
            f"top-1 accuracy: {100.0 * correct / len(y):.2f} % ({correct}/{len(y)}) in {dt:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
