"""The Fisher of each output kind against numpy on tiny linear models, label-free.

For ``t = X W`` (``X`` of shape (N, T, D), every position a sample of the kind's distribution) the
diagonal Fisher of ``W[d, c]`` is ``mean_n sum_t X[n, t, d]^2 v[n, t, c]`` with ``v`` the variance
of the kind's residual: ``p (1 - p)`` for classes (softmax over the last axis) and for Bernoulli
(sigmoid), 1 for real outputs. The estimates draw their targets from the model; with enough draws
they must land on these values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import onnxhq
from onnxhq import hessian
from onnxhq.cli import main as cli_main
from onnxhq.data import Dataset
from onnxhq.errors import DataError, ModelError
from onnxhq.hessian.output_fisher import output_fisher, residual
from onnxhq.importances import estimate_hessian
from onnxhq.options import CompressOptions, OptionError
from onnxhq.outputs import reaching
from onnxhq.training.engine import GradientEngine, ProjectionEngine
from onnxhq.training.output_engine import OutputEngine

HEADS = {
    "classes": "z = MatMul(x, w)\n p = Softmax <axis = -1> (z)\n y = Identity(p)",
    "bernoulli": "z = MatMul(x, w)\n y = Sigmoid(z)",
    "real": "y = MatMul(x, w)",
}


def linear(head: str, w: np.ndarray, *, dims: str = "N, T, 3", out: str = "y") -> onnx.ModelProto:
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float {out}) {{ {head} }}""")
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return model


def exact(kind: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) @ w
    if kind == "classes":
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        v = p * (1 - p)
    elif kind == "bernoulli":
        s = 1 / (1 + np.exp(-z))
        v = s * (1 - s)
    else:
        v = np.ones_like(z)
    return np.einsum("ntd,ntc->dc", x.astype(np.float64) ** 2, v) / len(x)


@pytest.mark.parametrize(("kind", "classes"), [("classes", 4), ("bernoulli", 1), ("real", 2)])
def test_the_fisher_of_each_kind_matches_numpy(kind, classes):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.8, (3, classes)).astype(np.float32)
    x = rng.normal(size=(12, 5, 3)).astype(np.float32)
    engine = OutputEngine(linear(HEADS[kind], w), ["w"])
    assert engine.output.kind == kind
    got = output_fisher(engine, Dataset({"x": x}), samples=3000, batch_size=1, seed=3)["w"]
    want = exact(kind, x, w)
    np.testing.assert_allclose(got, want, rtol=0.1)


def test_rank_2_class_scores_draw_the_labels_of_the_cross_entropy_fisher():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.8, (3, 4)).astype(np.float32)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    model = linear("y = MatMul(x, w)", w, dims="N, 3", out="[N, 4] y")
    data = Dataset({"x": x})
    new = hessian.estimate("fisher", None, data, params=["w"], model=model, samples=64, seed=2)
    old = hessian.fisher(GradientEngine(model, params=["w"]), data, samples=64, seed=2)
    assert new is not None
    np.testing.assert_allclose(new["w"], old["w"], rtol=1e-4)


def test_the_real_kind_draws_exactly_the_gauss_newton_estimate():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.8, (3, 2)).astype(np.float32)
    model = linear(HEADS["real"], w)
    data = Dataset({"x": rng.normal(size=(16, 5, 3)).astype(np.float32)})
    draws = {"samples": 24, "batch_size": 4, "seed": 1}
    fisher = output_fisher(OutputEngine(model, ["w"], output="y:real"), data, **draws)
    gauss_newton = hessian.gauss_newton(ProjectionEngine(model, params=["w"]), data, **draws)
    np.testing.assert_allclose(fisher["w"], gauss_newton["w"], rtol=1e-5)


def test_residuals_have_the_kind_s_moments():
    rng = np.random.default_rng(4)
    t = np.array([[0.3, -1.0, 2.0]])
    draws = np.stack([residual("classes", t, rng) for _ in range(20000)])
    p = np.exp(t) / np.exp(t).sum()
    np.testing.assert_allclose(draws.mean(0), 0, atol=0.01)
    np.testing.assert_allclose(
        np.einsum("ki,kj->ij", draws[:, 0], draws[:, 0]) / len(draws),
        np.diag(p[0]) - np.outer(p[0], p[0]),
        atol=0.01,
    )
    flat = residual("classes", np.zeros((2, 3, 4)), rng, axis=1, flat=True)
    assert flat.shape == (2, 3, 4)
    np.testing.assert_allclose(flat.reshape(2, 12).sum(1), 0, atol=1e-12)  # one draw per sample
    assert set(np.unique(residual("real", t, rng))) <= {-1.0, 1.0}


def test_probabilities_without_a_softmax_are_refused_as_logits():
    w = np.full((3, 2), 0.1, np.float32)
    model = linear("z = MatMul(x, w)\n s = Softmax(z)\n y = Mul(s, one)", w)
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1), "one"))
    engine = OutputEngine(model, ["w"], output="y:classes")
    x = np.ones((2, 5, 3), np.float32)
    with pytest.raises(DataError, match=r"holds probabilities .* no Softmax node makes it"):
        output_fisher(engine, Dataset({"x": x}), samples=2)


def test_the_default_fisher_runs_on_an_skl2onnx_style_classifier():
    """skl2onnx writes ``label`` (int64) first and ``probabilities`` behind Softmax -> Identity."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (int64[N] label, float[N, 3] probabilities) {
      h = Gemm(x, w1, b1)
      a = Relu(h)
      z = Gemm(a, w2, b2)
      label = ArgMax <axis = 1, keepdims = 0> (z)
      p = Softmax <axis = 1> (z)
      probabilities = Identity(p)
    }""")
    rng = np.random.default_rng(5)
    shapes = {"w1": (4, 8), "b1": (8,), "w2": (8, 3), "b2": (3,)}
    model.graph.initializer.extend(
        numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k) for k, s in shapes.items()
    )
    data = Dataset({"x": rng.normal(size=(20, 4)).astype(np.float32)})
    diag = estimate_hessian(model, data, samples=40)
    assert set(diag) == {"w1", "w2"}
    assert all(np.isfinite(v).all() and (v > 0).all() for v in diag.values())
    old = hessian.fisher(GradientEngine(model, params=["w1", "w2"]), data, samples=40)
    for name in diag:
        np.testing.assert_allclose(diag[name], old[name], rtol=1e-4)


def two_heads() -> tuple[onnx.ModelProto, Dataset]:
    """A shared layer, then class probabilities (N, T, 4) and a real embedding (N, T, 2)."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T, 3] x) => (float probabilities, float embedding) {
      h = MatMul(x, w)
      a = Tanh(h)
      z = MatMul(a, wc)
      probabilities = Softmax <axis = -1> (z)
      embedding = MatMul(a, we)
    }""")
    rng = np.random.default_rng(6)
    shapes = {"w": (3, 5), "wc": (5, 4), "we": (5, 2)}
    model.graph.initializer.extend(
        numpy_helper.from_array(rng.normal(size=s).astype(np.float32), k) for k, s in shapes.items()
    )
    return model, Dataset({"x": rng.normal(size=(10, 6, 3)).astype(np.float32)})


def test_several_outputs_sum_their_fishers():
    model, data = two_heads()
    draws = {"samples": 24, "seed": 4}
    both = estimate_hessian(model, data, output=["probabilities", "embedding:real"], **draws)
    # each output sees the shared layer and its own head only
    classes = estimate_hessian(model, data, params=["w", "wc"], output="probabilities", **draws)
    real = estimate_hessian(model, data, params=["w", "we"], output="embedding:real", **draws)
    assert set(both) == {"w", "wc", "we"}
    np.testing.assert_allclose(both["w"], classes["w"] + real["w"], rtol=1e-5)
    np.testing.assert_allclose(both["wc"], classes["wc"], rtol=1e-5)
    np.testing.assert_allclose(both["we"], real["we"], rtol=1e-5)
    assert reaching(model, "z", ["we", "wc", "w"]) == ["wc", "w"]
    with pytest.raises(ModelError, match="'we' as it's unreachable"):  # the builder's word
        estimate_hessian(model, data, method="fisher", output="probabilities", **draws)


def test_several_outputs_are_refused_by_a_single_output_hessian():
    model, data = two_heads()
    with pytest.raises(OptionError, match="reads one output, and 2 were named"):
        estimate_hessian(model, data, method="gauss-newton", output=["probabilities", "embedding"])
    with pytest.raises(OptionError, match="must name each output once"):
        estimate_hessian(model, data, output=["embedding", "embedding:real"])


def test_compress_reads_several_outputs_and_reports_the_fidelity_of_each():
    model, data = two_heads()
    outputs = ("probabilities", "embedding:real")
    result = onnxhq.compress(
        model, data, hessian="activations", hessian_samples=8, output=outputs, eval_data=data
    )
    fidelity = result.report.fidelity
    assert {"agreement", "kl"} <= set(fidelity["probabilities"])
    assert {"cosine", "cosine_min", "sqnr_db"} <= set(fidelity["embedding"])
    settings = result.report.settings
    assert settings["output"] == list(outputs)
    assert CompressOptions.from_dict(settings).output == outputs
    with pytest.raises(OptionError, match="fine-tuning trains on the labels of one"):
        CompressOptions.from_keywords(output=list(outputs), finetune_epochs=1, train_data="t.npz")


def test_the_cli_takes_output_name_once_per_output(tmp_path, capsys):
    model, data = two_heads()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=data.inputs["x"])
    argv = ["hessian", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz"),
            "--method", "gauss-newton", "--output-name", "probabilities",
            "--output-name", "embedding:real", "-o", str(tmp_path / "h.npz")]  # fmt: skip
    assert cli_main(argv) == 2
    assert "Hessian reads one --output-name, and 2 were named" in capsys.readouterr().err
