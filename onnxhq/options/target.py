"""`Target`: a fidelity to reach instead of a rate, and the metric names it may take."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .parts import OptionError, check_choice, is_real, show

#: Fidelity metrics a ``min_fidelity`` target may name (`onnxhq.fidelity.METRICS`), and where
#: smaller is better (the target is then an upper bound).
FIDELITY_METRICS = (
    "agreement", "kl", "sequence", "accuracy", "iou", "max_abs_error", "cosine", "cosine_min",
    "sqnr_db",
)  # fmt: skip
LOWER_IS_BETTER = frozenset({"kl", "max_abs_error"})
#: Other spellings accepted in targets.
METRIC_ALIASES = {"sqnr": "sqnr_db", "top1": "agreement"}
#: The metric of a ``max_drop`` target: accuracy points lost against the original.
ACCURACY_DROP = "accuracy_drop"


_BOUNDS = {m: (0.0, 1.0) for m in ("agreement", "sequence", "accuracy", "iou")}
_BOUNDS.update({"cosine": (-1.0, 1.0), "cosine_min": (-1.0, 1.0)})


@dataclass(frozen=True)
class Target:
    """A fidelity to reach instead of a rate: `compress` searches rate and scope for the smallest
    artifacts that reach it on the eval data.

    ``metric`` is a name of `FIDELITY_METRICS` (compressed against original, label-free) or
    ``"accuracy_drop"`` (``max_drop``: top-1 accuracy points lost, needs labels); ``value`` is the
    bound: at most ``value`` for ``accuracy_drop``, ``kl`` and ``max_abs_error``, at least it for
    the others.
    """

    metric: str
    value: float

    def __post_init__(self) -> None:
        metric = METRIC_ALIASES.get(self.metric, self.metric)
        if metric != ACCURACY_DROP:
            check_choice("min_fidelity", metric, FIDELITY_METRICS)
        if not is_real(self.value):
            raise OptionError(f"{self.field}: the bound of {metric} must be a finite number, "
                              f"not {self.value!r}", self.field)  # fmt: skip
        low, high = _BOUNDS.get(metric, (-math.inf, math.inf))
        if not low <= self.value <= high:
            raise OptionError(f"min_fidelity: {metric}={self.value:g} is out of range: {metric} is "
                              f"{'a share' if low == 0 else 'a cosine'} in [{low:g}, {high:g}]",
                              "min_fidelity")  # fmt: skip
        if metric == ACCURACY_DROP and not 0 <= self.value <= 100:
            raise OptionError(f"{show('max_drop', self.value)} must be accuracy points in [0, "
                              "100]", "max_drop")  # fmt: skip
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "value", float(self.value))

    @property
    def field(self) -> str:
        """The `compress` keyword that sets it: ``max_drop`` or ``min_fidelity``."""
        return "max_drop" if self.metric == ACCURACY_DROP else "min_fidelity"

    @property
    def upper(self) -> bool:
        """True when ``value`` is an upper bound (a drop, ``kl``, ``max_abs_error``)."""
        return self.metric == ACCURACY_DROP or self.metric in LOWER_IS_BETTER

    def label(self) -> str:
        """``max_drop=0.5`` or ``min_fidelity='cosine=0.995'``, as `compress` takes it."""
        if self.metric == ACCURACY_DROP:
            return show("max_drop", self.value)
        return f"min_fidelity='{self.metric}={self.value:g}'"

    def reached(self, value: float) -> bool:
        """Whether a measured ``value`` of the metric meets the target."""
        return value <= self.value if self.upper else value >= self.value

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"METRIC=VALUE"`` (``min_fidelity``): ``Target.parse("cosine=0.995")``."""
        if not isinstance(text, str):
            raise OptionError(f"min_fidelity must be 'METRIC=VALUE' text, not {text!r}",
                              "min_fidelity")  # fmt: skip
        name, sep, number = (part.strip() for part in text.partition("="))
        name = METRIC_ALIASES.get(name, name)
        if not sep or name not in FIDELITY_METRICS:
            raise OptionError(
                f"min_fidelity={text!r} is not METRIC=VALUE with METRIC one of "
                f"{', '.join(sorted({*FIDELITY_METRICS, *METRIC_ALIASES}))}; e.g. agreement=0.99",
                "min_fidelity",
            )
        try:
            value = float(number)
        except ValueError:
            raise OptionError(f"min_fidelity={text!r}: {number!r} is not a number",
                              "min_fidelity") from None  # fmt: skip
        return cls(name, value)

    @classmethod
    def of(cls, max_drop: float | None, min_fidelity: str | None) -> Target | None:
        """The target of `compress`'s keywords (at most one given), or None."""
        if max_drop is not None and min_fidelity is not None:
            raise OptionError("give max_drop or min_fidelity, not both", "max_drop", "min_fidelity")
        if min_fidelity is not None:
            return cls.parse(min_fidelity)
        return None if max_drop is None else cls(ACCURACY_DROP, max_drop)
