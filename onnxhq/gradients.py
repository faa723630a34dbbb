"""The gradient engine: loss and weight gradients of any classifier ONNX model, via onnxruntime.

The training view of a model is built once: its local functions are inlined, the chosen
parameters become graph inputs, a ``SoftmaxCrossEntropyLoss`` (mean over the batch) is attached to
its class-score output, and onnxruntime-training's ``GradientGraphBuilder`` adds the backward
pass. A plain ``InferenceSession`` then returns the loss and ``<param>_grad`` for each parameter.

Labels are given, or sampled from the model's own softmax (what the Fisher needs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError, NumericalError
from .model import initializer_map, read_initializers, runtime_inputs, static_shape, value_info_map
from .runtime import make_session

log = logging.getLogger(__name__)

LOSS = "onnxhq_loss"
LABELS = "onnxhq_labels"


def grad_name(param: str) -> str:
    """Name of the gradient output the builder gives parameter ``param``."""
    return f"{param}_grad"


def class_score_output(model: onnx.ModelProto, output: str | None = None) -> tuple[str, bool]:
    """The output that holds class scores, and whether it holds probabilities rather than logits.

    Default: the first graph output of rank 2. Probabilities are recognised by a producing
    ``Softmax`` node; the engine then takes the Softmax input as the logits.
    """
    outputs = [o.name for o in model.graph.output]
    if output is not None:
        if output not in outputs:
            raise ModelError(f"the model has no output {output!r}; its outputs are {', '.join(outputs)}")
        chosen = output
    else:
        floats = [o for o in model.graph.output if o.type.HasField("tensor_type")
                  and o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)]
        ranked = [o.name for o in floats if len(static_shape(o)) == 2]
        # Outputs whose rank the file does not record may be the scores too; the loss checks the rank.
        ranked = ranked or [o.name for o in floats if not o.type.tensor_type.HasField("shape")]
        if not ranked:
            raise ModelError(f"no output of rank 2 (N, classes) among {', '.join(outputs)}; "
                             "name the class-score output explicitly")
        chosen = ranked[0]
    producer = next((n for n in model.graph.node if chosen in n.output), None)
    is_prob = producer is not None and producer.op_type in ("Softmax",)
    return chosen, is_prob


def logits_tensor(model: onnx.ModelProto, output: str | None = None) -> str:
    """The tensor to attach the loss to: the class-score output, or the input of its Softmax."""
    chosen, is_prob = class_score_output(model, output)
    if not is_prob:
        return chosen
    producer = next(n for n in model.graph.node if chosen in n.output)
    axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
    if axis not in (-1, 1):
        raise ModelError(f"output {chosen!r} is a Softmax over axis {axis}; onnxhq needs class scores on axis 1")
    log.info("output %r holds probabilities; using the Softmax input %r as logits", chosen, producer.input[0])
    return producer.input[0]


def build_training_model(model: onnx.ModelProto, params: Iterable[str], *, output: str | None = None) -> onnx.ModelProto:
    """The model with ``params`` as graph inputs and a mean cross-entropy loss output ``onnxhq_loss``."""
    params = list(params)
    m = onnx.inliner.inline_local_functions(model) if model.functions else _copy(model)
    frozen_batchnorm_as_affine(m)
    logits = logits_tensor(m, output)
    inits = initializer_map(m)
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(f"cannot differentiate {missing[0]!r}: it is not an initializer of the model")
    not_f32 = [p for p in params if inits[p].data_type != TensorProto.FLOAT]
    if not_f32:
        kind = TensorProto.DataType.Name(inits[not_f32[0]].data_type)
        raise ModelError(f"weight {not_f32[0]!r} is {kind}; the gradient engine (Hessian, pruning, fine-tuning) "
                         "needs float32 weights: convert the model to float32, or use --method kmeans, which "
                         "needs no gradients")
    keep = [t for t in m.graph.initializer if t.name not in set(params)]
    moved = [inits[p] for p in params]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for t in moved:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.graph.input.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["N"]))
    m.graph.node.append(helper.make_node("SoftmaxCrossEntropyLoss", [logits, LABELS], [LOSS, "onnxhq_log_prob"],
                                         name="onnxhq_loss_node", reduction="mean"))
    add_gradient_outputs(m)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))
    return m


def forward_model(model: onnx.ModelProto, params: Iterable[str], logits: str) -> onnx.ModelProto:
    """The model with ``params`` as graph inputs and ``logits`` as its only output (no loss)."""
    params = set(params)
    m = _copy(model)
    moved = [t for t in m.graph.initializer if t.name in params]
    keep = [t for t in m.graph.initializer if t.name not in params]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    return m


def default_params(model: onnx.ModelProto) -> list[str]:
    """Every float32 initializer except those read only by BatchNormalization (which stay frozen)."""
    frozen = batchnorm_params(model)
    return [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in frozen]


def batchnorm_params(model: onnx.ModelProto) -> set[str]:
    """Initializers read only as BatchNormalization scale, bias, mean or variance."""
    bn_inputs = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[1:5]}
    other_inputs = {i for n in model.graph.node if n.op_type != "BatchNormalization" for i in n.input}
    return bn_inputs - other_inputs


def frozen_batchnorm_as_affine(model: onnx.ModelProto) -> int:
    """Replace inference-mode BatchNormalization by ``x * s + t`` with constant per-channel s, t, in place.

    onnxruntime-training 1.19 has no gradient for BatchNormalization; at inference it is exactly this
    affine map, which has one. Statistics and BN parameters stay fixed. Returns the nodes replaced.
    """
    inits = initializer_map(model)
    ranks = _ranks(model)
    nodes, added, replaced = [], [], 0
    for node in model.graph.node:
        training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        if node.op_type != "BatchNormalization" or training or not all(i in inits for i in node.input[1:5]):
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in node.input[1:5])
        s = scale / np.sqrt(var + eps)
        t = bias - mean * s
        tail = (1,) * max(ranks.get(node.input[0], 4) - 2, 0)
        s_name, t_name = f"{node.output[0]}__onnxhq_bn_scale", f"{node.output[0]}__onnxhq_bn_shift"
        added += [numpy_helper.from_array(s.reshape(-1, *tail).astype(np.float32), s_name),
                  numpy_helper.from_array(t.reshape(-1, *tail).astype(np.float32), t_name)]
        scaled = f"{node.output[0]}__onnxhq_bn_scaled"
        nodes += [helper.make_node("Mul", [node.input[0], s_name], [scaled], name=f"{node.name}_scale"),
                  helper.make_node("Add", [scaled, t_name], [node.output[0]], name=f"{node.name}_shift")]
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(added)
    return replaced


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here; unknown ranks default to 4 (NCHW)
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in value_info_map(inferred).values()
            if v.type.tensor_type.HasField("shape")}


def add_gradient_outputs(m: onnx.ModelProto) -> None:
    """Give LayerNormalization its Mean/InvStdDev outputs: the builder needs them for the gradient."""
    for i, node in enumerate(m.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            base = node.output[0]
            while len(node.output) < 3:
                node.output.append(f"{base}__onnxhq_ln_aux{len(node.output)}_{i}")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def build_gradient_model(training_model: onnx.ModelProto, params: list[str]) -> onnx.ModelProto:
    """Run onnxruntime-training's GradientGraphBuilder; outputs are the loss and ``<param>_grad``."""
    import onnxruntime
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    onnxruntime.set_default_logger_severity(3)
    try:
        with _native_stderr_silenced():  # the builder logs every graph transformer at INFO, ignoring severity
            builder = GradientGraphBuilder(training_model.SerializeToString(), {LOSS}, set(params), LOSS)
            builder.build()
        grad_model = onnx.load_from_string(builder.get_model())
    except Exception as exc:  # the builder raises RuntimeError/Fail with C++ messages
        raise ModelError(f"onnxruntime could not build a gradient graph for this model: {str(exc).strip()[:300]}") from None
    have = {o.name for o in grad_model.graph.output}
    missing = [p for p in params if grad_name(p) not in have]
    if missing:
        raise ModelError(f"no gradient flows to {missing[0]!r}; it does not influence the class-score output")
    return grad_model


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while native code runs (Python's sys.stderr is untouched)."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class SessionEngine:
    """What the gradient views share: the model, the parameters they differentiate (initializer
    names; default `default_params`), their current values, and a forward and a backward session."""

    model: onnx.ModelProto
    params: list[str] | None = None
    output: str | None = None
    threads: int = 0
    _grad_session: object = field(init=False, repr=False)
    _forward_session: object = field(init=False, repr=False)

    def _bind_params(self) -> None:
        self.params = default_params(self.model) if self.params is None else list(self.params)
        self.values = read_initializers(self.model, self.params)
        self.inputs = [i.name for i in runtime_inputs(self.model)]


@dataclass
class GradientEngine(SessionEngine):
    """Loss and gradients of ``model`` with respect to ``params``.

    Values of the parameters are those of the model unless overridden per call. The forward
    session gives logits (for sampling labels), the backward one the mean cross-entropy and its
    gradients.
    """

    def __post_init__(self) -> None:
        self._bind_params()
        training = build_training_model(self.model, self.params, output=self.output)
        grad_model = build_gradient_model(training, self.params)
        self._grad_outputs = [LOSS] + [grad_name(p) for p in self.params]
        self._grad_session = make_session(grad_model, threads=self.threads)
        self.logits_name = logits_tensor(self.model, self.output)
        self._forward_session = make_session(forward_model(self.model, self.params, self.logits_name),
                                             threads=self.threads)

    def logits(self, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Class scores (N, C) before any softmax, at the current parameter values (or ``params``)."""
        feed = dict(inputs)
        feed.update(self.values if params is None else {**self.values, **params})
        return self._forward_session.run([self.logits_name], feed)[0]

    def sample_labels(self, inputs: Mapping[str, np.ndarray], rng: np.random.Generator,
                      params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Labels (N,) int64 drawn from the model's own softmax at the current (or given) parameters."""
        z = self.logits(inputs, params).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random((len(p), 1))
        return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1).astype(np.int64)

    def loss_and_gradients(self, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
                           params: Mapping[str, np.ndarray] | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy over the batch and its gradient for every parameter (same shapes)."""
        feed = dict(inputs)
        feed.update(self.values if params is None else {**self.values, **params})
        feed[LABELS] = np.asarray(labels, dtype=np.int64)
        out = self._grad_session.run(self._grad_outputs, feed)
        loss = float(out[0])
        grads = dict(zip(self.params, out[1:]))
        if not np.isfinite(loss):
            raise NumericalError(f"the loss is {loss}; check the inputs' scaling and the labels' range")
        return loss, grads

    def with_values(self, values: Mapping[str, np.ndarray]) -> None:
        """Make ``values`` the default parameter values for later calls (e.g. after training)."""
        self.values = {**self.values, **{k: np.asarray(v) for k, v in values.items()}}


# --- a small Adam, for training reference models and fine-tuning ------------------------------------

@dataclass(frozen=True)
class AdamState:
    """First and second moments (keyed like the parameters) after ``step`` updates."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int
    beta1: float = 0.9
    beta2: float = 0.999

    def second_moment(self) -> dict[str, np.ndarray]:
        """Bias-corrected second moment v-hat (the paper's Hessian alternative takes its square root)."""
        scale = 1.0 / (1.0 - self.beta2 ** max(self.step, 1))
        return {k: (v * scale).astype(np.float32) for k, v in self.v.items()}


def adam_init(params: Mapping[str, np.ndarray]) -> AdamState:
    zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()}
    return AdamState(m=zeros, v={k: z.copy() for k, z in zeros.items()}, step=0)


def adam_step(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], state: AdamState, *,
              lr: float, eps: float = 1e-8, masks: Mapping[str, np.ndarray] | None = None
              ) -> tuple[dict[str, np.ndarray], AdamState]:
    """One Adam update; returns new parameters and state (inputs are not mutated).

    ``masks`` (bool, True = keep) hold pruned entries at exactly zero.
    """
    t = state.step + 1
    b1, b2 = state.beta1, state.beta2
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = b1 * state.m[k] + (1 - b1) * g
        v = b2 * state.v[k] + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        q = p - lr * mhat / (np.sqrt(vhat) + eps)
        if masks is not None and k in masks:
            q = np.where(masks[k], q, 0.0)
        new_p[k], new_m[k], new_v[k] = q.astype(p.dtype), m.astype(np.float32), v.astype(np.float32)
    return new_p, AdamState(new_m, new_v, t, b1, b2)


def train(engine: GradientEngine, inputs: Mapping[str, np.ndarray], labels: np.ndarray, *, epochs: float,
          batch_size: int = 64, lr: float | Callable[[float], float] = 1e-3, seed: int = 0,
          masks: Mapping[str, np.ndarray] | None = None, state: AdamState | None = None,
          augment: Callable[[dict, np.random.Generator], dict] | None = None,
          progress: Callable[[int, int, float], None] | None = None) -> tuple[dict[str, np.ndarray], AdamState]:
    """Adam on mean cross-entropy over shuffled mini-batches; returns final parameters and Adam state.

    ``lr`` is a number or a function of the fraction of training done (0..1). ``progress`` is
    called with (step, total steps, loss).
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    params = {k: v.copy() for k, v in engine.values.items()}
    if masks is not None:
        params = {k: np.where(masks[k], v, 0).astype(v.dtype) if k in masks else v for k, v in params.items()}
    state = state or adam_init(params)
    steps_per_epoch = max(1, n // batch_size)
    total = int(round(epochs * steps_per_epoch))
    order = np.array([], dtype=np.int64)
    for step in range(total):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        batch, order = order[:batch_size], order[batch_size:]
        feed = {k: v[batch] for k, v in inputs.items()}
        if augment is not None:
            feed = augment(feed, rng)
        loss, grads = engine.loss_and_gradients(feed, labels[batch], params)
        rate = lr(step / total) if callable(lr) else lr
        params, state = adam_step(params, grads, state, lr=rate, masks=masks)
        if progress is not None:
            progress(step + 1, total, loss)
    engine.with_values(params)
    return params, state
