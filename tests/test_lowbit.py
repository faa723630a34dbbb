"""Block grids, mixed 4/8-bit allocation and the native low-bit model (`onnxhq.blockgrid`,
`onnxhq.bitalloc`, `onnxhq.lowbit`)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxhq import native_contrib as contrib
from onnxhq.bitalloc import Form, allocate
from onnxhq.blockgrid import fit_block_grid, gptq_onto_grid, round_to_grid, weighted_error
from onnxhq.errors import ConfigError
from onnxhq.layerwise import LayerHessian
from onnxhq.lowbit import LowbitOptions, candidates, lower_lowbit
from onnxhq.model import replace_initializers
from onnxhq.runtime import make_session


def heavy(rng, shape):
    """Weights with outliers, as trained transformers have."""
    return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)


def one_node(node, inputs, tensors):
    out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "t", inputs, [out], tensors)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(contrib.MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, block", [(64, 32), (80, 32), (96, 64), (256, 256)])
def test_matmul_nbits_holds_the_grid_values_bit_exactly(bits, k, block):
    # K = 80 pads the last block, 96 / 64 leaves an odd count of 4-bit zero points to pack.
    if not contrib.supported(contrib.NBITS, bits):
        pytest.skip(f"this onnxruntime has no {bits}-bit MatMulNBits")
    w = heavy(np.random.default_rng(bits + k), (k, 24))
    grid = fit_block_grid(w.T, bits=bits, block=block)
    node, tensors = contrib.matmul_nbits_blocks(helper.make_node("MatMul", ["a", "W"], ["y"]), grid)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])
    y = make_session(one_node(node, [a], tensors)).run(None, {"a": np.eye(k, dtype=np.float32)})
    np.testing.assert_array_equal(y[0], grid.values().T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d, block", [(64, 32), (96, 32), (128, 128)])
def test_gather_block_quantized_holds_the_grid_values_bit_exactly(bits, d, block):
    if not contrib.supported(contrib.GATHER, bits):
        pytest.skip(f"this onnxruntime has no {bits}-bit GatherBlockQuantized")
    table = heavy(np.random.default_rng(d), (40, d))
    grid = fit_block_grid(table, bits=bits, block=block)
    node, tensors = contrib.gather_block_quantized_blocks(
        helper.make_node("Gather", ["E", "ids"], ["y"]), grid
    )
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
    y = make_session(one_node(node, [ids], tensors)).run(None, {"ids": np.arange(40)})
    np.testing.assert_array_equal(y[0], grid.values())


@pytest.mark.parametrize("bits, block", [(4, 32), (4, 128), (8, 64)])
def test_clip_search_is_never_worse_than_the_min_max_grid(bits, block):
    rng = np.random.default_rng(block)
    w = heavy(rng, (48, 256))
    h = rng.gamma(0.5, size=w.shape).astype(np.float32)
    searched = fit_block_grid(w, bits=bits, block=block, importance=h)
    plain = fit_block_grid(w, bits=bits, block=block, importance=h, shrink=(1.0,))
    per_block = [
        [weighted_error(w[:, s : s + block], g_part, h[:, s : s + block]) for g_part in parts]
        for s, parts in ((s, (_slice(searched, s), _slice(plain, s))) for s in range(0, 256, block))
    ]
    assert all(a <= b for a, b in per_block)
    if bits == 4:  # 16 levels: clipping the outliers pays
        assert weighted_error(w, searched, h) < 0.95 * weighted_error(w, plain, h)


def _slice(grid, start):
    b = start // grid.block
    return type(grid)(grid.levels[:, start : start + grid.block], grid.scales[:, b : b + 1],
                      grid.zeros[:, b : b + 1], grid.bits, grid.block)  # fmt: skip


def test_levels_are_nearest_on_their_grid_and_in_range():
    w = heavy(np.random.default_rng(1), (16, 96))
    grid = fit_block_grid(w, bits=4, block=32)
    assert grid.levels.max() <= 15 and grid.zeros.max() <= 15
    np.testing.assert_array_equal(round_to_grid(w, grid), grid.levels)
    values = grid.values()
    for delta in (-1, 1):  # the neighbouring level in range is never closer
        moved = np.clip(grid.levels.astype(int) + delta, 0, 15).astype(np.uint8)
        other = type(grid)(moved, grid.scales, grid.zeros, 4, 32).values()
        assert np.all(np.abs(values - w) <= np.abs(other - w) + 1e-7)


def test_gptq_onto_the_grid_lowers_the_layer_error_and_keeps_the_grid():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs
    h = x.T @ x / len(x)
    w = heavy(rng, (32, 64))
    grid = fit_block_grid(w, bits=4, block=32)
    rounded = gptq_onto_grid(w, grid, h)

    def layer(g):
        e = g.values() - w
        return float(((e @ h) * e).sum())

    assert layer(rounded) < 0.8 * layer(grid)
    assert rounded.scales is grid.scales and rounded.zeros is grid.zeros


def test_allocation_meets_the_budget_and_matches_brute_force():
    rng = np.random.default_rng(3)
    forms = {}
    for t in range(5):
        size = int(rng.integers(100, 1000))
        d = float(rng.uniform(1, 10))
        forms[f"t{t}"] = [Form("4", size, d), Form("8", 2 * size, d / 16), Form("f", 8 * size, 0)]
    smallest = sum(f[0].bytes for f in forms.values())
    for budget in (smallest, int(1.5 * smallest), 3 * smallest):
        chosen = allocate(forms, budget)
        assert sum(f.bytes for f in chosen.values()) <= budget
        best = min(
            sum(f.distortion for f in combo)
            for combo in itertools.product(*forms.values())
            if sum(f.bytes for f in combo) <= budget
        )
        # greedy is within the largest single form's distortion of the optimum
        assert sum(f.distortion for f in chosen.values()) <= best + 10
    assert all(f.label == "f" for f in allocate(forms, None).values())


def test_a_budget_below_the_smallest_forms_is_refused_in_one_line():
    forms = {"a": [Form("4", 600, 1.0)], "b": [Form("4", 500, 1.0)]}
    with pytest.raises(ConfigError) as info:
        allocate(forms, 1000)
    assert str(info.value) == (
        "the smallest forms of the 2 tensors take 1,100 bytes, more than the budget of 1,000; "
        "raise the budget or use fewer bits"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 3}, "bits=3 is not one of 4, 8"),
        ({"protect_bits": 4}, "protect_bits=4 must be one of 4, 8 above bits=4, or None"),
        ({"protect_bits": 8}, "protect_bits=8 needs max_bytes, the budget the raised tensors "
         "share"),
        ({"block_sizes": (48,)}, "block_sizes=(48,) must be a non-empty choice of 16, 32, 64, "
         "128, 256"),
        ({"max_bytes": 0}, "max_bytes=0 must be positive, or None"),
        ({"accuracy_level": 5}, "accuracy_level=5 is not one of 0-4"),
    ],
)  # fmt: skip
def test_options_are_checked_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as info:
        LowbitOptions(**kwargs)
    assert str(info.value) == message


def small_model(rng):
    """ids -> Gather(table) -> MatMul(W1) -> Gemm(W2, transB) -> y."""
    tensors = {
        "table": heavy(rng, (50, 64)),
        "W1": heavy(rng, (64, 96)),
        "W2": heavy(rng, (32, 96)),
        "b2": heavy(rng, (32,)),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "W1"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], transB=1),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    model = helper.make_model(helper.make_graph(nodes, "m", [ids], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    model.ir_version = 9
    return model, tensors


def test_lowered_model_computes_its_grid_values_and_meets_the_budget():
    rng = np.random.default_rng(5)
    model, tensors = small_model(rng)
    assert candidates(model) == {"table": contrib.GATHER, "W1": contrib.NBITS, "W2": contrib.NBITS}
    imp = {k: np.ones_like(v) for k, v in tensors.items() if v.ndim == 2}
    x = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64))
    lh = {"W1": LayerHessian(True, 1, ((x.T @ x / 256)[None],), 256)}
    four = lower_lowbit(model, imp, LowbitOptions(), layer_hessians=lh)
    assert {c.label for c in four.choices.values()} == {"4-bit/32"}
    assert four.choices["W1"].gptq[1] < four.choices["W1"].gptq[0]
    budget = four.model.ByteSize() + 2500
    mixed = lower_lowbit(
        model, imp, LowbitOptions(protect_bits=8, max_bytes=budget, block_sizes=(32, 64))
    )
    labels = {c.label for c in mixed.choices.values()}
    assert mixed.model.ByteSize() <= budget and any(lb.startswith("8-bit") for lb in labels)
    assert any(lb.startswith("4-bit") for lb in labels)
    onnx.checker.check_model(mixed.model)
    # the lowered model computes the float model with its weights on the chosen grids
    feed = {"ids": np.arange(50)}
    got = make_session(mixed.model).run(None, feed)[0]
    weights = _grid_weights(mixed.model)
    want = make_session(replace_initializers(model, weights)).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _grid_weights(lowered: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each contrib node's weight, read back through onnxruntime (identity / all ids)."""
    inits = {t.name: t for t in lowered.graph.initializer}
    out = {}
    for node in lowered.graph.node:
        if node.op_type == contrib.NBITS:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k = attrs["K"]
            probe = helper.make_node(contrib.NBITS, ["a", *node.input[1:4]], ["y"],
                                     domain=contrib.MS_DOMAIN, **attrs)  # fmt: skip
            a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, k])
            tensors = [inits[i] for i in node.input[1:4]]
            w = make_session(one_node(probe, [a], tensors)).run(
                None, {"a": np.eye(k, dtype=np.float32)})[0]  # fmt: skip
            name = "W1" if "W1" in node.input[1] else "W2"
            out[name] = w if name == "W1" else np.ascontiguousarray(w.T)
        elif node.op_type == contrib.GATHER:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            probe = helper.make_node(contrib.GATHER, [node.input[0], "ids", *node.input[2:]],
                                     ["y"], domain=contrib.MS_DOMAIN, **attrs)  # fmt: skip
            ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
            tensors = [inits[i] for i in (node.input[0], *node.input[2:])]
            out["table"] = make_session(one_node(probe, [ids], tensors)).run(
                None, {"ids": np.arange(50)})[0]  # fmt: skip
    return out


def test_cli_lowbit_writes_a_budgeted_file_that_keeps_lenet5s_predictions(
    bundled_model, bundled_sample, tmp_path, capsys
):
    from onnxhq.cli import main
    from onnxhq.data import load_data
    from onnxhq.model import load_model

    out = tmp_path / "l5.onnx"
    args = ["lowbit", str(bundled_model), "--data", str(bundled_sample), "-o", str(out)]
    args += ["--hessian", "activations", "--samples", "64", "--block-size", "32", "64"]
    assert main([*args, "--protect-bits", "8", "--max-file-mb", "0.5"]) == 0
    assert "; 1 x 4-bit/" in capsys.readouterr().out  # one Gemm raised to 8 bits, one not
    assert out.stat().st_size <= 500_000
    feed = load_data(bundled_sample, load_model(bundled_model)).head(256).inputs
    want = make_session(load_model(bundled_model)).run(None, feed)[0].argmax(1)
    got = make_session(onnx.load(out)).run(None, feed)[0].argmax(1)
    assert np.mean(got == want) >= 0.99


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (["--protect-bits", "8"], 2, "--protect-bits 8 needs --max-file-mb, the budget the raised "
         "tensors share"),
        (["--max-file-mb", "0"], 2, "--max-file-mb 0 must be positive"),
        (["--max-file-mb", "0.05", "--no-gptq"], 1, "the smallest forms make a file of about "),
    ],
)  # fmt: skip
def test_cli_lowbit_option_errors_are_one_line(
    extra, status, message, bundled_model, bundled_sample, tmp_path, capsys
):
    from onnxhq.cli import main

    args = ["lowbit", str(bundled_model), "--data", str(bundled_sample), "-o", str(tmp_path / "x")]
    assert main([*args, "--hessian", "activations", "--samples", "64", *extra]) == status
    err = capsys.readouterr().err
    assert err.startswith(f"onnxhq: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_fitted_forms_serve_several_budgets_and_accuracy_levels_change_only_the_attribute():
    from onnxhq.lowbit import fit_forms, with_accuracy_level

    rng = np.random.default_rng(6)
    model, tensors = small_model(rng)
    imp = {k: np.ones_like(v) for k, v in tensors.items() if v.ndim == 2}
    options = LowbitOptions(protect_bits=8, max_bytes=60_000)
    fitted = fit_forms(model, imp, options)
    again = lower_lowbit(model, imp, options, fitted=fitted).model
    assert again.SerializeToString() == lower_lowbit(model, imp, options).model.SerializeToString()
    fast = with_accuracy_level(again, 4)
    levels = [
        helper.get_attribute_value(a)
        for n in fast.graph.node
        if n.op_type == contrib.NBITS
        for a in n.attribute
        if a.name == "accuracy_level"
    ]
    assert levels == [4, 4]
    assert with_accuracy_level(fast, 0).SerializeToString() == again.SerializeToString()
    assert list(fast.graph.initializer) == list(again.graph.initializer)
