"""The transformer-encoder tools: the export's sentences are deterministic, both tools find the
same folder, a missing model or torch is one line and a skip, and an exported model (where one
is on this machine) agrees with torch and its inputs are data onnxhq accepts."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tools import bench_encoder, export_encoder


def test_sentences_are_deterministic_and_differ_between_seeds():
    a, b = export_encoder.sentences(64, 0), export_encoder.sentences(64, 1)
    assert a == export_encoder.sentences(64, 0)
    assert a != b and len(set(a)) > 48  # varied, not a handful repeated
    assert all(s[0].isupper() and s[-1] in ".?" for s in a + b)


def test_both_tools_default_to_the_same_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(bench_encoder.ENV, str(tmp_path))
    assert export_encoder.default_out() == bench_encoder.default_dir() == tmp_path
    monkeypatch.delenv(bench_encoder.ENV)
    assert export_encoder.default_out() == bench_encoder.default_dir()


@pytest.mark.parametrize("smoke", [[], ["--smoke"]])
def test_bench_without_the_model_skips_in_one_line(tmp_path, capsys, smoke):
    assert bench_encoder.main(["--dir", str(tmp_path)] + smoke) == 0
    out = capsys.readouterr().out.strip()
    assert out.splitlines() == [out]
    assert out.startswith(f"skipped: {tmp_path / 'encoder.onnx'} is missing; make it with `make ")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_export_without_torch_says_where_to_run_it(capsys):
    assert export_encoder.main(["--smoke"]) == 0
    assert "no module 'torch'" in capsys.readouterr().out
    assert export_encoder.main([]) == 1
    assert "make encoder-env" in capsys.readouterr().err


EXPORTED = bench_encoder.default_dir()
needs_export = pytest.mark.skipif(
    not all((EXPORTED / f).is_file() for f in bench_encoder.FILES),
    reason=f"no exported encoder in {EXPORTED} (make encoder-env; tools.export_encoder)",
)


@needs_export
def test_exported_encoder_matches_torch_and_its_inputs_are_onnxhq_data():
    import onnxhq
    from onnxhq.model import load_model

    evals = bench_encoder.load(EXPORTED / "encoder_eval.npz")
    assert bench_encoder.check_export(EXPORTED, evals) < 1e-5
    data = onnxhq.load_data(EXPORTED / "encoder_data.npz", load_model(EXPORTED / "encoder.onnx"))
    assert set(data.inputs) == {"input_ids", "attention_mask"}
    assert all(v.dtype == np.int64 and v.shape == (128, 32) for v in data.inputs.values())
