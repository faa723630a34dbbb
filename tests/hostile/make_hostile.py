"""Build the hostile models and data files of tests/test_hostile.py into a folder.

Nothing binary lives in git: each file is made here, with onnx.helper and numpy, small and fast
(the one sparse file over 2 GiB takes no disk). ``python tests/hostile/make_hostile.py DIR``
writes them all, to try by hand with the CLI.

Every model is the same tiny classifier, ``logits = x @ W + b`` with x (N, 4) and 3 classes,
changed in one way per file; the data files hold 16 samples.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES, FEATURES, SAMPLES = 3, 4, 16
OPSET = 17


def _classifier(
    nodes=(), inits=(), *, opset: int = OPSET, ir: int = 8, outputs=("logits",)
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            *nodes,
        ],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", CLASSES]) for o in outputs],
        [w, b, *inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def plain(folder: Path) -> Path:
    """The valid classifier."""
    onnx.save_model(_classifier(), folder / "plain.onnx")
    return folder / "plain.onnx"


def data(folder: Path, labels=None, name: str = "data.npz") -> Path:
    """16 samples of x with labels 0..2 (or ``labels``)."""
    x = np.random.default_rng(1).normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    y = np.arange(SAMPLES) % CLASSES if labels is None else labels
    np.savez(folder / name, x=x, labels=y)
    return folder / name


def labels_huge(folder: Path) -> Path:
    """Labels near 2**40: out of range for 3 classes (onnxruntime's loss reads out of bounds)."""
    return data(folder, np.full(SAMPLES, 2**40 + 1, np.int64), "labels_huge.npz")


def labels_uint64(folder: Path) -> Path:
    """uint64 labels of 2**63 + 1, which wrap to a negative int64."""
    return data(folder, np.full(SAMPLES, 2**63 + 1, np.uint64), "labels_uint64.npz")


def labels_out_of_range(folder: Path) -> Path:
    """Label 7 for a 3-class model."""
    return data(folder, np.full(SAMPLES, 7, np.int64), "labels_range.npz")


def if_node(folder: Path) -> Path:
    """The classifier whose output goes through an If node (both branches: Identity)."""

    def branch(name: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph(
            [helper.make_node("Identity", ["logits"], [f"{name}_out"])], name, [], [out]
        )

    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node(
        "If", ["cond"], ["scores"], then_branch=branch("then"), else_branch=branch("else")
    )
    model = _classifier([node], [cond], outputs=("scores",))
    onnx.save_model(model, folder / "if_node.onnx")
    return folder / "if_node.onnx"


def _external(
    folder: Path,
    name: str,
    location: str,
    *,
    in_subgraph: bool = False,
    data_dir: Path | None = None,
) -> Path:
    """A classifier adding a Constant node (or an If-body initializer) whose value lives in the
    external file ``location``, written (relative to ``data_dir``, default ``folder``)."""
    value = np.full((CLASSES,), 0.5, np.float32)
    (data_dir or folder).mkdir(parents=True, exist_ok=True)
    ((data_dir or folder) / Path(location).name).write_bytes(value.tobytes())
    tensor = numpy_helper.from_array(value, "shift")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, val in (("location", location), ("offset", "0"), ("length", str(value.nbytes))):
        tensor.external_data.add(key=key, value=val)
    if in_subgraph:
        out = helper.make_tensor_value_info("body_out", TensorProto.FLOAT, None)
        body = helper.make_graph(
            [helper.make_node("Add", ["logits", "shift"], ["body_out"])],
            "body",
            [],
            [out],
            [tensor],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [helper.make_node("If", ["cond"], ["scores"], then_branch=body, else_branch=body)]
        model = _classifier(nodes, [cond], outputs=("scores",))
    else:
        nodes = [
            helper.make_node("Constant", [], ["shift"], value=tensor),
            helper.make_node("Add", ["logits", "shift"], ["scores"]),
        ]
        model = _classifier(nodes, outputs=("scores",))
    onnx.save_model(model, folder / name)
    return folder / name


def constant_external(folder: Path) -> Path:
    """A Constant node whose value is in ``shift.bin`` beside the model."""
    return _external(folder, "constant_external.onnx", "shift.bin")


def subgraph_external(folder: Path) -> Path:
    """An If body initializer whose value is in ``body.bin`` beside the model."""
    return _external(folder, "subgraph_external.onnx", "body.bin", in_subgraph=True)


def constant_escaping(folder: Path) -> Path:
    """A Constant node whose external data location climbs out of the model's folder."""
    return _external(folder, "constant_escaping.onnx", "../secret.bin", data_dir=folder.parent)


def weights_external(folder: Path) -> Path:
    """The classifier saved with its weights in ``weights_external.onnx.data``."""
    model = _classifier()
    onnx.save_model(
        model,
        folder / "weights_external.onnx",
        save_as_external_data=True,
        location="weights_external.onnx.data",
        size_threshold=0,
    )
    return folder / "weights_external.onnx"


def opset23(folder: Path) -> Path:
    """The classifier at opset 23, IR 11 (what onnx 1.18+ writes by default)."""
    onnx.save_model(_classifier(opset=23, ir=11), folder / "opset23.onnx")
    return folder / "opset23.onnx"


def negative_dims(folder: Path) -> Path:
    """An initializer declaring dims [-1, 3]."""
    model = _classifier()
    model.graph.initializer[0].dims[0] = -1
    onnx.save_model(model, folder / "negative_dims.onnx")
    return folder / "negative_dims.onnx"


def huge_dims(folder: Path) -> Path:
    """An initializer declaring 10**12 x 3 elements and holding 48 bytes."""
    model = _classifier()
    model.graph.initializer[0].dims[0] = 10**12
    onnx.save_model(model, folder / "huge_dims.onnx")
    return folder / "huge_dims.onnx"


def duplicate_outputs(folder: Path) -> Path:
    """Two nodes writing the value ``logits``."""
    node = helper.make_node("Identity", ["xw"], ["logits"])
    onnx.save_model(_classifier([node]), folder / "duplicate_outputs.onnx")
    return folder / "duplicate_outputs.onnx"


def output_twice(folder: Path) -> Path:
    """The graph output ``logits`` listed twice."""
    onnx.save_model(_classifier(outputs=("logits", "logits")), folder / "output_twice.onnx")
    return folder / "output_twice.onnx"


def nan_weight(folder: Path) -> Path:
    """W holds one NaN."""
    model = _classifier()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[1, 2] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    onnx.save_model(model, folder / "nan_weight.onnx")
    return folder / "nan_weight.onnx"


def over_2gb(folder: Path) -> Path:
    """A sparse file of 2 GiB + 1 byte named .onnx (no disk used)."""
    path = folder / "over_2gb.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 1)
    return path


def terabyte_npz(folder: Path) -> Path:
    """An .npz whose 'x' declares shape (2**40, 4) float32 and stores no data."""
    path = folder / "terabyte.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**40, FEATURES)}
    with zipfile.ZipFile(path, "w") as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
    return path


def zip_bomb(folder: Path, gib: float = 4.0) -> Path:
    """An .npz whose 'x' inflates to ``gib`` GiB of zeros (a few MB on disk); slow to build."""
    rows = int(gib * 2**30) // (FEATURES * 4)
    path = folder / "zip_bomb.npz"
    chunk = bytes(FEATURES * 4 * 2**18)
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, FEATURES)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            left = rows * FEATURES * 4
            while left:
                f.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        z.writestr("labels.npy", _npy(np.zeros(rows, np.int8)))
    return path


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


#: Every builder of a file, by name (zip_bomb left out: it takes seconds).
BUILDERS: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        plain,
        data,
        labels_huge,
        labels_uint64,
        labels_out_of_range,
        if_node,
        constant_external,
        subgraph_external,
        constant_escaping,
        weights_external,
        opset23,
        negative_dims,
        huge_dims,
        duplicate_outputs,
        output_twice,
        nan_weight,
        over_2gb,
        terabyte_npz,
    )
}


def build_all(folder: Path) -> dict[str, Path]:
    """Write every file of `BUILDERS` into ``folder/models`` (escaping files go one level up)."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    return {name: build(models) for name, build in BUILDERS.items()}


if __name__ == "__main__":
    for name, path in build_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
