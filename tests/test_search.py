"""A target instead of a rate: the search, its report, and the checks it makes before work.

Also what `compress` reports per tensor (errors and the guard's marks) and the CLI's spelling of
the new options. Models are built in the tests; the Hessian is off (``hessian="none"``) so that
each run takes well under a second.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper, numpy_helper

import onnxhq
from onnxhq import pipeline, search
from onnxhq.cli import FLAGS, main
from onnxhq.data import Dataset
from onnxhq.errors import DataError
from onnxhq.model import default_opset, read_initializers
from onnxhq.options import KEYWORDS, CompressOptions, OptionError, Target
from onnxhq.quantize import tensor_error
from onnxhq.report import ErrorRow, SearchPoint

FAST = {"hessian": "none"}


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(3)
    return Dataset(
        {"input": rng.normal(size=(200, 1, 6, 6)).astype(np.float32)}, rng.integers(0, 4, 200)
    )


def test_the_search_returns_the_smallest_artifacts_that_meet_the_target(data):
    result = onnxhq.compress(
        small_convnet(), data, eval_data=data, min_fidelity="agreement=0.97", **FAST
    )
    report = result.report
    met = [p for p in report.search if p.met]
    assert report.target == "agreement=0.97" and met
    assert report.compressed_bytes == min(p.compressed_bytes for p in met)
    assert report.fidelity["logits"]["agreement"] >= 0.97
    ladder = [f"target_bits={b:g}" for b in search.LADDER["target_bits"]]
    passes = {(p.scope, p.group_size, p.rate.endswith(", compensated")) for p in report.search}
    for scope, size, comp in passes:  # bisection: the rate below a pass's lowest met one fails
        tried = {
            p.rate.removesuffix(", compensated"): p
            for p in report.search
            if (p.scope, p.group_size, p.rate.endswith(", compensated")) == (scope, size, comp)
        }
        lowest = min((ladder.index(r) for r, p in tried.items() if p.met), default=None)
        if lowest:
            assert not tried[ladder[lowest - 1]].met
    # compensation is tried last, at the winning scope, below the best plain rate met
    plain = [p for p in report.search if p.met and not p.rate.endswith(", compensated")]
    best_plain = min(plain, key=lambda p: p.compressed_bytes)
    compensated = [p for p in report.search if p.rate.endswith(", compensated")]
    assert compensated and all(p.scope == best_plain.scope for p in compensated)
    assert all(
        ladder.index(p.rate.removesuffix(", compensated")) < ladder.index(best_plain.rate)
        for p in compensated
    )
    # the settings are the chosen point's: compressing at them gives the same artifacts
    again = onnxhq.compress(
        small_convnet(), data, options=CompressOptions.from_dict(report.settings)
    )
    assert again.artifacts.sidecar_bytes == result.artifacts.sidecar_bytes
    assert report.settings["min_fidelity"] is None and report.settings["target_bits"] is not None


def test_a_scope_given_restricts_the_search_to_it(data):
    report = onnxhq.compress(
        small_convnet(), data, eval_data=data, min_fidelity="agreement=0.9", scope="layer", **FAST
    ).report
    assert {p.scope for p in report.search} == {"layer"} and report.settings["scope"] == "layer"


def test_the_search_is_in_the_json_and_the_text(data):
    report = onnxhq.compress(small_convnet(), data, eval_data=data, max_drop=5.0, **FAST).report
    out = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert out["search"]["target"] == "max_drop=5"
    assert [SearchPoint(**p) for p in out["search"]["points"]] == list(report.search)
    drop = 100 * (out["accuracy"]["original"] - out["accuracy"]["compressed"])
    assert drop <= 5.0 and set(out["fidelity"]["logits"]) == {"agreement", "kl", "accuracy"}
    text = report.to_text()
    assert f"search for max_drop=5: {len(report.search)} tried" in text
    assert "fidelity to the original (eval inputs):" in text and "  logits: agreement " in text


def test_an_unreachable_target_names_the_best_reached(data, monkeypatch):
    monkeypatch.setitem(search.LADDER, "target_bits", (1.0, 1.5))  # no room for exact weights
    with pytest.raises(DataError) as caught:
        onnxhq.compress(small_convnet(), data, eval_data=data, min_fidelity="kl=0", **FAST)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("no compression tried reaches kl <= 0: the best kl reached was ")
    assert "; relax the target or give a rate" in message


def test_targets_are_checked_before_the_model_is_read():
    start = time.perf_counter()
    with pytest.raises(OptionError, match=r"is measured on eval data: pass eval_data"):
        onnxhq.compress("no/such/model.onnx", min_fidelity="cosine=0.99", **FAST)
    with pytest.raises(OptionError, match=r"searches the rate itself; drop bits=4 or the target"):
        onnxhq.compress("no/such/model.onnx", eval_data="x.npz", bits=4, min_fidelity="iou=0.9")
    with pytest.raises(OptionError, match="give max_drop or min_fidelity, not both"):
        onnxhq.compress("no/such/model.onnx", max_drop=1, min_fidelity="iou=0.9")
    with pytest.raises(OptionError, match=r"min_fidelity='cos=1' is not METRIC=VALUE"):
        CompressOptions.from_keywords(min_fidelity="cos=1")
    with pytest.raises(OptionError, match=r"max_drop=-1 must be accuracy points in \[0, 100\]"):
        CompressOptions.from_keywords(max_drop=-1)
    with pytest.raises(OptionError, match=r"agreement=99 is out of range: agreement is a share"):
        CompressOptions.from_keywords(min_fidelity="agreement=99")
    with pytest.raises(OptionError, match="unknown guard='never'; choose one of requantize, warn"):
        CompressOptions(guard="never")
    assert time.perf_counter() - start < 1.0


def test_target_keywords_round_trip_and_parse():
    options = CompressOptions.from_keywords(min_fidelity="sqnr=30", guard="warn")
    assert options.target == Target("sqnr_db", 30.0) and options.rate is None
    assert CompressOptions.from_dict(options.to_dict()) == options
    assert Target("kl", 0.1).reached(0.05) and not Target("cosine", 0.99).reached(0.98)


def test_the_cli_names_flags_and_refuses_before_reading(tmp_path, capsys):
    start = time.perf_counter()
    code = main(
        [
            "-q",
            "compress",
            "missing.onnx",
            "--hessian",
            "none",
            "--min-fidelity",
            "cosine=0.99",
            "-o",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 1.0
    assert err.startswith(
        "onnxhq: error: --min-fidelity 'cosine=0.99' is measured on eval data: "
        "pass --eval (model inputs"
    )
    code = main(
        [
            "-q",
            "compress",
            "missing.onnx",
            "--eval",
            "x.npz",
            "--bits",
            "3",
            "--max-drop",
            "1",
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "--max-drop 1.0 searches the rate itself; drop --bits 3 or" in capsys.readouterr().err
    with redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        main(["compress", "missing.onnx", "--guard", "never", "-o", str(tmp_path)])


def test_every_option_keyword_has_a_flag_that_compress_takes():
    assert set(KEYWORDS) - {"name"} <= set(FLAGS)
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["compress", "-h"])
    taken = set(re.findall(r"--[a-z][a-z-]*", out.getvalue()))
    assert set(FLAGS.values()) <= taken


def test_a_metric_no_output_measures_is_refused_before_quantizing(data, monkeypatch):
    monkeypatch.setattr(pipeline, "estimate_importances", _never)
    with pytest.raises(
        OptionError,
        match=r"no output of the model measures 'iou' \(outputs "
        r"logits \(classes\) measure agreement, kl\)",
    ):
        onnxhq.compress(small_convnet(), data, eval_data=data, min_fidelity="iou=0.9", **FAST)
    unlabelled = Dataset(data.inputs)
    with pytest.raises(
        OptionError, match=r"max_drop=1.0 needs labels that fit a class-score output"
    ):
        onnxhq.compress(small_convnet(), data, eval_data=unlabelled, max_drop=1, **FAST)


def opset11_convnet() -> onnx.ModelProto:
    model = small_convnet()
    model.opset_import[0].version = 11
    model.ir_version = 6
    return model


def test_channel_groups_convert_an_opset_11_model_up_with_one_line(data, caplog):
    caplog.set_level("INFO", logger="onnxhq.search")
    result = onnxhq.compress(opset11_convnet(), scope="channel-group", group_size=1, **FAST)
    decoded = result.model()
    assert default_opset(decoded) >= 15
    said = [r.getMessage() for r in caplog.records if "converted the model" in r.getMessage()]
    assert said == ["converted the model from opset 11 to 15 for the channel-group scope"]
    # the converted model computes what the original does: only quantization error is left
    from onnxhq.runtime import make_session

    x = data.inputs["input"][:20]
    a = make_session(opset11_convnet()).run(None, {"input": x})[0]
    b = make_session(decoded).run(None, {"input": x})[0]
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_a_search_on_an_opset_11_model_tries_channel_groups(data):
    report = onnxhq.compress(
        opset11_convnet(), data, eval_data=data, min_fidelity="agreement=0.9", **FAST
    ).report
    assert "channel-group" in {p.scope for p in report.search}


def test_a_network_scope_without_target_keeps_the_opset():
    model = opset11_convnet()
    assert pipeline.check_scope_opset(CompressOptions.from_keywords(**FAST), model) is model


def test_a_failed_conversion_for_channel_groups_is_one_line(monkeypatch):
    from onnx import version_converter

    def fail(model, opset):
        raise RuntimeError("No Adapter For Frobnicate")

    monkeypatch.setattr(version_converter, "convert_version", fail)
    monkeypatch.setattr(pipeline, "estimate_importances", _never)
    with pytest.raises(
        OptionError,
        match=r"^scope 'channel-group' decodes with ops of opset 15, the model imports opset 11 "
        r"and onnx could not convert it \(No Adapter For Frobnicate\); use scope 'layer'$",
    ):
        onnxhq.compress(opset11_convnet(), scope="channel-group", group_size=1, **FAST)


def _never(*args, **kwargs):
    raise AssertionError("the work started before the options were checked")


def wrecked_model() -> onnx.ModelProto:
    """x (N, 64) -> MatMul big (64, 64) -> MatMul small (64, 5): small's range is a thousandth of
    big's, so one network codebook leaves it in one or two cells."""
    rng = np.random.default_rng(6)
    big = rng.normal(size=(64, 64)).astype(np.float32)
    small = (1e-3 * rng.normal(size=(64, 5))).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "big"], ["h"]),
            helper.make_node("MatMul", ["h", "small"], ["y"]),
        ],
        "wrecked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    "guard,mark,text",
    [("requantize", "requantized", "+"), ("warn", "flagged", "!"), ("off", "", "")],
)
def test_the_report_shows_each_tensors_error_and_what_the_guard_did(guard, mark, text):
    report = onnxhq.compress(wrecked_model(), target_bits=4, guard=guard, **FAST).report
    small = next(e for e in report.errors if e.name == "small")
    assert small.guard == mark
    assert (small.rel_error < 0.1) if guard == "requantize" else (small.rel_error > 0.5)
    assert small.sqnr_db == pytest.approx(-20 * math.log10(small.rel_error))
    out = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [ErrorRow(**e) for e in out["errors"]] == list(report.errors)
    line = next(x for x in report.to_text().splitlines() if x.startswith("small "))
    assert line.endswith(f"{small.sqnr_db:.1f} {text}".rstrip())


def test_exact_tensors_write_null_sqnr_in_json():
    report = onnxhq.compress(wrecked_model(), k=4096, scope="layer", **FAST).report  # all kept
    assert all(e.rel_error == 0 and e.sqnr_db == math.inf for e in report.errors)
    assert all(e["sqnr_db"] is None for e in report.to_dict()["errors"])


def test_errors_are_measured_again_after_fine_tuning(data):
    result = onnxhq.compress(
        small_convnet(), data, k=4, finetune_epochs=1, train_data=data, finetune_lr=1e-2, **FAST
    )
    plain = onnxhq.compress(small_convnet(), data, k=4, **FAST).report
    names = [e.name for e in result.report.errors]
    original = read_initializers(small_convnet(), names)
    for e, before in zip(result.report.errors, plain.errors):
        want = tensor_error(original[e.name], result.quantized.dequantize(e.name))
        assert (e.rel_error, e.sqnr_db) == (want.rel_error, want.sqnr_db)
        assert e.rel_error != before.rel_error  # the tuned codebook moved the values


def test_a_sweep_without_labels_reports_fidelity(data):
    unlabelled = Dataset(data.inputs)
    result = onnxhq.sweep(small_convnet(), data, eval_data=unlabelled, target_bits=[2, 4], **FAST)
    assert all(p.report.accuracy_compressed is None for p in result.points)
    agreement = [p.report.fidelity["logits"]["agreement"] for p in result.points]
    assert agreement[0] <= agreement[1] and "agreement" in result.to_text()
    assert result.to_dict()["points"][1]["fidelity"]["logits"]["agreement"] == agreement[1]


# --- a real model (slow; skipped without ../shared) -----------------------------------------------

SHARED = Path(os.environ.get("ONNXHQ_SHARED", Path(__file__).parents[2] / "shared"))


@pytest.mark.slow
def test_the_search_on_the_ocr_orientation_classifier_meets_its_target():
    path = SHARED / "models" / "real" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing: the real models live in ../shared (set ONNXHQ_SHARED)")
    x = np.random.default_rng(0).uniform(-1, 1, (64, 3, 48, 192)).astype(np.float32)
    data = Dataset({"x": x})
    result = onnxhq.compress(
        path, data, eval_data=data, min_fidelity="agreement=0.95", hessian="activations"
    )
    report = result.report
    (metrics,) = report.fidelity.values()
    assert metrics["agreement"] >= 0.95
    assert report.compressed_bytes == min(p.compressed_bytes for p in report.search if p.met)
    # opset 11: no channel groups
    assert {p.scope for p in report.search} == {"network", "allocated", "layer"}


def test_a_model_above_the_compensation_budget_is_searched_without_it(data, monkeypatch, caplog):
    from onnxhq.layer_inputs import compensation_cost

    model = small_convnet()
    names = onnxhq.importances.weight_names(model, CompressOptions.from_keywords(**FAST))
    cost = compensation_cost(model, names, samples=len(data))
    monkeypatch.setattr(search, "COMPENSATE_BUDGET", cost * 0.99)
    caplog.set_level("INFO", logger="onnxhq.search")
    report = onnxhq.compress(
        model, data, eval_data=data, min_fidelity="agreement=0.97", **FAST
    ).report
    assert not any(p.rate.endswith(", compensated") for p in report.search)
    assert not report.settings["compensate"]
    said = [r.getMessage() for r in caplog.records if "skips error compensation" in r.getMessage()]
    assert said == [
        f"the search skips error compensation: an estimated {cost:.2g} multiply-adds, above "
        f"{cost * 0.99:.2g} (--compensate compensates every point)"
    ]
    monkeypatch.setattr(search, "COMPENSATE_BUDGET", cost)  # within the budget: compensated
    report = onnxhq.compress(
        model, data, eval_data=data, min_fidelity="agreement=0.97", **FAST
    ).report
    assert any(p.rate.endswith(", compensated") for p in report.search)


def test_the_budget_counts_the_samples_of_a_data_file(data, tmp_path, monkeypatch):
    """A data file (the CLI's --data) is costed at its own sample count, read from its headers."""
    from onnxhq.layer_inputs import SAMPLES, compensation_cost

    model = small_convnet()
    options = CompressOptions.from_keywords(min_fidelity="agreement=0.97", **FAST)
    names = onnxhq.importances.weight_names(model, options)
    path = tmp_path / "x.npz"
    np.savez(path, input=data.inputs["input"])
    monkeypatch.setattr(search, "COMPENSATE_BUDGET", compensation_cost(model, names, samples=200))
    assert compensation_cost(model, names, samples=SAMPLES) > search.COMPENSATE_BUDGET
    for given in (data, str(path), {"input": data.inputs["input"]}):
        assert search.statistics_options(options, model, given).compensate


def test_compensation_is_tried_at_the_closest_scope_when_no_plain_point_meets(
    data, caplog, monkeypatch
):
    monkeypatch.setitem(search.LADDER, "target_bits", (1.0, 1.5, 2.0))  # none meets kl <= 1e-12
    caplog.set_level("INFO", logger="onnxhq.search")
    with pytest.raises(DataError, match="no compression tried reaches kl <= 1e-12"):
        onnxhq.compress(small_convnet(), data, eval_data=data, min_fidelity="kl=1e-12", **FAST)
    tried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("search ")]
    plain = [m for m in tried if "compensated" not in m]
    compensated = [m for m in tried if "compensated" in m]
    assert plain and compensated and tried == plain + compensated
    kl = {m: float(re.search(r"kl ([0-9.e+-]+)", m).group(1)) for m in plain}
    closest = min(kl, key=kl.__getitem__).split()[1]  # "search SCOPE RATE: ..."
    scopes = [m.split()[1] for m in compensated]  # the closest first, then network (if another)
    assert scopes[0] == closest and set(scopes) == {closest, "network"}
    assert scopes == sorted(scopes, key=lambda s: s == "network")


def test_the_compensation_cost_grows_with_the_layer_shapes():
    """Per weight a MatMul / Gemm / Conv reads: groups * (b^3 + ROUNDS * outputs * b^2 +
    runs * rows * b^2) + ROUNDS * COLUMN_COST * b; other readers cost nothing."""
    from onnxhq.layer_inputs import COLUMN_COST, ROUNDS, compensation_cost

    def model(k, n, op="MatMul"):
        w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
        node = (helper.make_node("MatMul", ["x", "w"], ["y"]) if op == "MatMul" else
                helper.make_node("Gather", ["w", "i"], ["y"]))  # fmt: skip
        graph = helper.make_graph([node], "g", [], [], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def want(b, outputs, runs=2):  # 32 samples in batches of 16, a row per sample
        return b**3 + ROUNDS * outputs * b**2 + runs * 16 * b**2 + ROUNDS * COLUMN_COST * b

    assert compensation_cost(model(64, 10), ["w"], samples=32) == want(64, 10)
    assert compensation_cost(model(128, 10), ["w"], samples=32) == want(128, 10)
    assert compensation_cost(model(64, 10), ["w"], samples=32, cap=32) == 2 * want(32, 10)
    assert compensation_cost(model(64, 10, "Gather"), ["w"], samples=32) == 0


def test_compensate_with_a_target_compensates_every_point(data):
    report = onnxhq.compress(
        small_convnet(), data, eval_data=data, min_fidelity="agreement=0.97", compensate=True,
        **FAST,
    ).report  # fmt: skip
    assert report.search and all(p.rate.endswith(", compensated") for p in report.search)
    assert report.settings["compensate"] and report.fidelity["logits"]["agreement"] >= 0.97


@pytest.mark.parametrize("winner, network_pass", [("layer", True), ("network", False)])
def test_a_per_layer_winner_is_followed_by_a_compensated_network_pass(
    winner, network_pass, monkeypatch
):
    """When per-layer codebooks win the plain passes, the compensated passes try the winning
    scope and then one network codebook (which stores one codebook and often wins once
    compensated); a network winner gets one compensated pass."""
    passes = []

    class Found:
        class report:  # stands in for a Report
            @staticmethod
            def with_search(text, points):
                return Found.report

    def bisect(run, scope, ladder, name, top, *, compensate):
        passes.append((scope.kind, top, compensate))
        if scope.kind == winner and not compensate:
            run.best, run.best_scope = Found, scope
            return 3
        return top

    monkeypatch.setattr(search._Run, "bisect", bisect)
    options = CompressOptions.from_keywords(min_fidelity="agreement=0.97")
    result = search.search_target(small_convnet(), small_convnet(), options, ({}, {}), None, None)
    assert result is Found
    compensated = [(kind, top) for kind, top, c in passes if c]
    assert compensated == ([(winner, 2), ("network", 3)] if network_pass else [(winner, 2)])


def test_a_pass_over_its_time_budget_still_tries_its_first_points(data, monkeypatch):
    """The budget (as long as the plain points took) stops a pass only after `PASS_POINTS`
    points: a compensated point may take longer than all the plain ones together."""
    measured = onnxhq.compress(small_convnet(), data, eval_data=data, **FAST)
    calls = []

    def point(*args, **kwargs):
        calls.append(kwargs["label"])
        return measured

    monkeypatch.setattr(pipeline, "compress_point", point)
    options = CompressOptions.from_keywords(min_fidelity="kl=1e-12", **FAST)
    run = search._Run(None, None, options, ({}, None), data, None, Target.parse("kl=1e-12"), None)
    run.budget = 0.0
    run.bisect(search.Scope("network"), tuple(range(1, 17)), "target_bits", 15, compensate=False)
    assert len(calls) == search.PASS_POINTS == 4  # then stopped: a full bisection takes 5
