"""The gradient worker: frames round-trip exactly, its gradients equal central finite differences
and the in-process builder's, unchanged feeds are never stale, a dead worker or an aborting
builder is one ModelError line, newer opsets are converted down for it, and without a training
interpreter the error says how to get one."""

from __future__ import annotations

import io
import os
import signal
import sys

import numpy as np
import pytest
from conftest import small_convnet
from onnx import TensorProto, helper, numpy_helper
from training_support import needs_training, needs_training_build

from onnxhq.cli import main
from onnxhq.errors import ModelError
from onnxhq.runtime import make_session
from onnxhq.training import worker, worker_main
from onnxhq.training.engine import ENV_INPROCESS, gradient_session
from onnxhq.training.graph import LABELS, LOSS, build_training_model, grad_name

PARAMS = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]


def feed_of(model, x, y) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {"input": x, LABELS: y.astype(np.int64), **{p: values[p].copy() for p in PARAMS}}


def loss_of(model, feed) -> float:
    """The training view's loss, run by this interpreter's own onnxruntime (no gradients)."""
    view = build_training_model(model, PARAMS)
    return float(make_session(view).run([LOSS], feed)[0])


def test_frames_round_trip_exactly():
    arrays = {
        "op": np.array("run"),
        "id": np.int64(7),
        "x": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        "empty": np.zeros((0, 5), np.int64),
        "names": np.array(["a", "bcd"]),
        "half": np.array([1.5, -2], np.float16),
    }
    stream = io.BytesIO()
    worker_main.write_frame(stream, arrays)
    stream.seek(0)
    back = worker_main.read_frame(stream)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == np.shape(value), name
        np.testing.assert_array_equal(back[name], value)
    assert back["x"].flags.writeable
    # "id" starts 12 bytes in: copied to aligned memory (onnxruntime-training crashed on it)
    assert all(a.ctypes.data % worker_main.ALIGN == 0 for a in back.values() if a.size)
    assert worker_main.read_frame(stream) is None  # end of stream


def test_a_cut_frame_reads_as_the_end():
    stream = io.BytesIO()
    worker_main.write_frame(stream, {"x": np.ones(10)})
    stream = io.BytesIO(stream.getvalue()[:-3])
    assert worker_main.read_frame(stream) is None


@needs_training
def test_worker_gradients_equal_central_finite_differences(convnet, convnet_inputs):
    x, y = convnet_inputs
    session = gradient_session(build_training_model(convnet, PARAMS), PARAMS)
    assert isinstance(session, worker.RemoteSession) or os.environ.get(ENV_INPROCESS) == "1"
    feed = feed_of(convnet, x, y)
    out = session.run([LOSS] + [grad_name(p) for p in PARAMS], feed)
    assert float(out[0]) == pytest.approx(loss_of(convnet, feed), rel=1e-6)
    rng, eps = np.random.default_rng(0), 1e-2
    for name, grad in zip(PARAMS, out[1:]):
        for flat in rng.choice(grad.size, size=min(3, grad.size), replace=False):
            index = np.unravel_index(flat, grad.shape)
            moved = []
            for sign in (1, -1):
                value = feed[name].copy()
                value[index] += sign * eps
                moved.append(loss_of(convnet, {**feed, name: value}))
            fd = (moved[0] - moved[1]) / (2 * eps)
            assert grad[index] == pytest.approx(fd, rel=2e-2, abs=2e-4), (name, index)


@needs_training
@needs_training_build
def test_worker_gradients_equal_the_in_process_builder(convnet, convnet_inputs, monkeypatch):
    x, y = convnet_inputs
    view, fetch = build_training_model(convnet, PARAMS), [grad_name(p) for p in PARAMS]
    feed = feed_of(convnet, x, y)
    monkeypatch.setenv(ENV_INPROCESS, "0")
    remote = gradient_session(view, PARAMS).run(fetch, feed)
    monkeypatch.setenv(ENV_INPROCESS, "1")
    local = gradient_session(view, PARAMS).run(fetch, feed)
    for r, g in zip(remote, local):
        np.testing.assert_array_equal(r, g)


@needs_training
def test_a_feed_changed_in_place_is_sent_again(convnet, convnet_inputs):
    x, y = convnet_inputs
    session = worker.gradient_session(
        build_training_model(convnet, PARAMS).SerializeToString(), LOSS, PARAMS
    )
    feed = feed_of(convnet, x, y)
    before = float(session.run([LOSS], feed)[0])
    assert float(session.run([LOSS], feed)[0]) == before  # unchanged feeds, kept by the worker
    feed["fc.bias"][0] += 1.0  # the same array object, new values
    after = float(session.run([LOSS], feed)[0])
    assert after == pytest.approx(loss_of(convnet, feed), rel=1e-6)
    assert after != before


@needs_training
def test_a_killed_worker_is_one_model_error_line_and_the_next_session_restarts(
    convnet, convnet_inputs
):
    view = build_training_model(convnet, PARAMS).SerializeToString()
    session = worker.gradient_session(view, LOSS, PARAMS)
    os.kill(session.worker._proc.pid, signal.SIGKILL)
    session.worker._proc.wait()
    with pytest.raises(ModelError) as caught:
        session.run([LOSS], feed_of(convnet, *convnet_inputs))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the gradient worker stopped during 'run' (exit -9)")
    again = worker.gradient_session(view, LOSS, PARAMS)
    assert again.worker is not session.worker and again.worker.alive()


def model_with_if():
    """small_convnet whose logits pass an If node: the 1.19 builder aborts on it (native assert)."""
    model = small_convnet()
    model.graph.node[-1].output[0] = "raw"
    value = helper.make_tensor_value_info
    then = helper.make_graph(
        [helper.make_node("Identity", ["raw"], ["t"])],
        "then",
        [],
        [value("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["raw"], ["e"])], "else", [], [value("e", TensorProto.FLOAT, None)]
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["logits"], then_branch=then, else_branch=other)
    )
    return model


@needs_training
def test_a_builder_abort_is_one_model_error_line(monkeypatch):
    monkeypatch.delenv(ENV_INPROCESS, raising=False)
    view = build_training_model(model_with_if(), ["fc.weight"])
    with pytest.raises(ModelError) as caught:
        gradient_session(view, ["fc.weight"])
    message = str(caught.value)
    assert "\n" not in message
    assert "aborted building the gradient graph" in message
    assert message.endswith("use --hessian activations (forward passes only) or --hessian none")
    assert worker.shared_worker().alive()  # a new worker serves the next session


@needs_training
def test_an_opset_23_graph_is_converted_down_for_the_worker(convnet, convnet_inputs):
    newer = small_convnet()
    newer.opset_import[0].version = 23
    newer.ir_version = 11
    fetch = [LOSS] + [grad_name(p) for p in PARAMS]
    feed = feed_of(convnet, *convnet_inputs)
    got = worker.gradient_session(
        build_training_model(newer, PARAMS).SerializeToString(),
        LOSS,
        PARAMS,
        opset=23,
        ir_version=11,
    ).run(fetch, feed)
    want = worker.gradient_session(
        build_training_model(convnet, PARAMS).SerializeToString(), LOSS, PARAMS
    ).run(fetch, feed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@needs_training
def test_an_opset_the_converter_cannot_reach_is_one_line():
    model = small_convnet()
    model.opset_import[0].version = 99  # no converter adapters from there
    view = build_training_model(model, ["fc.bias"]).SerializeToString()
    with pytest.raises(ModelError, match=r"^the model uses opset 99; onnxruntime-training runs "):
        worker.gradient_session(view, LOSS, ["fc.bias"], opset=99)


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """No training interpreter reachable: no variable, an empty cache, not the training build."""
    monkeypatch.delenv(worker.ENV_PYTHON, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(worker, "has_training_build", lambda: False)
    monkeypatch.setattr(worker, "_shared", None)
    monkeypatch.delenv(ENV_INPROCESS, raising=False)


def test_without_a_training_interpreter_the_error_says_how_to_get_one(no_training, tmp_path):
    assert not worker.training_available()
    with pytest.raises(worker.TrainingUnavailable) as caught:
        worker.shared_worker()
    assert str(caught.value) == (
        "this Hessian or training step needs onnxruntime-training, kept apart from your "
        "onnxruntime: run 'onnxhq setup-training' once (a separate environment in "
        f"{tmp_path / 'onnxhq' / 'training'}) or set ONNXHQ_TRAINING_PYTHON to a python that "
        "has onnxruntime-training-cpu==1.19.2"
    )


def test_a_named_python_that_is_no_file_is_refused(no_training, monkeypatch, tmp_path):
    monkeypatch.setenv(worker.ENV_PYTHON, str(tmp_path / "nope"))
    assert not worker.training_available()
    with pytest.raises(worker.TrainingUnavailable, match=r"ONNXHQ_TRAINING_PYTHON=.*nope is not"):
        worker.shared_worker()


def test_a_python_that_cannot_serve_is_refused_at_the_handshake(no_training, monkeypatch, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named numpy' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(worker.ENV_PYTHON, str(fake))
    assert worker.training_available()  # found; only starting it tells
    with pytest.raises(worker.TrainingUnavailable) as caught:
        worker.shared_worker()
    assert str(caught.value).startswith(
        f"the gradient worker did not start in {fake} (ModuleNotFoundError: No module named "
        "numpy); a gradient needs onnxruntime-training"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as the interpreter")
def test_the_found_interpreter_follows_the_documented_order(no_training, monkeypatch, tmp_path):
    cached = worker.env_python(worker.cache_env())
    assert worker.find_training_python() is None
    cached.parent.mkdir(parents=True)
    cached.write_text("")
    assert worker.find_training_python() == str(cached)
    monkeypatch.setattr(worker, "has_training_build", lambda: True)
    assert worker.find_training_python() == sys.executable
    monkeypatch.setenv(worker.ENV_PYTHON, str(cached))
    assert worker.find_training_python() == str(cached)


def test_in_process_gradients_need_the_training_build(no_training, monkeypatch, convnet):
    monkeypatch.setenv(ENV_INPROCESS, "1")
    monkeypatch.setattr("onnxhq.training.engine.worker.has_training_build", lambda: False)
    with pytest.raises(worker.TrainingUnavailable, match="ONNXHQ_TRAINING_INPROCESS=1 but"):
        gradient_session(build_training_model(convnet, ["fc.bias"]), ["fc.bias"])


# --- onnxhq setup-training -------------------------------------------------------------------


@needs_training
def test_setup_training_finds_a_working_environment_without_installing(tmp_path, capsys):
    env = tmp_path / "env"
    python = worker.env_python(env)
    python.parent.mkdir(parents=True)
    python.symlink_to(worker.find_training_python())
    assert main(["setup-training", "--env", str(env)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"onnxruntime-training is ready: {python}",
        f"point onnxhq at it with: export ONNXHQ_TRAINING_PYTHON={python}",
    ]


def test_setup_training_with_an_interpreter_that_is_not_there_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-python"
    code = main(["setup-training", "--env", str(tmp_path / "env"), "--python", str(missing)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"onnxhq: error: cannot run {missing}: No such file or directory\n"
    )


@pytest.mark.slow
def test_setup_training_without_the_network_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # what pip sees offline: no package found
    env = tmp_path / "env"
    assert main(["setup-training", "--env", str(env), "--python", sys.executable]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"onnxhq: error: could not create the training environment in {env}: ")
    assert err.endswith("(it needs the network once, and a CPython 3.8-3.12 to create it with)\n")
