"""Hessian-diagonal estimators converge to exact targets computed in closed form on a small MLP.

The MLP ``logits = W2 tanh(W1 x + b1) + b2`` (8 -> 16 -> 5, 229 parameters) is smooth, so its
Jacobian ``J`` and the second derivatives of its logits are written out in numpy (float64). From
them: the Fisher ``J^T (diag p - p p^T) J``, the Gauss-Newton ``J^T J``, the Hessian of the mean
cross-entropy (Fisher + sum_k (p_k - y_k) d2 z_k), and the empirical Fisher. The reference itself
is checked against onnxruntime's logits and against finite differences of the engine's gradients.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import small_convnet
from onnx import helper, numpy_helper

from onnxhq import hessian
from onnxhq.data import Dataset
from onnxhq.errors import ConfigError, DataError, ModelError, NumericalError
from onnxhq.training.engine import GradientEngine, ProjectionEngine

ORDER = ("w1", "b1", "w2", "b2")
MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 8] input) => (float[N, 5] logits) {
    a = Gemm <transB = 1> (input, w1, b1)
    h = Tanh(a)
    logits = Gemm <transB = 1> (h, w2, b2)
}
"""


def make_mlp(
    seed: int = 0, text: str = MLP, **override: np.ndarray
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(0, 0.5, (16, 8)),
        "b1": rng.normal(0, 0.2, 16),
        "w2": rng.normal(0, 0.6, (5, 16)),
        "b2": rng.normal(0, 0.2, 5),
    }
    params = {k: np.asarray(override.get(k, v), np.float32) for k, v in params.items()}
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
    return model, {k: v.astype(np.float64) for k, v in params.items()}


def reference(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Exact diagonals (flattened in ORDER) and logits of the MLP on x (N, 8), labels y (N,)."""
    x = x.astype(np.float64)
    n, classes, hidden = len(x), 5, 16
    h = np.tanh(x @ p["w1"].T + p["b1"])
    z = h @ p["w2"].T + p["b2"]
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    d1, d2 = 1 - h**2, -2 * h * (1 - h**2)  # tanh' and tanh''
    jw2 = np.zeros((n, classes, classes, hidden))
    jw2[:, np.arange(classes), np.arange(classes), :] = h[:, None, :]
    jac = np.concatenate(
        [  # J[n, k, i] = d z_k / d w_i
            (p["w2"][None, :, :, None] * d1[:, None, :, None] * x[:, None, None, :]).reshape(
                n, classes, -1
            ),
            p["w2"][None] * d1[:, None, :],
            jw2.reshape(n, classes, -1),
            np.broadcast_to(np.eye(classes), (n, classes, classes)),
        ],
        axis=2,
    )
    second = np.concatenate(
        [  # d2 z_k / d w_i^2; zero for the output layer
            (p["w2"][None, :, :, None] * d2[:, None, :, None] * x[:, None, None, :] ** 2).reshape(
                n, classes, -1
            ),
            p["w2"][None] * d2[:, None, :],
            np.zeros((n, classes, classes * hidden + classes)),
        ],
        axis=2,
    )
    residual = prob - np.eye(classes)[y]
    fisher = (prob[:, :, None] * jac**2).sum(1) - (prob[:, :, None] * jac).sum(1) ** 2
    return {
        "logits": z,
        "fisher": fisher.mean(0),
        "gn": (jac**2).sum(1).mean(0),
        "hessian": fisher.mean(0) + (residual[:, :, None] * second).sum(1).mean(0),
        "empirical": ((residual[:, :, None] * jac).sum(1) ** 2).mean(0),
    }


def flat(diag: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(diag[k], np.float64).ravel() for k in ORDER])


def rel_error(estimate: dict[str, np.ndarray], exact: np.ndarray) -> float:
    return float(np.linalg.norm(flat(estimate) - exact) / np.linalg.norm(exact))


@pytest.fixture(scope="module")
def mlp():
    model, params = make_mlp()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.integers(0, 5, 64)
    return model, params, Dataset({"input": x}, y), reference(params, x, y)


@pytest.fixture(scope="module")
def engine(mlp):
    return GradientEngine(mlp[0])


# --- the reference is right -----------------------------------------------------------------------


def test_reference_logits_match_onnxruntime(mlp, engine):
    _, _, data, ref = mlp
    np.testing.assert_allclose(engine.logits(data.inputs), ref["logits"], atol=1e-5)


def test_reference_hessian_equals_finite_differences_of_engine_gradients(mlp, engine):
    _, params, data, ref = mlp
    step, fd = 1e-2, []
    for name in ORDER:
        for index in np.ndindex(params[name].shape):
            plus, minus = params[name].astype(np.float32), params[name].astype(np.float32)
            plus[index] += step
            minus[index] -= step
            _, g_plus = engine.loss_and_gradients(data.inputs, data.labels, {name: plus})
            _, g_minus = engine.loss_and_gradients(data.inputs, data.labels, {name: minus})
            fd.append((float(g_plus[name][index]) - float(g_minus[name][index])) / (2 * step))
    np.testing.assert_allclose(
        fd, ref["hessian"], rtol=1e-2, atol=1e-4 * np.abs(ref["hessian"]).max()
    )
    assert (ref["hessian"] < 0).any(), (
        "the MLP should have some negative curvature for hutchinson's clipping"
    )


# --- estimators converge to their exact targets ---------------------------------------------------


@pytest.mark.parametrize("method,target", [("fisher", "fisher"), ("gauss_newton", "gn")])
def test_batched_estimators_converge_to_their_exact_targets(mlp, engine, method, target):
    """Fisher to the exact Fisher, Gauss-Newton to the exact diag(J^T J)."""
    model, _, data, ref = mlp
    view = engine if method == "fisher" else ProjectionEngine(model)
    estimator = getattr(hessian, method)
    few = rel_error(estimator(view, data, samples=256, batch_size=8, seed=3), ref[target])
    many = rel_error(estimator(view, data, samples=16384, batch_size=8, seed=3), ref[target])
    assert many < 0.06
    assert many < few / 3


def test_batched_fisher_matches_per_sample_fisher_within_sampling_error(mlp, engine):
    """B * g_batch^2 is unbiased for the Fisher because sampled-label scores have zero mean."""
    _, _, data, ref = mlp
    per_sample = hessian.fisher(engine, data, samples=4096, batch_size=1, seed=5)
    batched = hessian.fisher(engine, data, samples=16384, batch_size=8, seed=6)
    whole = hessian.fisher(engine, data, samples=64 * 512, batch_size=64, seed=7)
    assert rel_error(per_sample, ref["fisher"]) < 0.08
    for estimate in (batched, whole):
        assert rel_error(estimate, ref["fisher"]) < 0.08
        assert rel_error(estimate, flat(per_sample)) < 0.12


def test_hutchinson_converges_to_the_clipped_exact_hessian(mlp, engine):
    _, _, data, ref = mlp
    target = np.maximum(ref["hessian"], 0)
    few = rel_error(
        hessian.hutchinson(engine, data, samples=64 * 16, batch_size=64, seed=3), target
    )
    many = rel_error(
        hessian.hutchinson(engine, data, samples=64 * 2048, batch_size=64, seed=3), target
    )
    assert many < 0.1
    assert many < few / 3


def test_empirical_fisher_is_the_mean_of_squared_per_sample_gradients(mlp, engine):
    _, _, data, ref = mlp
    by_hand = {k: 0.0 for k in ORDER}
    for i in range(len(data)):
        _, g = engine.loss_and_gradients(
            {"input": data.inputs["input"][i : i + 1]}, data.labels[i : i + 1]
        )
        by_hand = {k: by_hand[k] + np.square(g[k], dtype=np.float64) / len(data) for k in ORDER}
    estimate = hessian.empirical_fisher(engine, data, samples=10_000)  # capped at the 64 samples
    np.testing.assert_allclose(flat(estimate), flat(by_hand), rtol=1e-5)
    np.testing.assert_allclose(flat(estimate), ref["empirical"], rtol=1e-3, atol=1e-7)


def test_gauss_newton_does_not_depend_on_the_output_layout(mlp):
    model, _, data, _ = mlp
    reshaped, _ = make_mlp(
        text=MLP.replace("float[N, 5] logits", "float[N, 1, 5] out").replace(
            "}",
            "    shape = Constant <value = int64[3] {-1, 1, 5}> ()\n"
            "    out = Reshape(logits, shape)\n}",
        )
    )
    a = hessian.gauss_newton(ProjectionEngine(model), data, samples=256, seed=1)
    b = hessian.gauss_newton(
        ProjectionEngine(reshaped, params=list(ORDER)), data, samples=256, seed=1
    )
    for k in ORDER:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5)


def test_gauss_newton_handles_batchnorm(convnet_inputs):
    model = small_convnet()
    rng = np.random.default_rng(0)
    bn = {
        f"bn.{k}": v.astype(np.float32)
        for k, v in dict(
            scale=rng.uniform(0.5, 2, 3),
            bias=rng.normal(size=3),
            mean=rng.normal(size=3),
            var=rng.uniform(0.5, 2, 3),
        ).items()
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in bn.items())
    conv = model.graph.node[0]
    conv.output[0] = "c0"
    model.graph.node.insert(
        1, helper.make_node("BatchNormalization", ["c0", *bn], ["c"], name="bn")
    )
    diag = hessian.gauss_newton(
        ProjectionEngine(model), Dataset({"input": convnet_inputs[0]}), samples=64
    )
    assert set(diag) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}


# --- adam -----------------------------------------------------------------------------------------


def test_adam_importance_is_the_square_root_of_the_second_moment(tmp_path):
    v = {
        "w": np.array([[4.0, 9.0], [0.25, 0.0]], np.float32),
        "b": np.array([1.0], np.float32),
        "extra": np.ones(3),
    }
    np.savez(tmp_path / "adam.npz", **v)
    for source in (v, tmp_path / "adam.npz"):
        out = hessian.adam(source, {"w": (2, 2), "b": (1,)})
        assert set(out) == {"w", "b"}
        np.testing.assert_allclose(
            out["w"], [[2, 3], [0.5, 3e-8]], rtol=1e-6
        )  # zero floored at 1e-8 * max


@pytest.mark.parametrize(
    "state, message",
    [
        ({"b": np.ones(1)}, "no entry for weight 'w'"),
        (
            {"w": np.ones((3, 2)), "b": np.ones(1)},
            r"'w' has shape \(3, 2\), the model's weight has \(2, 2\)",
        ),
        ({"w": -np.ones((2, 2)), "b": np.ones(1)}, "'w' has 4 negative entries"),
        ({"w": np.full((2, 2), np.nan), "b": np.ones(1)}, "'w' has 4 non-finite entries"),
    ],
)
def test_adam_state_that_does_not_match_is_a_data_error(state, message):
    with pytest.raises(DataError, match=message):
        hessian.adam(state, {"w": (2, 2), "b": (1,)})


def test_estimate_adam_checks_names_against_the_model(mlp, tmp_path):
    model = mlp[0]
    np.savez(tmp_path / "adam.npz", w1=np.ones((16, 8)), b1=np.ones(16))
    out = hessian.estimate(
        "adam", None, None, params=["w1"], adam_state=tmp_path / "adam.npz", model=model
    )
    np.testing.assert_array_equal(out["w1"], 1)
    with pytest.raises(DataError, match="no entry for weight 'w2'"):
        hessian.estimate(
            "adam", None, None, params=["w1", "w2"], adam_state=tmp_path / "adam.npz", model=model
        )


# --- floors, non-finite values, outputs -----------------------------------------------------------


def test_zero_entries_are_floored_relative_to_the_largest(mlp):
    _, params, data, _ = mlp
    w2 = params["w2"].copy()
    w2[:, 3] = 0  # hidden unit 3 reaches no output: its incoming weights get zero gradient
    model, _ = make_mlp(w2=w2)
    diag = hessian.fisher(GradientEngine(model), data, samples=128)
    peak = max(float(v.max()) for v in diag.values())
    np.testing.assert_allclose(diag["w1"][3], peak * 1e-8, rtol=1e-6)
    assert diag["b1"][3] == pytest.approx(peak * 1e-8, rel=1e-6)
    assert (diag["w1"][[0, 1, 2]] > peak * 1e-6).all()


def test_non_finite_diagonal_is_a_numerical_error_naming_the_tensor():
    with pytest.raises(
        NumericalError, match=r"'fc\.weight' has 1 non-finite entries \(first at index \(0, 1\)"
    ):
        hessian.finalize({"a": np.ones(3), "fc.weight": np.array([[1.0, np.inf]])})
    with pytest.raises(NumericalError, match="every Hessian diagonal entry is zero"):
        hessian.finalize({"a": np.zeros(3)})


def test_non_finite_gradient_is_a_numerical_error_naming_the_tensor():
    """sqrt(w) has an infinite derivative at w = 0 while the loss stays finite."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        m (float[N, 2] input) => (float[N, 2] logits) {
            root = Sqrt(w)
            logits = MatMul(input, root)
        }""")
    model.graph.initializer.append(
        numpy_helper.from_array(np.array([[0.0, 1], [1, 1]], np.float32), "w")
    )
    data = Dataset({"input": np.ones((4, 2), np.float32)}, np.zeros(4, np.int64))
    with pytest.raises(NumericalError, match="gradient of 'w' has"):
        hessian.fisher(GradientEngine(model), data, samples=4)


def test_softmax_output_gives_the_same_fisher_as_its_logits(mlp, engine):
    _, _, data, _ = mlp
    prob, _ = make_mlp(
        text=MLP.replace("logits = Gemm", "z = Gemm").replace("}", "    logits = Softmax(z)\n}")
    )
    a = hessian.fisher(engine, data, samples=128, seed=2)
    b = hessian.fisher(GradientEngine(prob), data, samples=128, seed=2)
    for k in ORDER:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-9)


def test_probabilities_without_a_softmax_node_are_refused_naming_the_output(mlp):
    _, _, data, _ = mlp
    text = (
        MLP.replace("=> (float[N, 5] logits)", "=> (float[N, 5] probs, float[N, 5] logits)")
        .replace(
            "}",
            "    e = Exp(logits)\n    s = ReduceSum <keepdims = 1> (e, axes)\n"
            "    probs = Div(e, s)\n}",
        )
        .replace("a = Gemm", "axes = Constant <value = int64[1] {1}> ()\n    a = Gemm")
    )
    model, _ = make_mlp(text=text)
    with pytest.raises(
        DataError, match=r"output 'probs' holds probabilities.*--output-name.*gauss-newton"
    ):
        hessian.estimate("fisher", GradientEngine(model), data, params=list(ORDER), samples=16)
    named = hessian.estimate(
        "fisher", GradientEngine(model, output="logits"), data, params=["w2"], samples=16
    )
    assert set(named) == {"w2"}


# --- estimate -------------------------------------------------------------------------------------


def test_estimate_dispatches_and_reports_progress(mlp, engine):
    _, _, data, _ = mlp
    assert hessian.estimate("none", None, None, params=["w1"]) is None
    calls = []
    for method in ("fisher", "empirical-fisher", "hutchinson", "gauss-newton"):
        diag = hessian.estimate(
            method,
            engine,
            data,
            params=["w1", "b2"],
            samples=40,
            seed=1,
            progress=lambda done, total: calls.append((done, total)),
        )
        assert set(diag) == {"w1", "b2"}
        assert all(
            v.dtype == np.float32 and v.shape == engine.values[k].shape and (v > 0).all()
            for k, v in diag.items()
        )
        assert calls[-1] == (40, 40)
    again = hessian.estimate("fisher", engine, data, params=["w1", "b2"], samples=40, seed=1)
    np.testing.assert_array_equal(
        again["w1"],
        hessian.estimate("fisher", engine, data, params=["w1"], samples=40, seed=1)["w1"],
    )


def test_estimate_refuses_bad_options(mlp, engine):
    _, _, data, _ = mlp
    unlabelled = Dataset(data.inputs)
    with pytest.raises(ConfigError, match="unknown Hessian method 'lbfgs'"):
        hessian.estimate("lbfgs", engine, data, params=["w1"])
    with pytest.raises(DataError, match="'hutchinson' Hessian needs the true labels"):
        hessian.estimate("hutchinson", engine, unlabelled, params=["w1"])
    with pytest.raises(DataError, match="'empirical-fisher' Hessian needs the true labels"):
        hessian.empirical_fisher(engine, unlabelled)
    with pytest.raises(
        DataError, match=r"labels range over \[0, 7\] but the model scores 5 classes"
    ):
        hessian.hutchinson(engine, Dataset(data.inputs, np.arange(64) % 8))
    with pytest.raises(ConfigError, match="rel_step applies to the 'hutchinson' Hessian only"):
        hessian.estimate("fisher", engine, data, params=["w1"], rel_step=1e-3)
    with pytest.raises(ConfigError, match="samples=0 must be a positive integer"):
        hessian.estimate("fisher", engine, data, params=["w1"], samples=0)
    with pytest.raises(ConfigError, match="needs an Adam second-moment state"):
        hessian.estimate("adam", engine, None, params=["w1"])
    with pytest.raises(ModelError, match="no output 'nope'"):
        hessian.estimate("gauss-newton", None, data, params=["w1"], model=mlp[0], output="nope")
