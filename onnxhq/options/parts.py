"""The parts of the options: `Rate`, `Scope`, `HessianSource`, `FineTune`, each checked whole.

Each raises `OptionError` on construction, with one line naming the option as `compress` spells
it (``group_size=0``), its value and what to give instead.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from ..errors import ConfigError
from .vocabulary import (
    BATCHED_HESSIANS,
    DEFAULT_FINETUNE_LR,
    DEFAULT_HESSIAN_SAMPLES,
    DEFAULT_K,
    DEFAULT_TARGET_BITS,
    HESSIAN_SOURCES,
    RATES,
    SAMPLING_HESSIANS,
    SCOPES,
    SUPPLIED,
)

if TYPE_CHECKING:
    from ..data import Dataset

PathLike = Union[str, "os.PathLike[str]"]


class OptionError(ConfigError):
    """An option value is invalid or conflicts with another; a usage error (CLI exit status 2).

    ``fields`` are the `compress` keywords (``group_size``, ``extra_ops``) the message names,
    spelled as in the message, so that a front end can respell them (the CLI: as its flags).
    """

    def __init__(self, message: str, *fields: str) -> None:
        super().__init__(message)
        self.fields = fields


def show(name: str, value: object) -> str:
    """``name=value`` as the messages write it (strings quoted)."""
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


def is_int(value: object) -> bool:
    """True for Python and numpy integers, not bools (`onnxhq.numeric.is_int`, without numpy)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """True for finite real numbers, not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"unknown {show(name, value)}; choose one of {', '.join(choices)}", name)


def is_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike))


def token(value: Any) -> object:
    """What equality compares: a path as text, an in-memory object by identity."""
    if value is None or is_path(value):
        return None if value is None else os.fspath(value)
    return (SUPPLIED, id(value))


def serial(value: Any) -> str | None:
    """The JSON form of a path (its text) or of an in-memory input (``"supplied"``)."""
    if value is None:
        return None
    return os.fspath(value) if is_path(value) else SUPPLIED


@dataclass(frozen=True)
class Rate:
    """The rate, exactly one of: ``k`` codewords, ``bits`` (``k = 2**bits``), ECSQ's multiplier
    ``lam`` (distortion per bit), or ``target_bits`` (entropy of the indices, bits per weight).

    A whole-number ``bits`` (4.0) becomes an int; ``bits=2.5`` is an error (use ``target_bits``).
    """

    k: int | None = None
    bits: int | None = None
    lam: float | None = None
    target_bits: float | None = None

    def __post_init__(self) -> None:
        given = [show(n, getattr(self, n)) for n in RATES if getattr(self, n) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise OptionError(
                f"give exactly one rate of k, bits, lam, target_bits; got {got}", *RATES
            )
        name, value = self.name, self.value
        if name == "k" and not (is_int(value) and value >= 1):
            raise OptionError(f"{show('k', value)} must be an integer >= 1", "k")
        if name == "bits" and not (is_real(value) and value == int(value) and 0 <= value <= 30):
            raise OptionError(
                f"{show('bits', value)} must be a whole number from 0 to 30; for a fractional rate "
                "use target_bits",
                "bits",
                "target_bits",
            )
        if name == "lam" and not (is_real(value) and value >= 0):
            raise OptionError(f"{show('lam', value)} must be a finite number >= 0", "lam")
        if name == "target_bits" and not (is_real(value) and 0 <= value < 64):
            raise OptionError(
                f"{show('target_bits', value)} must be a number of bits per weight in [0, 64)",
                "target_bits",
            )
        object.__setattr__(self, name, int(value) if name in ("k", "bits") else float(value))

    @property
    def name(self) -> str:
        """Which rate: ``k``, ``bits``, ``lam`` or ``target_bits``."""
        return next(n for n in RATES if getattr(self, n) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.name)

    @classmethod
    def of(cls, k=None, bits=None, lam=None, target_bits=None) -> Rate | None:
        """The rate given, or None when none of the four is."""
        if k is None and bits is None and lam is None and target_bits is None:
            return None
        return cls(k=k, bits=bits, lam=lam, target_bits=target_bits)

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"k=32"``, ``"bits=4"``, ``"lam=0.01"`` (``"lambda=0.01"``), ``"target_bits=3.5"``."""
        name, sep, number = (part.strip() for part in text.partition("="))
        name = {"lambda": "lam", "target-bits": "target_bits"}.get(name, name)
        if not sep or name not in RATES:
            raise OptionError(
                f"rate {text!r} is not NAME=VALUE with NAME one of k, bits, lam, target_bits",
                *RATES,
            )
        try:
            value: float = int(number) if name == "k" else float(number)
        except ValueError:
            raise OptionError(f"rate {text!r}: {number!r} is not a number", name) from None
        return cls.named(name, value)

    @classmethod
    def named(cls, name: str, value: float) -> Rate:
        """The rate called ``name`` (one of `RATES`) at ``value``: ``Rate.named("k", 8)``."""
        check_choice("rate", name, RATES)
        keywords: dict[str, Any] = {name: value}
        return cls(**keywords)

    def label(self) -> str:
        """Short text: ``k=32``, ``lambda=0.01``, ``target_bits=4``."""
        return f"{'lambda' if self.name == 'lam' else self.name}={self.value:g}"

    def to_dict(self) -> dict[str, float | None]:
        """All four keywords, three of them None."""
        return {n: getattr(self, n) for n in RATES}


def default_rate(method: str) -> Rate:
    """``k=32`` for the k-means methods, ``target_bits=4`` for uniform and ECSQ."""
    if method in ("kmeans", "hkmeans"):
        return Rate(k=DEFAULT_K)
    return Rate(target_bits=DEFAULT_TARGET_BITS)


@dataclass(frozen=True)
class Scope:
    """Codebook scope; ``channel-group`` needs ``group_size`` (output channels per codebook row)."""

    kind: str = "network"
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("scope", self.kind, SCOPES)
        size = self.group_size
        wanted = self.kind == "channel-group"
        if wanted and not (is_int(size) and size >= 1):  # type: ignore[operator]
            raise OptionError(
                f"scope 'channel-group' needs group_size >= 1 (output channels per codebook row), "
                f"got {size!r}",
                "scope",
                "group_size",
            )
        if not wanted and size is not None:
            raise OptionError(
                f"{show('group_size', size)} applies to scope 'channel-group' only, not "
                f"{self.kind!r}",
                "group_size",
                "scope",
            )
        object.__setattr__(self, "group_size", None if size is None else int(size))


@dataclass(frozen=True, eq=False)
class HessianSource:
    """Where the importances come from.

    ``method`` is an estimator that draws ``samples`` (default 1000) from the data in batches of
    ``batch_size`` (default the estimator's): ``fisher``, ``empirical-fisher`` (no batch size),
    ``hutchinson``, ``gauss-newton``; or ``adam`` (needs ``state``: the Adam second moment, an
    .npz path or a mapping keyed by weight name); ``supplied`` (needs ``arrays``: diagonals keyed
    by weight name, or the path of an .npz written by ``onnxhq hessian``); ``none`` (unweighted).
    ``activations`` draws samples too but needs no gradients (`onnxhq.hessian.activations`).
    ``fallback`` (set when `compress` chose ``fisher`` itself) lets a model without a gradient
    graph fall back to ``activations``. ``by_cost`` (set when ``samples`` is not given) lets the
    estimate draw fewer than ``samples`` on a model whose samples are costly
    (`onnxhq.hessian.cost`). Equality compares paths as text and in-memory mappings by
    identity, and ignores ``fallback`` and ``by_cost``.
    """

    method: str = "fisher"
    samples: int | None = None
    batch_size: int | None = None
    state: PathLike | Mapping[str, Any] | None = None
    arrays: PathLike | Mapping[str, Any] | None = None
    fallback: bool = False
    by_cost: bool = False

    def __post_init__(self) -> None:
        method = self.method
        check_choice("hessian", method, HESSIAN_SOURCES)
        draws = (
            (
                "hessian_samples",
                self.samples,
                SAMPLING_HESSIANS,
                "the estimators that draw samples ({})",
            ),
            ("hessian_batch_size", self.batch_size, BATCHED_HESSIANS, "the {} Hessians"),
        )
        for name, value, owners, which in draws:
            if value is not None and not (is_int(value) and value >= 1):
                raise OptionError(f"{show(name, value)} must be an integer >= 1", name)
            if value is not None and method not in owners:
                raise OptionError(
                    f"{show(name, value)} applies to {which.format(', '.join(owners))} only, not "
                    f"to hessian={method!r}",
                    name,
                    "hessian",
                )
        if method in SAMPLING_HESSIANS and self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_HESSIAN_SAMPLES)
            object.__setattr__(self, "by_cost", True)
        inputs: tuple[tuple[str, str, object], ...] = (
            ("adam_state", "adam", self.state),
            ("arrays", SUPPLIED, self.arrays),
        )
        for name, owner, given in inputs:
            if given is not None and method != owner:
                raise OptionError(
                    f"{name} applies to hessian={owner!r} only, not to hessian={method!r}",
                    name,
                    "hessian",
                )
            if given is None and method == owner:
                what = "the Adam second moment of training" if owner == "adam" else "the diagonals"
                raise OptionError(
                    f"hessian={owner!r} needs {name}: {what}, keyed by weight name (an .npz path "
                    "or a mapping)",
                    name,
                    "hessian",
                )
            if given is not None and not (is_path(given) or isinstance(given, Mapping)):
                raise OptionError(
                    f"{name} must be an .npz path or a mapping of arrays keyed by weight name, got "
                    f"{type(given).__name__}",
                    name,
                )

    @property
    def weighs(self) -> bool:
        """False for ``none``: the quantizer runs unweighted."""
        return self.method != "none"

    @property
    def needs_data(self) -> bool:
        """True for the estimators that draw samples from the data."""
        return self.method in SAMPLING_HESSIANS

    def _key(self) -> tuple:
        return (self.method, self.samples, self.batch_size, token(self.state), token(self.arrays))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HessianSource) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass(frozen=True, eq=False)
class FineTune:
    """Fine-tune the codebook values (indices fixed) for ``epochs`` over labelled ``data`` (an
    .npz path or a `Dataset`) at peak Adam learning rate ``lr``. Equality compares a path as
    text and a `Dataset` by identity."""

    epochs: float
    data: PathLike | Dataset
    lr: float = DEFAULT_FINETUNE_LR

    def __post_init__(self) -> None:
        for name, value in (("finetune_epochs", self.epochs), ("finetune_lr", self.lr)):
            if not (is_real(value) and value > 0):
                raise OptionError(f"{show(name, value)} must be a finite number > 0", name)
        if self.data is None:
            raise OptionError(
                "codebook fine-tuning needs labelled training data: pass train_data", "train_data"
            )
        object.__setattr__(self, "epochs", float(self.epochs))
        object.__setattr__(self, "lr", float(self.lr))

    def _key(self) -> tuple:
        return (self.epochs, token(self.data), self.lr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FineTune) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


#: What `compress` does with a tensor a shared codebook wrecks (`onnxhq.quantize.guard`).
GUARDS = ("requantize", "warn", "off")


def check_output(output: object, finetune: object) -> str | tuple[str, ...] | None:
    """``output`` checked: None, ``NAME[:KIND]``, or several of them (a tuple; a list of one is
    its string). Several are refused with fine-tuning (``finetune`` not None), which reads the
    labels of one output."""
    several = isinstance(output, (list, tuple))
    items = list(output) if isinstance(output, (list, tuple)) else [output]
    if output is not None and not (items and all(isinstance(o, str) and o for o in items)):
        raise OptionError(f"{show('output', output)} must be a non-empty string (NAME[:KIND]), a "
                          "list of them, or None", "output")  # fmt: skip
    if not several or len(items) == 1:
        return items[0] if several else output  # type: ignore[return-value]
    if finetune is not None:
        raise OptionError(f"fine-tuning trains on the labels of one class-score output, and "
                          f"{len(items)} outputs were named: name one", "output",
                          "finetune_epochs")  # fmt: skip
    return tuple(items)  # type: ignore[arg-type]
