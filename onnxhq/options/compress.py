"""`CompressOptions`: everything `compress` is told, checked as a whole, and its keyword form."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .parts import (
    GUARDS,
    FineTune,
    HessianSource,
    OptionError,
    PathLike,
    Rate,
    Scope,
    check_choice,
    check_output,
    default_rate,
    is_int,
    serial,
    show,
)
from .target import Target
from .vocabulary import (
    CELL_VALUES,
    DEFAULT_FINETUNE_LR,
    DEFAULT_METHOD,
    EXTRA_OPS,
    HESSIAN_METHODS,
    HESSIAN_SOURCES,
    METHODS,
    RATES,
    SUPPLIED,
    WEIGHTED_METHODS,
)

if TYPE_CHECKING:
    from ..data import Dataset

#: The keywords of `CompressOptions.from_keywords` (the keys of `CompressOptions.to_dict`).
KEYWORDS = (
    "method", *RATES, "scope", "group_size", "hessian", "hessian_samples", "hessian_batch_size",
    "adam_state", "include_biases", "extra_ops", "finetune_epochs", "train_data", "finetune_lr",
    "output", "name", "seed", "guard", "max_drop", "min_fidelity", "compensate", "cell_value",
    "fold_batchnorm", "compact_names",
)  # fmt: skip
_UNWEIGHTED = "drop it or choose a weighted method (hkmeans, uniform, ecsq)"


@dataclass(frozen=True)
class CompressOptions:
    """Everything `compress` is told, checked on construction.

    Attributes
    ----------
    method : one of `METHODS`.
    rate : `Rate`; None means `default_rate` of the method.
    scope : `Scope` (a scope name is accepted).
    hessian : `HessianSource` (an estimator name is accepted); None means ``fisher`` for the
        weighted methods and ``none`` for plain ``kmeans``, which takes no Hessian.
    include_biases : quantize the biases of the quantized layers too.
    extra_ops : op types of `EXTRA_OPS` whose weights are quantized too.
    finetune : `FineTune` or None.
    output : ``NAME[:KIND]`` of the output the Hessian reads (None: detect), or several (a
        tuple: their Fishers summed; not with fine-tuning, which reads one).
    name : stem of the artifacts' file names (None: the model file's stem or graph name).
    seed : integer >= 0 for every random draw.
    guard : one of `GUARDS`: what happens to a tensor a shared codebook leaves far worse off
        than a codebook of its own would (``requantize`` gives it one; `onnxhq.quantize.guard`).
    target : `Target` or None: search rate and scope for the smallest artifacts that reach it on
        the eval data instead of compressing at one rate (then ``rate`` must not be given).
    compensate : reassign the codes with error compensation on each layer's input statistics
        (GPTQ-style, `onnxhq.compensate`) and refit the codebook values; needs data.
    cell_value : one of `CELL_VALUES`, method ``uniform`` only: each cell's codebook value is the
        importance-weighted mean of its weights (``mean``) or its grid point (``grid``: the
        codebooks are ``step * levels``, which ``decode --target int8|int4`` writes natively).
    fold_batchnorm : fold inference BatchNormalization into the Conv, ConvTranspose or Gemm
        before it when the maths stay the same (`onnxhq.fold`), before the weights are picked.
    compact_names : give the written graph's internal values and nodes short names and drop its
        doc strings and default attributes (`onnxhq.compact`); graph inputs and outputs keep
        their names, ``Result.names`` says the quantized weights'.
    """

    method: str = DEFAULT_METHOD
    rate: Rate | None = None
    scope: Scope = field(default_factory=Scope)
    hessian: HessianSource | None = None
    include_biases: bool = False
    extra_ops: tuple[str, ...] = ()
    finetune: FineTune | None = None
    output: str | tuple[str, ...] | None = None
    name: str | None = None
    seed: int = 0
    guard: str = "requantize"
    target: Target | None = None
    compensate: bool = False
    cell_value: str = "mean"
    fold_batchnorm: bool = True
    compact_names: bool = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("cell_value", self.cell_value, CELL_VALUES)
        check_choice("guard", self.guard, GUARDS)
        if self.target is not None:
            _check_target(self.target, self.rate)
        rate = self.rate
        if rate is None and self.target is None:
            rate = default_rate(self.method)
        scope = Scope(self.scope) if isinstance(self.scope, str) else self.scope
        hessian = self.hessian
        if hessian is None:
            weighted = self.method in WEIGHTED_METHODS
            hessian = HessianSource("fisher" if weighted else "none", fallback=weighted)
        elif isinstance(hessian, str):
            hessian = HessianSource(hessian)
        kinds = (("scope", scope, Scope), ("hessian", hessian, HessianSource))
        for label, part, kind in (*kinds, *([("rate", rate, Rate)] if rate is not None else [])):
            if not isinstance(part, kind):
                raise OptionError(f"{label} must be a {kind.__name__}, not {part!r}", label)
        if rate is not None:
            check_rate(self.method, rate)
        if scope.kind == "allocated" and (self.method != "uniform" or (
                rate is not None and rate.target_bits is None)):  # fmt: skip
            raise OptionError(
                f"scope 'allocated' sets each tensor's grid step from one rate target: it takes "
                f"method 'uniform' with target_bits, not {self.method!r} with "
                f"{rate.label() if rate is not None else 'a target'}",
                "scope",
                "method",
            )
        if self.method not in WEIGHTED_METHODS and hessian.weighs:
            raise OptionError(
                f"method 'kmeans' is unweighted and ignores hessian={hessian.method!r}; drop the "
                "Hessian or choose a weighted method (hkmeans, uniform, ecsq)",
                "method",
                "hessian",
            )
        extra_ops = _check_extra_ops(self.extra_ops)
        if self.finetune is not None and not isinstance(self.finetune, FineTune):
            raise OptionError(f"finetune must be a FineTune, not {self.finetune!r}", "finetune")
        if not isinstance(self.compensate, bool):
            raise OptionError(f"{show('compensate', self.compensate)} must be a bool", "compensate")
        _check_cell_value(self)
        for label in ("fold_batchnorm", "compact_names"):
            if not isinstance(getattr(self, label), bool):
                raise OptionError(f"{show(label, getattr(self, label))} must be a bool", label)
        if not isinstance(self.include_biases, bool):
            raise OptionError(f"{show('include_biases', self.include_biases)} must be a bool",
                              "include_biases")  # fmt: skip
        output = check_output(self.output, self.finetune)
        name = self.name
        if name is not None and not (isinstance(name, str) and name):
            raise OptionError(f"{show('name', name)} must be a non-empty string or None", "name")
        if not (is_int(self.seed) and self.seed >= 0):
            raise OptionError(f"{show('seed', self.seed)} must be an integer >= 0", "seed")
        fixed = (("rate", rate), ("scope", scope), ("hessian", hessian), ("extra_ops", extra_ops),
                 ("output", output))  # fmt: skip
        for label, normal in (*fixed, ("seed", int(self.seed))):
            object.__setattr__(self, label, normal)

    @property
    def weighted(self) -> bool:
        """True when the quantizer weighs errors by importances (a weighted method and Hessian)."""
        return self.method in WEIGHTED_METHODS and self.hessian is not None and self.hessian.weighs

    def with_rate(self, rate: Rate) -> CompressOptions:
        """The same options at another rate (checked against the method), without a target."""
        return replace(self, rate=rate, target=None)

    @classmethod
    def from_keywords(
        cls,
        *,
        method: str | None = None,
        k: int | None = None,
        bits: int | None = None,
        lam: float | None = None,
        target_bits: float | None = None,
        scope: str | Scope | None = None,
        group_size: int | None = None,
        hessian: str | PathLike | Mapping[str, Any] | HessianSource | None = None,
        hessian_samples: int | None = None,
        hessian_batch_size: int | None = None,
        adam_state: PathLike | Mapping[str, Any] | None = None,
        include_biases: bool = False,
        extra_ops: tuple[str, ...] | list[str] = (),
        finetune_epochs: float = 0,
        train_data: PathLike | Dataset | None = None,
        finetune_lr: float | None = None,
        output: str | None = None,
        name: str | None = None,
        seed: int = 0,
        guard: str = "requantize",
        max_drop: float | None = None,
        min_fidelity: str | None = None,
        compensate: bool = False,
        cell_value: str = "mean",
        fold_batchnorm: bool = True,
        compact_names: bool = True,
    ) -> CompressOptions:
        """Options from `compress`'s keywords, the flat form `to_dict` writes.

        ``hessian`` is an estimator name, an .npz path (a str ending in ``.npz`` or naming a
        file, or an os.PathLike), a mapping of diagonals, or a `HessianSource`; the sampling
        keywords and ``adam_state`` go with a name. Fine-tuning is on when ``finetune_epochs``
        is nonzero; ``train_data`` and ``finetune_lr`` without it are errors. ``max_drop``
        (accuracy points) or ``min_fidelity`` (``"METRIC=VALUE"``) is a `Target`, instead of a rate.
        """
        method = DEFAULT_METHOD if method is None else method
        check_choice("method", method, METHODS)
        source = _hessian_source(method, hessian, hessian_samples, hessian_batch_size, adam_state)
        if isinstance(scope, Scope) and group_size is not None:
            raise OptionError("group_size goes inside the Scope given", "group_size")
        if not isinstance(scope, Scope):
            scope = Scope("network" if scope is None else scope, group_size)
        finetune = None
        if finetune_epochs == 0:
            given = "train_data" if train_data is not None else "finetune_lr"
            if train_data is not None or finetune_lr is not None:
                raise OptionError(
                    f"{given} is for codebook fine-tuning, which is off: give finetune_epochs > 0 "
                    f"or drop {given}",
                    given,
                    "finetune_epochs",
                )
        else:
            lr = DEFAULT_FINETUNE_LR if finetune_lr is None else finetune_lr
            finetune = FineTune(finetune_epochs, train_data, lr)  # type: ignore[arg-type]
        return cls(method=method, rate=Rate.of(k, bits, lam, target_bits), scope=scope,
                   hessian=source, include_biases=include_biases, extra_ops=tuple(extra_ops),
                   finetune=finetune, output=output, name=name, seed=seed, guard=guard,
                   target=Target.of(max_drop, min_fidelity),
                   compensate=compensate, cell_value=cell_value, fold_batchnorm=fold_batchnorm,
                   compact_names=compact_names)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The keyword form, JSON-safe: `from_dict` (or ``compress(**d)``) rebuilds the options.

        In-memory inputs appear as ``"supplied"``, paths as text.
        """
        assert self.hessian is not None
        h, tune, target = self.hessian, self.finetune, self.target
        return {
            "method": self.method,
            **(self.rate.to_dict() if self.rate is not None else dict.fromkeys(RATES)),
            "scope": self.scope.kind,
            "group_size": self.scope.group_size,
            "hessian": serial(h.arrays) if h.method == SUPPLIED else h.method,
            "hessian_samples": h.samples,
            "hessian_batch_size": h.batch_size,
            "adam_state": serial(h.state),
            "include_biases": self.include_biases,
            "extra_ops": list(self.extra_ops),
            "finetune_epochs": 0 if tune is None else tune.epochs,
            "train_data": None if tune is None else serial(tune.data),
            "finetune_lr": None if tune is None else tune.lr,
            "output": list(self.output) if isinstance(self.output, tuple) else self.output,
            "name": self.name,
            "seed": self.seed,
            "guard": self.guard,
            "max_drop": target.value if target is not None and target.field == "max_drop" else None,
            "min_fidelity": (
                f"{target.metric}={target.value!r}"
                if target is not None and target.field == "min_fidelity"
                else None
            ),
            "compensate": self.compensate,
            "cell_value": self.cell_value,
            "fold_batchnorm": self.fold_batchnorm,
            "compact_names": self.compact_names,
        }

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> CompressOptions:
        """Options from `to_dict`'s form (a report's ``settings``).

        Unknown keys are errors, and so are inputs that were ``"supplied"`` in memory: pass
        those again, ``from_keywords(**{**settings, "hessian": diagonals})``.
        """
        unknown = sorted(set(settings) - set(KEYWORDS))
        if unknown:
            raise OptionError(f"settings key {unknown[0]!r} is not an option of compress; the "
                              f"keys are {', '.join(KEYWORDS)}", unknown[0])  # fmt: skip
        for key in ("hessian", "adam_state", "train_data"):
            if settings.get(key) == SUPPLIED:
                raise OptionError(f"{key} was supplied in memory, so the settings cannot rebuild "
                                  f"it: pass it again with from_keywords(**{{**settings, {key!r}: "
                                  "...}})", key)  # fmt: skip
        return cls.from_keywords(**{**settings, "extra_ops": tuple(settings.get("extra_ops", ()))})


def resolve_options(
    options: CompressOptions | None, keywords: Mapping[str, Any], *, caller: str
) -> CompressOptions:
    """``options``, or the options of ``keywords`` (`CompressOptions.from_keywords`); not both."""
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return CompressOptions.from_keywords(**keywords)
    if not isinstance(options, CompressOptions):
        raise OptionError(f"options must be a CompressOptions, not {options!r}", "options")
    if keywords:
        first = sorted(keywords)[0]
        raise OptionError(f"give options= or the option keywords, not both ({first} was given "
                          "too)", first)  # fmt: skip
    return options


def require_data(options: CompressOptions, data: object) -> None:
    """Refuse, before any work, a Hessian estimate with no data to estimate it from."""
    if options.compensate and data is None:
        raise OptionError(
            "compensate gathers each layer's input statistics from data: pass data (model "
            "inputs), or drop compensate",
            "compensate",
            "data",
        )
    if (
        options.weighted
        and options.hessian is not None
        and options.hessian.needs_data
        and (data is None)
    ):
        raise OptionError(
            f"method {options.method!r} weights errors by a Hessian estimate and needs data: pass "
            "data (model inputs), a precomputed hessian file, or use method='kmeans'",
            "data",
            "hessian",
            "method",
        )


def require_eval(options: CompressOptions, eval_data: object) -> None:
    """Refuse, before any work, a target with no eval data to measure it on."""
    if options.target is not None and eval_data is None:
        field = options.target.field
        raise OptionError(
            f"{options.target.label()} is measured on eval data: pass eval_data (model inputs; "
            "labels too for max_drop) or give a rate instead",
            field,
            "eval_data",
        )


def check_rate(method: str, rate: Rate) -> None:
    """The method-rate pairs `onnxhq.quantize` refuses, refused here before any work."""
    if rate.lam is not None and method != "ecsq":
        raise OptionError(
            f"lam={rate.lam:g} is ECSQ's multiplier; method {method!r} takes k, bits or "
            "target_bits",
            "lam", "method", "k", "bits", "target_bits",
        )  # fmt: skip
    if method == "ecsq" and rate.name in ("k", "bits"):
        raise OptionError(
            f"method 'ecsq' takes its number of codewords from the rate: give lam or target_bits, "
            f"not {rate.label()} (hkmeans and uniform take a fixed k)",
            "method", "lam", "target_bits", "k", "bits",
        )  # fmt: skip


def _check_target(target: object, rate: Rate | None) -> None:
    """A `Target` replaces the rate: refuse both, before any work."""
    if not isinstance(target, Target):
        raise OptionError(f"target must be a Target, not {target!r}", "target")
    if rate is not None:
        given = rate.label().replace("lambda", "lam")
        raise OptionError(
            f"{target.label()} searches the rate itself; drop {given} or the target",
            target.field,
            rate.name,
        )


def _check_cell_value(options: CompressOptions) -> None:
    """Grid cell values only where the codebook stays on the grid: the uniform quantizer, without
    the steps that move codebook values (fine-tuning, the compensation's refit)."""
    if options.cell_value != "grid":
        return
    if options.method != "uniform":
        raise OptionError(f"cell_value='grid' puts the uniform quantizer's grid points in the "
                          f"codebook; method {options.method!r} has no grid: use method "
                          "'uniform' or drop cell_value", "cell_value", "method")  # fmt: skip
    moved = [n for n, on in (("finetune_epochs", options.finetune is not None),
                             ("compensate", options.compensate)) if on]  # fmt: skip
    if moved:
        raise OptionError(f"cell_value='grid' keeps the codebook on its grid, and {moved[0]} "
                          "moves the codebook values off it: drop one of them", "cell_value",
                          moved[0])  # fmt: skip


def _check_extra_ops(extra_ops: object) -> tuple[str, ...]:
    if isinstance(extra_ops, str) or not isinstance(extra_ops, (tuple, list)):
        raise OptionError(f"extra_ops must be a sequence of op types, not {extra_ops!r}",
                          "extra_ops")  # fmt: skip
    for op in extra_ops:
        if op not in EXTRA_OPS:
            raise OptionError(f"extra_ops: op type {op!r} is not supported; choose among "
                              f"{', '.join(EXTRA_OPS)}", "extra_ops")  # fmt: skip
    if len(set(extra_ops)) != len(extra_ops):
        raise OptionError(f"extra_ops repeat an op type: {', '.join(extra_ops)}", "extra_ops")
    return tuple(extra_ops)


def _hessian_source(method, hessian, samples, batch_size, adam_state) -> HessianSource | None:
    """The `HessianSource` of `compress`'s Hessian keywords (None: the method's default)."""
    given = [n for n, v in (("hessian_samples", samples), ("hessian_batch_size", batch_size),
                            ("adam_state", adam_state)) if v is not None]  # fmt: skip
    if isinstance(hessian, HessianSource):
        if given:
            raise OptionError(f"{given[0]} goes inside the HessianSource given", given[0])
        return hessian
    if hessian is None:
        if method not in WEIGHTED_METHODS and given:
            raise OptionError(f"method 'kmeans' is unweighted and takes no Hessian, so {given[0]} "
                              f"does not apply; {_UNWEIGHTED}", given[0], "method")  # fmt: skip
        if adam_state is not None:
            raise OptionError("adam_state goes with hessian='adam'", "adam_state", "hessian")
        if method not in WEIGHTED_METHODS:
            return None
        return HessianSource("fisher", samples, batch_size, fallback=True)
    if isinstance(hessian, str) and hessian in HESSIAN_SOURCES:
        return HessianSource(hessian, samples, batch_size, adam_state)
    if isinstance(hessian, str) and not (hessian.endswith(".npz") or os.path.isfile(hessian)):
        raise OptionError(f"unknown hessian={hessian!r}; choose one of "
                          f"{', '.join(HESSIAN_METHODS)}, or give an .npz file written by "
                          "'onnxhq hessian'", "hessian")  # fmt: skip
    return HessianSource(SUPPLIED, samples, batch_size, adam_state, hessian)
