"""The training view of a model: the graph edits that make its weights differentiable.

A training view is a copy of the model with its local functions inlined, inference-mode
BatchNormalization folded into an affine map, the ops the gradient builder cannot differentiate
rewritten into equal-valued ones (`onnxhq.differentiable.make_differentiable`), the chosen
parameters turned from initializers into graph inputs (`parameters_as_inputs`, the one place that
does it), and a scalar loss attached: the mean cross-entropy of the class scores
(`build_training_model`) or the projection ``sum(r * y)`` of any float tensor
(`build_projection_model`). onnxruntime-training's ``GradientGraphBuilder``
(`build_gradient_model`) then adds the backward pass: outputs are the loss and ``<param>_grad``
for each parameter. When it fails, `gradient_build_error` makes the one-line error.

Every tensor and node name these edits make is spelled here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from .. import naming
from ..differentiable import make_differentiable, parse_builder_error, unsupported_ops
from ..errors import ModelError
from ..fold import batchnorm_affine
from ..model import FLOAT_TYPES, initializer_map, value_info_map
from ..outputs import logits_tensor, projection_output
from .shapes import forget_unproven_dims

log = logging.getLogger(__name__)

#: The loss output of every training view.
LOSS = "onnxhq_loss"
#: The int64 (N,) labels input of the cross-entropy view.
LABELS = "onnxhq_labels"
#: The projection ``r`` input of the Gauss-Newton view, shaped like the projected output.
PROJECTION = "onnxhq_projection"
#: What the gradient errors suggest instead.
INSTEAD = "use --hessian activations (forward passes only) or --hessian none"
#: Input name -> its dims (None: symbolic, as the batch axis), pinned in the training views.
InputShapes = Mapping[str, Sequence[int | None]]


def grad_name(param: str) -> str:
    """Name of the gradient output the builder gives parameter ``param``."""
    return f"{param}_grad"


# --- which parameters -------------------------------------------------------------------------


def default_params(model: onnx.ModelProto) -> list[str]:
    """Every float32 initializer except those read only by BatchNormalization (kept frozen)."""
    frozen = batchnorm_params(model)
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and t.name not in frozen
    ]


def batchnorm_params(model: onnx.ModelProto) -> set[str]:
    """Initializers read only as BatchNormalization scale, bias, mean or variance."""
    nodes = model.graph.node
    bn_inputs = {i for n in nodes if n.op_type == "BatchNormalization" for i in n.input[1:5]}
    other_inputs = {i for n in nodes if n.op_type != "BatchNormalization" for i in n.input}
    return bn_inputs - other_inputs


def parameter_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shape of every float initializer (`onnxhq.model.FLOAT_TYPES`), keyed by name."""
    return {
        t.name: tuple(int(d) for d in t.dims)
        for t in model.graph.initializer
        if t.data_type in FLOAT_TYPES
    }


def codebook_names(rewritten: onnx.ModelProto) -> list[str]:
    """Initializers read as codebooks (input 0) by ``onnxhq`` dequantize nodes, in graph order.

    These are the parameters codebook fine-tuning trains.
    """
    inits = initializer_map(rewritten)
    names: list[str] = []
    for node in rewritten.graph.node:
        if node.domain != naming.DOMAIN or not node.input:
            continue
        book = node.input[0]
        if book in inits and book not in names:
            names.append(book)
    return names


# --- the views --------------------------------------------------------------------------------


def parameters_as_inputs(model: onnx.ModelProto, params: Iterable[str]) -> None:
    """Turn initializers ``params`` into graph inputs of the same type and shape, in place.

    Raises `ModelError` naming the first parameter that is not an initializer.
    """
    params = list(params)
    inits = initializer_map(model)
    missing = [p for p in params if p not in inits]
    if missing:
        raise ModelError(
            f"cannot differentiate {missing[0]!r}: it is not an initializer of the model"
        )
    moved = set(params)
    keep = [t for t in model.graph.initializer if t.name not in moved]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(
        helper.make_tensor_value_info(p, inits[p].data_type, list(inits[p].dims)) for p in params
    )


def build_training_model(
    model: onnx.ModelProto,
    params: Iterable[str],
    *,
    output: str | None = None,
    input_shapes: InputShapes | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with ``params`` as inputs, a labels input and the mean cross-entropy.

    The loss ``onnxhq_loss`` (float scalar, mean over the batch) is the only output; labels are
    the int64 (N,) input ``onnxhq_labels``. ``params`` must be float32. ``input_shapes`` pins
    input dims (see `onnxhq.differentiable.make_differentiable`).
    """
    params = list(params)
    m = _differentiable_copy(model, input_shapes)
    logits = logits_tensor(m, output)
    inits = initializer_map(m)
    not_f32 = [p for p in params if p in inits and inits[p].data_type != TensorProto.FLOAT]
    if not_f32:
        kind = TensorProto.DataType.Name(inits[not_f32[0]].data_type)
        raise ModelError(
            f"weight {not_f32[0]!r} is {kind}; the gradient engine (Hessian, pruning, "
            "fine-tuning) needs float32 weights: convert the model to float32, or use --method "
            "kmeans, which needs no gradients"
        )
    parameters_as_inputs(m, params)
    m.graph.input.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["N"]))
    m.graph.node.append(
        helper.make_node(
            "SoftmaxCrossEntropyLoss",
            [logits, LABELS],
            [LOSS, "onnxhq_log_prob"],
            name="onnxhq_loss_node",
            reduction="mean",
        )
    )
    _loss_as_only_output(m, TensorProto.FLOAT)
    return m


def build_projection_model(
    model: onnx.ModelProto,
    params: Iterable[str],
    *,
    output: str | None = None,
    tensor: str | Sequence[str] | None = None,
    input_shapes: InputShapes | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with ``params`` as inputs, a projection input and loss ``sum(r * y)``.

    ``y`` is ``tensor`` (any float tensor of the graph, e.g. the logits before a Softmax) if
    given, else `onnxhq.outputs.projection_output` of ``output``; ``r`` is the input
    ``onnxhq_projection`` of ``y``'s shape and type. The gradient of the loss is ``J^T r``.
    Several tensors ``y_i`` (of one float type) take inputs ``projection_name(i)`` and the loss
    ``sum_i sum(r_i * y_i)``, whose gradient is ``sum_i J_i^T r_i``.
    """
    m = _differentiable_copy(model, input_shapes)
    if tensor is None:
        chosen, elem = projection_output(m, output)
        tensors = [chosen]
    else:
        tensors = [tensor] if isinstance(tensor, str) else list(tensor)
        elems = {_tensor_type(m, t) for t in tensors}
        if len(elems) > 1:
            raise ModelError(f"tensors {tensors} mix float types; project tensors of one type")
        elem = elems.pop()
    parameters_as_inputs(m, params)
    # the running total after tensor i (Add, not Sum: the builder has no gradient for Sum)
    totals = [f"{LOSS}__{i}" for i in range(len(tensors) - 1)] + [LOSS]
    for i, chosen in enumerate(tensors):
        r = projection_name(i)
        m.graph.input.append(helper.make_tensor_value_info(r, elem, None))
        one = totals[i] if i == 0 else f"{r}__sum"
        m.graph.node.extend(
            [
                helper.make_node("Mul", [chosen, r], [f"{r}__product"], name=f"{r}_mul"),
                helper.make_node(
                    "ReduceSum", [f"{r}__product"], [one], name=f"{r}_sum", keepdims=0
                ),
            ]
        )
        if i:
            m.graph.node.append(
                helper.make_node("Add", [totals[i - 1], one], [totals[i]], name=f"{r}_add")
            )
    _loss_as_only_output(m, elem)
    return m


def projection_name(i: int) -> str:
    """The projection input of the ``i``-th projected tensor (`PROJECTION` for the first)."""
    return PROJECTION if i == 0 else f"{PROJECTION}_{i}"


def _tensor_type(model: onnx.ModelProto, tensor: str) -> int:
    """The float element type of ``tensor`` (float32 when not recorded); ModelError if absent."""
    made = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    if tensor not in made:
        raise ModelError(f"the model has no tensor {tensor!r} to differentiate")
    value = value_info_map(model).get(tensor)
    elem = value.type.tensor_type.elem_type if value is not None else 0
    if elem and elem not in FLOAT_TYPES:
        kind = TensorProto.DataType.Name(elem)
        raise ModelError(f"tensor {tensor!r} is {kind}; the Hessian differentiates float tensors")
    return elem or TensorProto.FLOAT


def build_forward_model(
    model: onnx.ModelProto, params: Iterable[str], output: str | Sequence[str]
) -> onnx.ModelProto:
    """A copy of ``model`` with ``params`` as inputs and ``output`` (float; one or several, in
    that order) as its only outputs."""
    m = _copy(model)
    parameters_as_inputs(m, params)
    del m.graph.output[:]
    for name in [output] if isinstance(output, str) else output:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def _differentiable_copy(
    model: onnx.ModelProto, input_shapes: InputShapes | None = None
) -> onnx.ModelProto:
    """A copy with local functions inlined, inference BatchNormalization made affine, the ops the
    builder cannot differentiate rewritten (`onnxhq.differentiable.make_differentiable`), and the
    symbolic dims it would wrongly take as equal dropped (`shapes.forget_unproven_dims`)."""
    m = onnx.inliner.inline_local_functions(model) if model.functions else _copy(model)
    frozen_batchnorm_as_affine(m)
    m, replaced = make_differentiable(m, input_shapes=input_shapes)
    if replaced:
        log.info("gradient view: %d nodes rewritten into differentiable ops", replaced)
    forget_unproven_dims(m)
    return m


def _loss_as_only_output(m: onnx.ModelProto, elem_type: int) -> None:
    add_gradient_outputs(m)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(LOSS, elem_type, []))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --- edits the gradient builder needs -------------------------------------------------------------


def frozen_batchnorm_as_affine(model: onnx.ModelProto) -> int:
    """Replace inference BatchNormalization by ``x * s + t`` (constant per-channel s, t), in place.

    onnxruntime-training 1.19 has no gradient for BatchNormalization; at inference it is exactly
    this affine map, which has one. Statistics and BN parameters stay fixed. Returns the number of
    nodes replaced.
    """
    inits = initializer_map(model)
    ranks = _ranks(model)
    nodes, added, replaced = [], [], 0
    for node in model.graph.node:
        training = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
        foldable = all(i in inits for i in node.input[1:5])
        if node.op_type != "BatchNormalization" or training or not foldable:
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (numpy_helper.to_array(inits[i]) for i in node.input[1:5])
        s, t = batchnorm_affine(scale, bias, mean, var, eps)
        tail = (1,) * max(ranks.get(node.input[0], 4) - 2, 0)
        out = node.output[0]
        s_name, t_name = f"{out}__onnxhq_bn_scale", f"{out}__onnxhq_bn_shift"
        added += [
            numpy_helper.from_array(s.reshape(-1, *tail).astype(np.float32), s_name),
            numpy_helper.from_array(t.reshape(-1, *tail).astype(np.float32), t_name),
        ]
        scaled = f"{out}__onnxhq_bn_scaled"
        nodes += [
            helper.make_node("Mul", [node.input[0], s_name], [scaled], name=f"{node.name}_scale"),
            helper.make_node("Add", [scaled, t_name], [out], name=f"{node.name}_shift"),
        ]
        replaced += 1
    if replaced:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(added)
    return replaced


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # best effort: unknown ranks default to 4 (NCHW)
        return {}
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in value_info_map(inferred).values()
        if v.type.tensor_type.HasField("shape")
    }


def add_gradient_outputs(m: onnx.ModelProto) -> None:
    """Give LayerNormalization its Mean/InvStdDev outputs: the builder needs them, in place."""
    for i, node in enumerate(m.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            base = node.output[0]
            while len(node.output) < 3:
                node.output.append(f"{base}__onnxhq_ln_aux{len(node.output)}_{i}")


# --- the builder ---------------------------------------------------------------------------------


def build_gradient_model(training_model: onnx.ModelProto, params: list[str]) -> onnx.ModelProto:
    """Run onnxruntime-training's GradientGraphBuilder on a training view.

    Returns the gradient graph: outputs ``onnxhq_loss`` and ``<param>_grad`` for each of
    ``params``. The builder's own errors and a parameter without gradient raise `ModelError`.
    """
    import onnxruntime
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    onnxruntime.set_default_logger_severity(3)
    try:
        # The builder logs at INFO whatever the severity; its lines are dropped, the rest passes.
        with _onnxruntime_info_filtered():
            builder = GradientGraphBuilder(
                training_model.SerializeToString(), {LOSS}, set(params), LOSS
            )
            builder.build()
        grad_model = onnx.load_from_string(builder.get_model())
    except Exception as exc:  # the builder raises RuntimeError/Fail with C++ messages
        raise gradient_build_error(str(exc), training_model) from None
    have = {o.name for o in grad_model.graph.output}
    missing = [p for p in params if grad_name(p) not in have]
    if missing:
        raise ModelError(
            f"no gradient flows to {missing[0]!r}; it does not influence the output the loss reads"
        )
    return grad_model


def gradient_build_error(message: str, model: onnx.ModelProto | None = None) -> ModelError:
    """The one-line `ModelError` for a failed gradient build, from the builder's ``message``.

    An op without a gradient is named with its node (found in ``model``, the training view,
    when the builder leaves the node name out); other failures keep the message's end, where
    the builder states the cause. Both say that ``--hessian activations`` needs no gradients.
    """
    text = " ".join(message.split())
    found = parse_builder_error(message)
    if found is None and model is not None:
        left = _still_unsupported(model)
        found = left[0] if left else None
    if found is not None:
        op, node = found
        if not node and model is not None:
            node = next((n.name or n.output[0] for n in model.graph.node if n.op_type == op), "")
        return ModelError(
            f"onnxruntime-training has no gradient for {op} (node {node!r}), and onnxhq has no "
            f"rewrite for it; {INSTEAD}"
        )
    cause = text if len(text) <= 400 else "..." + text[-400:]
    return ModelError(
        f"onnxruntime could not build a gradient graph for this model: {cause}; {INSTEAD}"
    )


def _still_unsupported(model: onnx.ModelProto) -> list[tuple[str, str]]:
    try:
        return unsupported_ops(model, [i.name for i in model.graph.input])
    except Exception:  # best effort: the builder's own message is kept
        return []


# A child process, not a thread or a file, filters: if the native code aborts the whole process,
# the child still drains the pipe and passes the dying message on to the real stderr.
_FILTER = (
    "import sys\n"
    "for line in sys.stdin.buffer:\n"
    "    if b' [I:onnxruntime:' not in line and b' [V:onnxruntime:' not in line:\n"
    "        sys.stderr.buffer.write(line)\n"
    "        sys.stderr.buffer.flush()\n"
)


@contextlib.contextmanager
def _onnxruntime_info_filtered() -> Iterator[None]:
    """Route file descriptor 2 through a filter that drops onnxruntime's INFO and VERBOSE lines.

    Everything else written to fd 2 meanwhile (warnings, an abort's message) reaches the real
    stderr, even when the process dies. Without a usable fd 2 or interpreter it filters nothing.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreters): nothing to filter
        yield
        return
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER], stdin=subprocess.PIPE, stderr=saved
        )
    except OSError:
        os.close(saved)
        yield
        return
    assert child.stdin is not None
    try:
        os.dup2(child.stdin.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        child.stdin.close()
        child.wait()
