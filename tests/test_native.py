"""Native low-bit targets: a codebook on a uniform grid becomes DequantizeLinear of int8/int4
levels that computes the gather model's weights up to float rounding; anything else is refused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import small_convnet

from onnxhq import naming
from onnxhq.errors import ConfigError, ModelError
from onnxhq.model import default_opset
from onnxhq.native import grid_of, lower
from onnxhq.rewrite import rewrite
from onnxhq.runtime import make_session

STEP = np.float32(0.0371)


def grid_codes(model, levels, rng, grouped=False):
    """Codebooks ``STEP * levels`` (per row group of 1 with ``grouped``) and random indices for
    the conv and fc weights of the small convnet."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.endswith("weight")}
    k = len(levels)
    if grouped:
        books = {
            n: np.stack([(STEP * (r + 1)) * levels for r in range(s[0])]).astype(np.float32)
            for n, s in shapes.items()
        }
        return books, {
            n: SimpleNamespace(codebook=n, indices=rng.integers(0, k, s), group_size=1)
            for n, s in shapes.items()
        }
    books = {"shared": (STEP * np.asarray(levels, np.float32)).astype(np.float32)}
    return books, {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, k, s), group_size=None)
        for n, s in shapes.items()
    }


def outputs(model, x):
    return make_session(model).run(None, {"input": x})[0]


def test_grid_of_recovers_scale_and_levels():
    levels = np.array([-7, -3, 0, 1, 2, 6])
    scale, got = grid_of(STEP * levels.astype(np.float32))
    np.testing.assert_array_equal(got, levels)
    assert scale == pytest.approx(STEP, rel=1e-6)
    assert grid_of(np.array([0.5], np.float32))[1].tolist() == [1]
    assert grid_of(np.zeros(3, np.float32))[1].tolist() == [0, 0, 0]


def test_grid_of_refuses_values_off_a_grid():
    assert grid_of(np.array([-1.0, 0.1, 0.3517, 2.0], np.float32)) is None
    assert grid_of(np.sort(np.random.default_rng(0).normal(size=32)).astype(np.float32)) is None


@pytest.mark.parametrize("target", ["int8", "int4"])
@pytest.mark.parametrize("grouped", [False, True])
def test_native_model_computes_the_gather_models_weights(target, grouped):
    model = small_convnet()
    levels = np.arange(-8, 8) if target == "int4" else np.arange(-100, 120, 3)
    books, tensors = grid_codes(model, levels, np.random.default_rng(1), grouped)
    gather = rewrite(model, books, tensors)
    native = lower(gather, target)
    onnx.checker.check_model(native, full_check=True)
    assert {n.op_type for n in native.graph.node if n.output[0] in tensors} == {"DequantizeLinear"}
    # int4: the Gemm (transB=1, a bias) reads its weight as MatMulNBits, per-row grids as columns
    fc = next(n for n in native.graph.node if n.output[0] == "logits").op_type
    assert fc == ("MatMulNBits" if target == "int4" else "Gemm")
    assert not native.functions and all(o.domain != naming.DOMAIN for o in native.opset_import)
    assert not any(t.name.startswith("onnxhq.codebook") for t in native.graph.initializer)
    assert default_opset(native) == (21 if target == "int4" else 17)  # int4 needs opset 21
    x = np.random.default_rng(2).normal(size=(8, 1, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(outputs(native, x), outputs(gather, x), rtol=1e-5, atol=1e-5)


def test_levels_off_zero_take_an_unsigned_type_and_a_zero_point():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(0, 200), np.random.default_rng(0))
    native = lower(rewrite(model, books, tensors), "int8")
    inits = {t.name: t for t in native.graph.initializer}
    q = inits[naming.index_tensor("conv.weight")]
    zp = inits[naming.index_tensor("conv.weight") + ".zero_point"]
    assert q.data_type == zp.data_type == onnx.TensorProto.UINT8
    # levels 0..199 fit int8 only shifted: 0 -> -128 would need a zero point, uint8 holds them
    assert onnx.numpy_helper.to_array(zp) in (0, 128)


def test_a_codebook_off_the_grid_is_refused_in_one_line():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-4, 4), np.random.default_rng(0))
    books["shared"] = books["shared"] + np.float32(0.01) * np.arange(8, dtype=np.float32) ** 2
    with pytest.raises(ModelError, match=r"'conv.weight' \(8 values\) is not a uniform grid"):
        lower(rewrite(model, books, tensors), "int8")


def test_too_many_levels_for_int4_are_refused():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-10, 10), np.random.default_rng(0))
    with pytest.raises(ModelError, match="spans grid levels -10 to 9, more than the 16 of int4"):
        lower(rewrite(model, books, tensors), "int4")


def test_gather_target_is_the_model_and_unknown_targets_are_refused():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-4, 4), np.random.default_rng(0))
    gather = rewrite(model, books, tensors)
    assert lower(gather, "gather").SerializeToString() == gather.SerializeToString()
    with pytest.raises(
        ConfigError, match="--target 'int2' is not one of gather, gather-unpacked, int8, int4"
    ):
        lower(gather, "int2")


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 40] x) => (float[N, 6] y) {
    h = MatMul(x, w1)
    a = Tanh(h)
    b = MatMul(a, w2)
    y = Add(b, w2_sum)
}
"""


def test_int4_matmul_weights_become_matmul_nbits_that_compute_the_same():
    model = onnx.parser.parse_model(MLP)
    rng = np.random.default_rng(3)
    shapes = {"w1": (40, 9), "w2": (9, 6)}  # K = 40 and 9: a padded last block, and one block
    books = {"shared": STEP * np.arange(-8, 8, dtype=np.float32)}
    tensors = {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, 16, s), group_size=None)
        for n, s in shapes.items()
    }
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
            for n, s in [("w1", shapes["w1"]), ("w2", shapes["w2"]), ("w2_sum", (6,))]
        ]
    )
    gather = rewrite(model, books, tensors)
    native = lower(gather, "int4")
    assert [n.op_type for n in native.graph.node] == ["MatMulNBits", "Tanh", "MatMulNBits", "Add"]
    assert default_opset(native) == 17  # no DequantizeLinear left: no conversion to opset 21
    x = {"x": rng.normal(size=(5, 40)).astype(np.float32)}
    want = make_session(gather).run(None, x)[0]
    np.testing.assert_allclose(make_session(native).run(None, x)[0], want, rtol=1e-5, atol=1e-5)


EMBED = """
<ir_version: 8, opset_import: ["" : 17]>
embed (int64[N, T] ids) => (float[N, T, 5] y) {
    e = Gather(table, ids)
    y = MatMul(e, proj)
}
"""


def coded_model(text, shapes, books, group_size=None, seed=4):
    """The model of ``text`` with float weights of ``shapes``, rewritten with codebook key
    ``"w"`` per weight (``books[name]``: (k,) or (G, k)), random indices."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
        for n, s in shapes.items()
    )
    tensors = {
        n: SimpleNamespace(codebook=n, indices=rng.integers(0, books[n].shape[-1], s),
                           group_size=group_size if books[n].ndim > 1 else None)
        for n, s in shapes.items()
    }  # fmt: skip
    return rewrite(model, books, tensors)


def same_outputs(gather, native, feed, optimize=True):
    """Equal outputs up to float rounding (``optimize=False`` where onnxruntime's optimizer would
    fuse an int8 DequantizeLinear + MatMul into its int8-compute MatMulNBits)."""
    want = make_session(gather, optimize=optimize).run(None, feed)[0]
    got = make_session(native, optimize=optimize).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["int8", "int4"])
def test_embedding_tables_become_gather_block_quantized(target):
    span = np.arange(0, 16) if target == "int4" else np.arange(-40, 200)  # unsigned: zero points
    shapes = {"table": (50, 32), "proj": (32, 5)}
    books = {n: STEP * span.astype(np.float32) for n in shapes}
    gather = coded_model(EMBED, shapes, books)
    native = lower(gather, target)
    proj = "MatMulNBits" if target == "int4" else "MatMul"
    assert [n.op_type for n in native.graph.node if n.output[0] in ("e", "y")] == [
        "GatherBlockQuantized",
        proj,
    ]
    ids = np.random.default_rng(5).integers(0, 50, (3, 7))
    same_outputs(gather, native, {"ids": ids}, optimize=target == "int4")


def test_block_scales_of_row_groups_and_fallback_to_dequantize_linear():
    # proj's rows (K) in groups of 16, one signed grid each: MatMulNBits with a scale per block;
    # the table's rows are 20 long, no multiple of 16: DequantizeLinear per row group instead.
    shapes = {"table": (48, 20), "proj": (20 + 12, 5)}
    text = EMBED.replace("e = Gather(table, ids)", "g = Gather(table, ids)\n    e = Pad(g, pads)")
    rows = [(r + 1) * STEP * np.arange(-8, 8, dtype=np.float32) for r in range(3)]
    books = {"table": np.stack(rows), "proj": np.stack(rows[:2])}
    gather = coded_model(text, shapes, books, group_size=16)
    gather.graph.initializer.append(
        onnx.numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 12], np.int64), "pads")
    )
    native = lower(gather, "int4")
    ops = {n.output[0]: n.op_type for n in native.graph.node}
    assert ops["table"] == "DequantizeLinear" and ops["y"] == "MatMulNBits"
    nbits = next(n for n in native.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in nbits.attribute}["block_size"] == 16
    ids = np.random.default_rng(6).integers(0, 48, (2, 4))
    same_outputs(gather, native, {"ids": ids})


def test_int8_matmul_weights_stay_dequantize_linear():
    # onnxruntime's exact 8-bit MatMulNBits kernel is slow; DequantizeLinear + MatMul is what its
    # optimizer fuses itself (int8 compute), so unoptimized the outputs are the gather form's.
    model = onnx.parser.parse_model(MLP)
    rng = np.random.default_rng(7)
    shapes = {"w1": (40, 9), "w2": (9, 6), "w2_sum": (6,)}
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
        for n, s in shapes.items()
    )
    books = {"shared": STEP * np.arange(-100, 120, 3, dtype=np.float32)}
    tensors = {
        n: SimpleNamespace(codebook="shared", indices=rng.integers(0, 74, shapes[n]),
                           group_size=None)
        for n in ("w1", "w2")
    }  # fmt: skip
    gather = rewrite(model, books, tensors)
    native = lower(gather, "int8")
    assert [n.op_type for n in native.graph.node].count("DequantizeLinear") == 2
    x = {"x": rng.normal(size=(5, 40)).astype(np.float32)}
    want = make_session(gather, optimize=False).run(None, x)[0]
    got = make_session(native, optimize=False).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def grid_artifacts(bundled_model, tmp_path_factory):
    """LeNet-5 at 16 grid cells per network codebook (hessian none: fast), saved."""
    import onnxhq

    result = onnxhq.compress(bundled_model, hessian="none", bits=4, cell_value="grid")
    return result.save(tmp_path_factory.mktemp("grid"))[0]


@pytest.mark.parametrize("target", ["int8", "int4"])
def test_compress_with_grid_cell_values_decodes_to_native_forms(
    grid_artifacts, bundled_model, bundled_sample, target
):
    import onnxhq
    from onnxhq.data import load_data
    from onnxhq.model import load_model

    feed = load_data(bundled_sample, load_model(bundled_model)).head(64).inputs
    gather = onnxhq.load(grid_artifacts)
    native = onnxhq.load(grid_artifacts, target=target)
    assert not any(n.domain == naming.DOMAIN for n in native.graph.node)
    assert {n.op_type for n in native.graph.node} & {"DequantizeLinear", "MatMulNBits"}
    want = make_session(gather).run(None, feed)[0]
    got = make_session(native).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_grid_cell_values_are_the_grid_points_and_means_are_not(bundled_model):
    import onnxhq

    grid = onnxhq.compress(bundled_model, hessian="none", bits=4, cell_value="grid", scope="layer")
    mean = onnxhq.compress(bundled_model, hessian="none", bits=4, scope="layer")
    assert grid.report.to_dict()["settings"]["cell_value"] == "grid"
    for book in grid.quantized.codebooks.values():
        scale, levels = grid_of(book)
        eps = np.finfo(np.float32).eps  # the scale is rounded to float32: one unit at most
        np.testing.assert_allclose(levels * np.float64(scale), book, rtol=2 * eps, atol=0)
    # the same cells (indices) per tensor; each cell's mean is its least-error value
    for name in grid.quantized.tensors:
        np.testing.assert_array_equal(
            grid.quantized.tensors[name].indices, mean.quantized.tensors[name].indices
        )
        assert grid.quantized.errors[name].rel_error >= mean.quantized.errors[name].rel_error


def test_cli_compress_with_grid_cell_values_then_decode_int4(bundled_model, tmp_path, capsys):
    from onnxhq.cli import main

    out = tmp_path / "out"
    args = ["compress", str(bundled_model), "--hessian", "none", "--bits", "4"]
    assert main([*args, "--cell-value", "grid", "-o", str(out)]) == 0
    graph = out / "lenet5_mnist.onnx"
    assert main(["decode", str(graph), "--target", "int4", "-o", str(tmp_path / "m.onnx")]) == 0
    assert not any(n.domain == naming.DOMAIN for n in onnx.load(tmp_path / "m.onnx").graph.node)
    assert main([*args, "-o", str(tmp_path / "mean")]) == 0  # the default: cell means
    mean = tmp_path / "mean" / "lenet5_mnist.onnx"
    assert main(["decode", str(mean), "--target", "int4", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "compress with --cell-value grid" in capsys.readouterr().err


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"method": "hkmeans"}, "method 'hkmeans' has no grid"),
        ({"compensate": True}, "and compensate moves the codebook values off it"),
        ({"finetune_epochs": 1, "train_data": "t.npz"}, "and finetune_epochs moves"),
        ({"cell_value": "median"}, "unknown cell_value='median'; choose one of mean, grid"),
    ],
)
def test_grid_cell_values_are_refused_where_the_codebook_leaves_the_grid(keywords, message):
    from onnxhq.options import CompressOptions, OptionError

    with pytest.raises(OptionError, match=message):
        CompressOptions.from_keywords(**{"cell_value": "grid", **keywords})


def test_cell_value_round_trips_through_the_settings():
    from onnxhq.options import CompressOptions

    options = CompressOptions.from_keywords(cell_value="grid", bits=4)
    assert options.to_dict()["cell_value"] == "grid"
    assert CompressOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize("grouped", [False, True])
def test_supplied_weights_run_the_gather_model_without_its_lookups(grouped):
    from onnxhq.native import supplied_weights

    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-5, 9), np.random.default_rng(8), grouped)
    gather = rewrite(model, books, tensors)
    skeleton, weights = supplied_weights(gather)
    assert set(weights) == set(tensors) and not skeleton.functions
    assert all(n.domain == "" for n in skeleton.graph.node)
    stored = {t.name: t for t in skeleton.graph.initializer}
    assert all(stored[n].data_location == onnx.TensorProto.EXTERNAL for n in tensors)
    assert not any(name.startswith("onnxhq.") or ".onnxhq_" in name for name in stored)
    x = np.random.default_rng(9).normal(size=(4, 1, 6, 6)).astype(np.float32)
    got = make_session(skeleton, weights=weights).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, outputs(gather, x))


def test_gather_unpacked_stores_a_byte_per_index_and_computes_the_same():
    model = small_convnet()
    books, tensors = grid_codes(model, np.arange(-4, 4), np.random.default_rng(10))
    gather = rewrite(model, books, tensors)
    assert any(n.op_type == "DequantizePacked4" for n in gather.graph.node)
    unpacked = lower(gather, "gather-unpacked")
    onnx.checker.check_model(unpacked, full_check=True)
    assert {n.op_type for n in unpacked.graph.node if n.domain == naming.DOMAIN} == {"Dequantize"}
    assert {f.name for f in unpacked.functions} == {"Dequantize"}
    stored = {t.name: t for t in unpacked.graph.initializer}
    for name, codes in tensors.items():
        index = onnx.numpy_helper.to_array(stored[naming.index_tensor(name)])
        assert index.dtype == np.uint8 and index.shape == codes.indices.shape
    assert not any(name.startswith("onnxhq.shape") for name in stored)
    x = np.random.default_rng(11).normal(size=(4, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(outputs(unpacked, x), outputs(gather, x))


def test_replace_readers_swaps_only_the_named_weights_readers_in_place():
    from onnxhq import native_contrib as contrib

    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, int64[M] ids) => (float[N, 3] y, float[M, 4] e) {
      a = MatMul(x, w)
      b = MatMul(a, v)
      y = Gemm<transB = 1>(b, w2)
      e = Gather(table, ids)
      c = MatMul(x, w)
    }"""
    made = []

    def make(node, weight):
        made.append((node.output[0], weight))
        tensor = onnx.numpy_helper.from_array(np.zeros(1, np.float32), f"{weight}.new")
        new = onnx.helper.make_node("Stub", [node.input[0], tensor.name], list(node.output),
                                    domain=contrib.MS_DOMAIN)  # fmt: skip
        return new, [tensor]

    untouched = onnx.parser.parse_model(text)
    assert contrib.replace_readers(untouched, {"x", "nothing"}, make) == {} and not made
    assert untouched == onnx.parser.parse_model(text)  # no opset import added either
    model = onnx.parser.parse_model(text)
    tensors = contrib.replace_readers(model, {"w", "table"}, make)
    assert made == [("a", "w"), ("e", "table"), ("c", "w")]  # graph order, each reader once
    assert sorted(tensors) == ["table.new", "w.new"]  # shared by the readers of one weight
    assert [n.op_type for n in model.graph.node] == ["Stub", "MatMul", "Gemm", "Stub", "Stub"]
    assert [n.output[0] for n in model.graph.node] == ["a", "b", "y", "e", "c"]
    assert [o.domain for o in model.opset_import] == ["", contrib.MS_DOMAIN]
    assert not model.graph.initializer  # the caller's to change


def test_plain_reader_is_the_op_every_reader_of_a_weight_is_or_none():
    from onnxhq import native_contrib as contrib

    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, int64[M] ids) => (float[N, 3] y) {
      a = MatMul(x, w)
      c = MatMul(a, w)
      d = MatMul(first, x)
      y = Gemm<transB = 1>(d, g, bias)
      z = Gemm<transB = 1, alpha = 2.0>(d, scaled)
      e = Gather(table, ids)
      f = Gather<axis = 1>(columns, ids)
      h = MatMul(x, mixed)
      k = Gather(mixed, ids)
    }""")
    readers = contrib.readers_of(model)

    def reader(name, rows=3):
        return contrib.plain_reader(readers.get(name, []), rows, {"bias": (3,)})

    assert [reader(n) for n in ("w", "g", "table")] == ["MatMul", "Gemm", "Gather"]
    assert reader("g", rows=4) is None  # the bias must hold one value per row (output)
    for name in ("first", "scaled", "columns", "mixed", "unread"):
        assert reader(name) is None, name
