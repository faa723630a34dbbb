"""The onnx package's backend test models go through compress and decode and still compute the same.

``onnx/backend/test/data/light/light_*.onnx`` are nine ImageNet classifiers (opset 9, IR 3, one
input of shape (1, 3, 224, 224)) whose weights are ConstantOfShape nodes, every element 0.02:
`onnxhq.model.load_model` turns them into initializers. Plain k-means at k=16 then keeps the one
distinct value (a one-entry codebook, logged, no error). Each decoded model passes the full ONNX
checker and computes exactly what the original with its quantized weights computes, under
onnxruntime with the same session options. The dequantize functions import the models' opset 9
(see `onnxhq.rewrite`: the checker refuses a function body at another opset); 4-bit packing
needs opset 10, so these models keep one uint8 index per weight.

The reference evaluator computes every model's dequantized weights, and runs the whole network
for SqueezeNet and ShuffleNet only (about 5 and 8 s a pass here; Inception v1 takes 40 s). Its
Softmax at opset 9 does not flatten to 2-D, so SqueezeNet's (1, 1000, 1, 1) output is all ones
there: it is compared with the reference evaluator's own run of the quantized original.

Default run (about 55 s on the shared 2-core machine, 30 s of CPU): SqueezeNet, ShuffleNet,
Inception v1, Inception v2, DenseNet-121. Marked slow (``pytest -m slow``), measured the same way:
ResNet-50 (25 M weights, 20 s), AlexNet (61 M, 65 s), ZFNet-512 (87 M, 110 s), VGG-19 (144 M,
180 s; the process peaks at 13 GB, most of it in Huffman-coding the sidecar).

The constant weights make every codebook trivial, so SqueezeNet and ShuffleNet also go through
with random weights: 16 codewords and real index streams, at opset 9 and, converted with
onnx.version_converter, at opset 13, where the indices are 4-bit packed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

import onnxhq
from onnxhq import naming
from onnxhq.model import (
    default_opset,
    load_model,
    quantizable_weights,
    replace_initializers,
    runtime_inputs,
)
from onnxhq.runtime import make_session

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SLOW = pytest.mark.slow
MODELS = [
    "squeezenet",
    "shufflenet",
    "inception_v1",
    "inception_v2",
    "densenet121",
    pytest.param("resnet50", marks=SLOW),
    pytest.param("bvlc_alexnet", marks=SLOW),
    pytest.param("zfnet512", marks=SLOW),
    pytest.param("vgg19", marks=SLOW),
]
WHOLE_NETWORK_REFERENCE = ["squeezenet", "shufflenet"]


def light_path(name: str) -> Path:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"this onnx package has no backend test model {path}")
    return path


def random_feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal random data for every runtime input, batch 1 where a dimension is symbolic."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in runtime_inputs(model):
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feed[value.name] = rng.normal(size=shape).astype(np.float32)
    return feed


def quantized_reference(
    original: onnx.ModelProto, result, decoded: onnx.ModelProto
) -> onnx.ModelProto:
    """The original with its quantized weights, at the decoded model's IR version.

    Model-local functions need IR 8, so `onnxhq.rewrite` raises the IR version of these IR-3
    models; onnxruntime optimizes an IR-3 model differently (no NCHWc convolutions, so other
    float rounding), and only models of one IR version are compared bit for bit.
    """
    reference = replace_initializers(original, result.quantized.dequantize_all())
    reference.ir_version = decoded.ir_version
    return reference


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` cut down to its dequantize nodes; their outputs (the weights) become outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if n.domain == naming.DOMAIN]
    for field in (out.graph.node, out.graph.input, out.graph.output, out.graph.value_info):
        del field[:]
    out.graph.node.extend(nodes)
    out.graph.output.extend(
        helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes
    )
    return out


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    """One backend model: raw proto, loaded original, compression result, decoded model."""
    path = light_path(request.param)
    original = load_model(path)
    # weights as the files hold them, under their names: no BN folded, no short names
    result = onnxhq.compress(original, method="kmeans", k=16, name=request.param,
                             fold_batchnorm=False, compact_names=False)  # fmt: skip
    return dict(
        name=request.param,
        raw=onnx.load(str(path)),
        original=original,
        result=result,
        decoded=result.model(),
        feed=random_feed(original),
    )


def test_constant_of_shape_weights_become_quantized_initializers(case):
    raw, original = case["raw"], case["original"]
    weights = {n.input[1] for n in raw.graph.node if n.op_type in ("Conv", "Gemm")}
    made_by = {n.output[0]: n.op_type for n in raw.graph.node}
    direct = {w for w in weights if made_by[w] == "ConstantOfShape"}
    assert not any(n.op_type == "ConstantOfShape" for n in original.graph.node)
    assert direct <= set(case["result"].quantized.tensors) <= weights
    # Inception v1's classifier weight is Reshape(ConstantOfShape(...)): load_model folds only the
    # ConstantOfShape, so that one weight (1 M of its 7 M) stays float.
    assert len(weights - direct) == (1 if case["name"] == "inception_v1" else 0)


def test_constant_weights_leave_a_one_entry_codebook(case):
    quantized = case["result"].quantized
    assert {k: v.tolist() for k, v in quantized.codebooks.items()} == {"shared": [np.float32(0.02)]}
    assert all(not c.indices.any() for c in quantized.tensors.values())


def test_decoded_model_passes_the_full_checker_at_the_models_opset(case):
    decoded = case["decoded"]
    onnx.checker.check_model(decoded, full_check=True)
    assert default_opset(decoded) == default_opset(case["raw"]) == 9
    assert [(o.domain, o.version) for f in decoded.functions for o in f.opset_import] == [("", 9)]
    assert {n.op_type for n in decoded.graph.node if n.domain == naming.DOMAIN} == {"Dequantize"}


def test_outputs_equal_the_quantized_reference_under_onnxruntime(case):
    want = make_session(quantized_reference(case["original"], case["result"], case["decoded"])).run(
        None, case["feed"]
    )
    got = make_session(case["decoded"]).run(None, case["feed"])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_reference_evaluator_computes_the_quantized_weights(case):
    weights = weights_only(case["decoded"])
    names = [o.name for o in weights.graph.output]
    want = case["result"].quantized.dequantize_all()
    for name, value in zip(names, ReferenceEvaluator(weights).run(None, {}), strict=True):
        np.testing.assert_array_equal(value, want[name])


@pytest.mark.parametrize("case", WHOLE_NETWORK_REFERENCE, indirect=True)
def test_reference_evaluator_runs_the_whole_decoded_network(case):
    reference = quantized_reference(case["original"], case["result"], case["decoded"])
    want = ReferenceEvaluator(reference).run(None, case["feed"])
    got = ReferenceEvaluator(case["decoded"]).run(None, case["feed"])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_random_weights_use_every_codeword(name, opset):
    # At opset 13 (onnx.version_converter) the indices are 4-bit packed, at 9 one byte each.
    raw = onnx.load(str(light_path(name)))
    original = load_model(raw if opset == 9 else onnx.version_converter.convert_version(raw, opset))
    rng = np.random.default_rng(0)
    weights = {
        w.name: (rng.normal(size=w.shape) * np.sqrt(2 / np.prod(w.shape[1:]))).astype(np.float32)
        for w in quantizable_weights(original)
    }
    original = replace_initializers(original, weights)
    result = onnxhq.compress(original, method="kmeans", k=16, name=name,
                             fold_batchnorm=False, compact_names=False)  # fmt: skip
    assert {k: v.size for k, v in result.quantized.codebooks.items()} == {"shared": 16}
    decoded = result.model()
    onnx.checker.check_model(decoded, full_check=True)
    ops = {n.op_type for n in decoded.graph.node if n.domain == naming.DOMAIN}
    assert ops == (
        {"Dequantize"} if opset == 9 else {"DequantizePacked4"}
    )  # every weight has >= 64 elements
    feed = random_feed(original)
    want = make_session(quantized_reference(original, result, decoded)).run(None, feed)[0]
    np.testing.assert_array_equal(make_session(decoded).run(None, feed)[0], want)
