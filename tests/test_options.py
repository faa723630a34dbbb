"""Option types: each misconfiguration refused on construction, before any model is read, with
one line naming the option; the keyword form round-trips; a report's settings re-run its run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from training_support import needs_training

import onnxhq
from onnxhq.data import save_data
from onnxhq.options import (
    CompressOptions,
    FineTune,
    HessianSource,
    OptionError,
    Rate,
    Scope,
)

MISCONFIGURED = [
    (
        dict(method="ecsq", k=8),
        "method 'ecsq' takes its number of codewords from the rate: give lam "
        "or target_bits, not k=8",
    ),
    (
        dict(bits=2.5),
        "bits=2.5 must be a whole number from 0 to 30; for a fractional rate use target_bits",
    ),
    (dict(bits=float("nan")), "bits=nan must be a whole number"),
    (
        dict(target_bits=float("inf")),
        "target_bits=inf must be a number of bits per weight in [0, 64)",
    ),
    (dict(scope="channel-group"), "scope 'channel-group' needs group_size >= 1"),
    (dict(scope="layer", group_size=4), "group_size=4 applies to scope 'channel-group' only"),
    (
        dict(method="uniform", lam=0.1),
        "lam=0.1 is ECSQ's multiplier; method 'uniform' takes k, bits or target_bits",
    ),
    (
        dict(method="kmeans", hessian="fisher"),
        "method 'kmeans' is unweighted and ignores hessian='fisher'",
    ),
    (
        dict(method="kmeans", adam_state="adam.npz"),
        "method 'kmeans' is unweighted and takes no Hessian, so adam_state does not apply",
    ),
    (dict(hessian="fisher", adam_state="adam.npz"), "adam_state applies to hessian='adam' only"),
    (dict(hessian="adam"), "hessian='adam' needs adam_state"),
    (
        dict(hessian="adam", adam_state="a.npz", hessian_samples=10),
        "hessian_samples=10 applies to the estimators that draw samples",
    ),
    (
        dict(hessian="empirical-fisher", hessian_batch_size=8),
        "hessian_batch_size=8 applies to the fisher, hutchinson, gauss-newton",
    ),
    (dict(hessian="fischer"), "unknown hessian='fischer'; choose one of fisher,"),
    (dict(seed=-1), "seed=-1 must be an integer >= 0"),
    (dict(k=8, bits=3), "give exactly one rate of k, bits, lam, target_bits; got k=8, bits=3"),
    (dict(k=0), "k=0 must be an integer >= 1"),
    (dict(method="bogus"), "unknown method='bogus'; choose one of kmeans, hkmeans, uniform, ecsq"),
    (dict(extra_ops=("Gathr",)), "extra_ops: op type 'Gathr' is not supported"),
    (dict(finetune_epochs=1), "codebook fine-tuning needs labelled training data: pass train_data"),
    (dict(train_data="t.npz"), "train_data is for codebook fine-tuning, which is off"),
    (dict(finetune_lr=1e-3), "finetune_lr is for codebook fine-tuning, which is off"),
    (
        dict(finetune_epochs=1, train_data="t.npz", finetune_lr=float("nan")),
        "finetune_lr=nan must be a finite number > 0",
    ),
]


@pytest.mark.parametrize("keywords, message", MISCONFIGURED)
def test_each_misconfiguration_is_one_line_naming_the_option(keywords, message):
    with pytest.raises(OptionError) as error:
        CompressOptions.from_keywords(**keywords)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text
    assert error.value.fields and all(f in text for f in error.value.fields[:1])


@pytest.mark.parametrize("keywords, message", MISCONFIGURED)
def test_compress_refuses_a_misconfiguration_before_reading_the_model(keywords, message, tmp_path):
    with pytest.raises(OptionError) as error:  # not ModelError: the model is never looked for
        onnxhq.compress(tmp_path / "missing.onnx", None, **keywords)
    assert str(error.value).startswith(message)


def test_a_weighted_estimate_without_data_is_refused_before_reading_the_model(tmp_path):
    with pytest.raises(OptionError, match="needs data"):
        onnxhq.compress(tmp_path / "missing.onnx", None)
    with pytest.raises(OptionError, match="needs data"):
        onnxhq.estimate_hessian(tmp_path / "missing.onnx", None, method="fisher")
    with pytest.raises(OptionError, match="hessian_samples=5 applies"):
        onnxhq.estimate_hessian(
            tmp_path / "missing.onnx", None, method="adam", adam_state="a.npz", samples=5
        )


def test_options_and_keywords_are_not_mixed(tmp_path):
    with pytest.raises(OptionError, match="not both"):
        onnxhq.compress(tmp_path / "missing.onnx", None, options=CompressOptions(), k=4)
    with pytest.raises(TypeError, match="'hessain'"):
        onnxhq.compress(tmp_path / "missing.onnx", None, hessain="fisher")


def test_the_parts_validate_themselves():
    with pytest.raises(OptionError, match="exactly one rate"):
        Rate()
    with pytest.raises(OptionError, match="k=True must be an integer"):
        Rate(k=True)
    with pytest.raises(OptionError, match="needs group_size"):
        Scope("channel-group", 0)
    with pytest.raises(OptionError, match="needs arrays"):
        HessianSource("supplied")
    with pytest.raises(OptionError, match="finetune_epochs=0 must be"):
        FineTune(0, "t.npz")
    with pytest.raises(OptionError, match="'ecsq' takes its number of codewords"):
        CompressOptions(method="ecsq", rate=Rate(bits=3))
    with pytest.raises(OptionError, match="'ecsq' takes"):
        CompressOptions(method="ecsq").with_rate(Rate(k=4))


def test_defaults_follow_the_method():
    assert CompressOptions().rate == Rate(target_bits=4.0)
    assert CompressOptions().hessian == HessianSource("fisher", samples=1000)
    kmeans = CompressOptions(method="kmeans")
    assert kmeans.rate == Rate(k=32) and kmeans.hessian == HessianSource("none")
    assert not kmeans.weighted and CompressOptions().weighted
    assert Rate(bits=4.0).bits == 4 and isinstance(Rate(bits=4.0).bits, int)


def test_rate_parse_and_label():
    assert Rate.parse("k=32") == Rate(k=32)
    assert Rate.parse("lambda=0.01") == Rate(lam=0.01)
    assert Rate.parse("target-bits=3.5") == Rate(target_bits=3.5)
    assert Rate.parse("bits=4").label() == "bits=4" and Rate(lam=0.1).label() == "lambda=0.1"
    with pytest.raises(OptionError, match="not NAME=VALUE"):
        Rate.parse("32")
    with pytest.raises(OptionError, match="'x' is not a number"):
        Rate.parse("k=x")


ROUND_TRIPS = [
    dict(),
    dict(method="kmeans", k=8, seed=3, name="small"),
    dict(
        method="ecsq",
        lam=0.05,
        scope="channel-group",
        group_size=2,
        hessian="hutchinson",
        hessian_samples=64,
        hessian_batch_size=8,
        include_biases=True,
        extra_ops=["Gather", "LSTM"],
    ),
    dict(method="hkmeans", bits=3, scope="layer", hessian="adam", adam_state="adam.npz"),
    dict(
        hessian="h.npz",
        finetune_epochs=0.5,
        train_data="train.npz",
        finetune_lr=1e-3,
        output="logits",
    ),
]


@pytest.mark.parametrize("keywords", ROUND_TRIPS)
def test_to_dict_from_dict_round_trip_through_json(keywords):
    options = CompressOptions.from_keywords(**keywords)
    settings = json.loads(json.dumps(options.to_dict()))
    assert settings == options.to_dict()
    again = CompressOptions.from_dict(settings)
    assert again == options and again.to_dict() == settings
    assert CompressOptions.from_keywords(**settings) == options  # the keyword form, whole


def test_in_memory_inputs_serialise_as_supplied_and_must_be_given_again(convnet_data):
    diag = {"conv.weight": np.ones((3, 1, 3, 3), np.float32)}
    options = CompressOptions.from_keywords(
        hessian=diag, finetune_epochs=1, train_data=convnet_data
    )
    settings = options.to_dict()
    assert settings["hessian"] == "supplied" and settings["train_data"] == "supplied"
    with pytest.raises(OptionError, match="hessian was supplied in memory"):
        CompressOptions.from_dict(settings)
    again = CompressOptions.from_keywords(
        **{**settings, "hessian": diag, "train_data": convnet_data}
    )
    assert again == options  # in-memory inputs compare by identity
    assert again != CompressOptions.from_keywords(
        **{**settings, "hessian": dict(diag), "train_data": convnet_data}
    )
    with pytest.raises(OptionError, match="settings key 'colour'"):
        CompressOptions.from_dict({**CompressOptions().to_dict(), "colour": "red"})


@needs_training
def test_a_reports_settings_re_run_it(convnet_file, convnet_data, tmp_path):
    train = tmp_path / "train.npz"
    save_data(train, convnet_data.inputs, convnet_data.labels)
    first = onnxhq.compress(
        convnet_file,
        convnet_data,
        method="hkmeans",
        k=6,
        scope="channel-group",
        group_size=2,
        hessian_samples=16,
        hessian_batch_size=4,
        include_biases=True,
        finetune_epochs=0.5,
        train_data=str(train),
        finetune_lr=2e-4,
        seed=7,
        name="again",
    )
    settings = json.loads(json.dumps(first.report.settings))
    assert settings == CompressOptions.from_dict(settings).to_dict()
    assert {settings[k] for k in ("seed", "hessian_samples", "group_size", "finetune_lr")} == {
        7,
        16,
        2,
        2e-4,
    }
    second = onnxhq.compress(
        convnet_file, convnet_data, options=CompressOptions.from_dict(settings)
    )
    assert second.artifacts == first.artifacts
    assert second.report == first.report


def test_sweep_points_keep_their_whole_settings(convnet_file, convnet_data):
    result = onnxhq.sweep(
        convnet_file,
        convnet_data,
        eval_data=convnet_data,
        rates=[Rate(k=4), Rate(k=8)],
        hessian_samples=16,
        seed=2,
    )
    for point in result.points:
        options = CompressOptions.from_dict(point.report.settings)
        assert options.rate == Rate(k=point.value) and options.hessian.samples == 16
        again = onnxhq.compress(convnet_file, convnet_data, options=options)
        assert again.report.layers == point.report.layers
    with pytest.raises(OptionError, match="exactly one rate; got k, lam"):
        onnxhq.sweep(
            convnet_file, convnet_data, eval_data=convnet_data, rates=[Rate(k=4), Rate(lam=0.1)]
        )


def test_the_vocabularies_are_the_librarys():
    from onnxhq import hessian, model, options, prune, quantize

    assert tuple(hessian.METHODS) == options.HESSIAN_METHODS
    assert tuple(quantize.METHODS) == options.METHODS
    assert tuple(quantize.SCOPES) == options.SCOPES
    assert tuple(prune.CRITERIA) == options.PRUNE_CRITERIA
    assert tuple(prune.SCOPES) == options.PRUNE_SCOPES
    assert set(options.EXTRA_OPS) == set(model.OPTIONAL_WEIGHT_SLOTS)


def test_importing_the_options_is_light():
    code = (
        "import sys, onnxhq.options, onnxhq.cli; heavy = [m for m in ('numpy', 'onnx', "
        "'onnxruntime') if m in sys.modules]; assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
