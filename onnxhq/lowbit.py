"""A runnable low-bit model in onnxruntime's native forms, mixed 4/8-bit under a byte budget.

`lower_lowbit` takes a float model and its importances (the Hessian diagonal `compress`
estimates) and writes each weight that onnxruntime has a low-bit kernel for in that form:

- a weight only ``MatMul`` reads (or a plain ``Gemm``, ``transB=1``): ``MatMulNBits``, 4 or 8
  bits, a float32 scale and a zero point per block of K and output column;
- an embedding table only ``Gather`` reads (axis 0): ``GatherBlockQuantized``, 4 or 8 bits,
  blocks along the embedding.

Each block's grid comes from `onnxhq.blockgrid.fit_block_grid` (clip search on the
importance-weighted error, not max-abs); where layer-wise Hessians are given
(`onnxhq.layer_inputs.layer_hessians`), a MatMul weight is then rounded onto its grid by GPTQ
(`onnxhq.blockgrid.gptq_onto_grid`), and its distortion is the GPTQ layer objective. `fit_forms`
offers each candidate in ``bits`` and ``protect_bits`` (and float with ``keep_float``) for each
of ``block_sizes``; `onnxhq.bitalloc.allocate` picks one form per tensor by distortion per byte
so that the whole file stays within ``max_bytes`` (without a budget: ``bits``, least
distortion). On all-MiniLM-L6-v2: 4 bits in blocks of 32 with GPTQ, 14.7 MB at cosine 0.996
(round to nearest on the same grids: 0.977; tools/RESULTS.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import native_contrib as contrib
from .bitalloc import Form, allocate
from .blockgrid import BITS, BLOCKS, BlockGrid, fit_block_grid, gptq_onto_grid, weighted_error
from .data import Dataset
from .errors import ConfigError
from .layerwise import LayerHessian
from .model import initializer_map
from .options import OptionError

log = logging.getLogger(__name__)

FLOAT = "float"
#: accuracy_level of MatMulNBits: 0 leaves it unset (fp32 compute), 4 computes in int8.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class LowbitOptions:
    """What `lower_lowbit` writes.

    Attributes
    ----------
    bits : the levels of every tensor without a budget, of most tensors with one (4 or 8).
    protect_bits : the levels a tensor may be raised to within ``max_bytes`` (8), or None.
    block_sizes : elements per block the allocation may choose among, each of `BLOCKS`; without
        a budget each tensor takes the one of least distortion.
    max_bytes : the runnable file's budget in bytes, or None (then ``protect_bits`` and
        ``keep_float``, which only share a budget, are refused).
    accuracy_level : MatMulNBits' ``accuracy_level`` (0: unset, fp32 compute; 4: int8
        activations, faster).
    keep_float : offer float (the weight unchanged) as a form too.
    """

    bits: int = 4
    protect_bits: int | None = None
    block_sizes: tuple[int, ...] = (32,)
    max_bytes: int | None = None
    accuracy_level: int = 0
    keep_float: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise OptionError(f"bits={self.bits} is not one of {', '.join(map(str, BITS))}", "bits")
        if self.protect_bits is not None and (
            self.protect_bits not in BITS or self.protect_bits <= self.bits
        ):
            raise OptionError(
                f"protect_bits={self.protect_bits} must be one of {', '.join(map(str, BITS))} "
                f"above bits={self.bits}, or None",
                "protect_bits",
                "bits",
            )
        bad = [b for b in self.block_sizes if b not in BLOCKS]
        if not self.block_sizes or bad:
            raise OptionError(f"block_sizes={self.block_sizes} must be a non-empty choice of "
                              f"{', '.join(map(str, BLOCKS))}", "block_sizes")  # fmt: skip
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise OptionError(f"max_bytes={self.max_bytes} must be positive, or None", "max_bytes")
        if self.max_bytes is None and (self.protect_bits is not None or self.keep_float):
            what = f"protect_bits={self.protect_bits}" if self.protect_bits else "keep_float"
            raise OptionError(f"{what} needs max_bytes, the budget the raised tensors share",
                              "protect_bits", "keep_float", "max_bytes")  # fmt: skip
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise OptionError(f"accuracy_level={self.accuracy_level} is not one of 0-4",
                              "accuracy_level")  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """What `lower_lowbit` did with one weight: its op (`contrib.NBITS`, `contrib.GATHER`), the
    form's label (``"4-bit/32"``, ``"float"``), bytes and distortion (importance-weighted squared
    error; where GPTQ ran, its layer objective after GPTQ on the importances' scale), and the
    layer objective before/after GPTQ where it ran."""

    op: str
    label: str
    bytes: int
    distortion: float
    gptq: tuple[float, float] | None = None


@dataclass(frozen=True)
class Lowered:
    """`lower_lowbit`'s result: the model and a `Choice` per candidate weight."""

    model: onnx.ModelProto
    choices: dict[str, Choice] = field(default_factory=dict)


def candidates(model: onnx.ModelProto) -> dict[str, str]:
    """Weight name -> the contrib op it can become (2-D initializers read only by MatMul /
    plain Gemm as their weight, or only by Gather on axis 0), whatever their importances."""
    readers = contrib.readers_of(model)
    outputs = {o.name for o in model.graph.output}
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    found = {}
    for name, shape in dims.items():
        if len(shape) != 2 or name in outputs:
            continue
        reader = contrib.plain_reader(readers.get(name, []), shape[0], dims)
        if reader in ("MatMul", "Gemm"):
            found[name] = contrib.NBITS
        elif reader == "Gather":
            found[name] = contrib.GATHER
    return found


@dataclass(frozen=True)
class Fitted:
    """Every form `fit_forms` offers each weight: its op, rest bytes of the model (all but the
    candidates' data), the grids by ``(name, label)``, the `Form` list per weight and the layer
    objective before/after GPTQ by ``(name, label)``. `lower_lowbit` allocates among them."""

    ops: dict[str, str]
    rest: int
    grids: dict[tuple[str, str], BlockGrid]
    forms: dict[str, list[Form]]
    layer: dict[tuple[str, str], tuple[float, float]]


def fit_forms(
    model: onnx.ModelProto,
    importances: Mapping[str, np.ndarray],
    options: LowbitOptions,
    *,
    layer_hessians: Mapping[str, LayerHessian] | None = None,
) -> Fitted:
    """The grids of every form of ``options`` (bits, protect_bits, block_sizes, keep_float) for
    each candidate weight of ``importances``: clip-searched, then GPTQ-rounded where a layer
    Hessian is given (its distortion is then the layer objective on the importances' scale,
    ``sum(h) / (R tr H)`` per unit, as `onnxhq.compensate` scales layers)."""
    ops = {n: op for n, op in candidates(model).items() if n in importances}
    views = _views(model, ops, importances)
    hessians = {n: h for n, h in _hessians(layer_hessians, ops).items() if n in views}
    grids: dict[tuple[str, str], BlockGrid] = {}
    forms: dict[str, list[Form]] = {}
    layer: dict[tuple[str, str], tuple[float, float]] = {}
    for name, (view, imp) in views.items():
        forms[name] = []
        for bits in (options.bits, options.protect_bits):
            if bits is None or not contrib.supported(ops[name], bits):
                continue
            for block in options.block_sizes:
                if ops[name] == contrib.GATHER and view.shape[1] % block:
                    continue
                label = f"{bits}-bit/{block}"
                grid = fit_block_grid(view, bits=bits, block=block, importance=imp)
                distortion = weighted_error(view, grid, imp)
                if name in hessians:
                    h = hessians[name]
                    before = _layer_error(view, grid, h)
                    grid = gptq_onto_grid(view, grid, h)
                    layer[name, label] = (before, _layer_error(view, grid, h))
                    scale = float(imp.sum()) / (view.shape[0] * float(np.trace(h)) or 1.0)
                    distortion = scale * layer[name, label][1]
                grids[name, label] = grid
                forms[name].append(Form(label, grid.nbytes(), distortion))
        if options.keep_float or not forms[name]:
            forms[name].append(Form(FLOAT, view.nbytes, 0.0))
    rest = model.ByteSize() - sum(views[n][0].nbytes for n in views)
    return Fitted(ops, rest, grids, forms, layer)


def lower_lowbit(
    model: onnx.ModelProto,
    importances: Mapping[str, np.ndarray],
    options: LowbitOptions | None = None,
    *,
    layer_hessians: Mapping[str, LayerHessian] | None = None,
    fitted: Fitted | None = None,
) -> Lowered:
    """A copy of float ``model`` with each weight of ``importances`` that `candidates` finds in
    a native low-bit form (or float), chosen as the module doc says; ``model`` is not changed.

    ``fitted``: `fit_forms` of the same model and importances, to try several budgets or
    accuracy levels without fitting again (its forms are used as they are). Raises ConfigError
    when ``options.max_bytes`` is below what the smallest forms need.
    """
    options = options or LowbitOptions()
    if fitted is None:
        fitted = fit_forms(model, importances, options, layer_hessians=layer_hessians)
    forms = fitted.forms
    budget = None
    if options.max_bytes is not None:
        budget = options.max_bytes - fitted.rest - 512 * len(forms)  # nodes, names, attributes
        least = sum(min(f.bytes for f in fs) for fs in forms.values())
        if least > budget:
            raise ConfigError(
                f"the smallest forms make a file of about {options.max_bytes - budget + least:,} "
                f"bytes, more than max_bytes={options.max_bytes:,}; raise the budget or use "
                "fewer bits"
            )
    chosen = allocate(forms, budget)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ops = fitted.ops
    choices = {
        name: Choice(ops[name], f.label, f.bytes, f.distortion, fitted.layer.get((name, f.label)))
        for name, f in chosen.items()
    }
    replaced = {n: fitted.grids[n, f.label] for n, f in chosen.items() if f.label != FLOAT}
    _rewrite(out, replaced, ops, options.accuracy_level)
    counts = ", ".join(f"{v} {k}" for k, v in _counts(choices).items())
    log.info("lowbit: %d weights, %s; %d bytes", len(choices), counts, out.ByteSize())
    return Lowered(out, choices)


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of ``model`` whose MatMulNBits nodes compute at ``accuracy_level`` ``level`` (0:
    the attribute removed); the stored weights are the same bytes."""
    if level not in ACCURACY_LEVELS:
        raise OptionError(f"accuracy_level={level} is not one of 0-4", "accuracy_level")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == contrib.NBITS and node.domain == contrib.MS_DOMAIN:
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep)
            if level:
                node.attribute.append(helper.make_attribute("accuracy_level", level))
    return out


def _views(model, ops: Mapping[str, str], importances) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Weight name -> (view, importance view) ``(R, K)``: a MatMul weight ``(K, N)`` transposed
    (rows are its N outputs), a Gemm weight (transB) and an embedding table as they are."""
    inits = initializer_map(model)
    matmul = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.domain == ""}
    views = {}
    for name, op in ops.items():
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        imp = np.asarray(importances[name], np.float32)
        t = op == contrib.NBITS and name in matmul
        views[name] = (w.T, imp.T) if t else (w, imp)
    return views


def _hessians(layer_hessians, ops: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The (K, K) layer Hessian of each MatMulNBits weight that has one in one block."""
    found = {}
    for name, lh in (layer_hessians or {}).items():
        if ops.get(name) == contrib.NBITS and lh.groups == 1 and len(lh.blocks) == 1:
            found[name] = lh.blocks[0][0]
    return found


def lowbit_model(
    model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | Dataset,
    options: LowbitOptions | None = None,
    *,
    hessian: str = "fisher",
    samples: int | None = None,
    seed: int = 0,
    gptq: bool = True,
) -> Lowered:
    """`lower_lowbit` of the model at ``model`` with the importances ``hessian`` estimates on
    ``data`` (`onnxhq.estimate_hessian`, falling back to ``activations`` where the model has no
    gradient graph) and, with ``gptq``, the layer-wise Hessians of the same data."""
    from .data import load_data
    from .importances import estimate_hessian
    from .layer_inputs import SAMPLES, layer_hessians
    from .model import load_model

    options = options or LowbitOptions()  # checked before the work
    proto = load_model(model)
    dataset = data if isinstance(data, Dataset) else load_data(data, proto)
    importances = estimate_hessian(proto, dataset, method=hessian, samples=samples, seed=seed,
                                   fallback=hessian == "fisher")  # fmt: skip
    lh = None
    if gptq:
        names = [n for n, op in candidates(proto).items() if op == contrib.NBITS]
        lh = layer_hessians(proto, dataset.inputs, [n for n in names if n in importances],
                            samples=SAMPLES, seed=seed)  # fmt: skip
    return lower_lowbit(proto, importances, options, layer_hessians=lh)


def _layer_error(view: np.ndarray, grid: BlockGrid, h: np.ndarray) -> float:
    e = grid.values().astype(np.float64) - view
    return float(((e @ h) * e).sum())


def _counts(choices: Mapping[str, Choice]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in choices.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    return dict(sorted(counts.items()))


def _rewrite(model: onnx.ModelProto, grids: Mapping[str, BlockGrid], ops, accuracy: int) -> None:
    """Replace the readers of each weight of ``grids`` by its contrib node, in place."""
    if not grids:
        return
    makers = {contrib.NBITS: contrib.matmul_nbits_blocks,
              contrib.GATHER: contrib.gather_block_quantized_blocks}  # fmt: skip
    tensors = contrib.replace_readers(
        model, grids, lambda node, weight: makers[ops[weight]](node, grids[weight], accuracy)
    )
    keep = [t for t in model.graph.initializer if t.name not in grids]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(tensors.values()))
