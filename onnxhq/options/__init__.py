"""Typed options of `compress`, `sweep` and the CLI, checked before any model is read.

Every option type is a frozen dataclass that validates itself on construction and raises
`OptionError` (a `ConfigError`) with one line naming the option, its value and what to give
instead. `CompressOptions` also checks how its parts fit together, mirroring the quantizers' own
checks, so that a misconfigured run fails at once instead of after the Hessian estimate. An
argument that the chosen method ignores is an error, never silently dropped.

``CompressOptions.to_dict`` is the keyword form of `compress` (JSON-safe; what a report stores as
``settings``) and ``CompressOptions.from_dict`` reads it back; in-memory inputs (Hessian arrays,
an Adam state mapping, a training `Dataset`) serialise as ``"supplied"``.

- `vocabulary`: the names options take (`METHODS`, `SCOPES`, `HESSIAN_METHODS`...) and defaults;
- `parts`: `Rate`, `Scope`, `HessianSource`, `FineTune` and `OptionError`;
- `target`: `Target`, a fidelity to reach instead of a rate;
- `compress`: `CompressOptions`, its keyword form, and the checks `compress` runs first.

Light: no numpy, onnx or onnxruntime, so the CLI builds its choices from it at once.
"""

from .compress import (
    KEYWORDS,
    CompressOptions,
    check_rate,
    require_data,
    require_eval,
    resolve_options,
)
from .parts import GUARDS, FineTune, HessianSource, OptionError, Rate, Scope, default_rate
from .target import Target
from .vocabulary import (
    BATCHED_HESSIANS,
    DEFAULT_FINETUNE_LR,
    DEFAULT_HESSIAN_SAMPLES,
    DEFAULT_K,
    DEFAULT_METHOD,
    DEFAULT_TARGET_BITS,
    EXTRA_OPS,
    HESSIAN_METHODS,
    HESSIAN_SOURCES,
    METHODS,
    PRUNE_CRITERIA,
    PRUNE_SCOPES,
    RATES,
    SAMPLING_HESSIANS,
    SCOPES,
    SUPPLIED,
    WEIGHTED_METHODS,
)

__all__ = [
    "BATCHED_HESSIANS",
    "DEFAULT_FINETUNE_LR",
    "DEFAULT_HESSIAN_SAMPLES",
    "DEFAULT_K",
    "DEFAULT_METHOD",
    "DEFAULT_TARGET_BITS",
    "EXTRA_OPS",
    "GUARDS",
    "HESSIAN_METHODS",
    "HESSIAN_SOURCES",
    "KEYWORDS",
    "METHODS",
    "PRUNE_CRITERIA",
    "PRUNE_SCOPES",
    "RATES",
    "SAMPLING_HESSIANS",
    "SCOPES",
    "SUPPLIED",
    "WEIGHTED_METHODS",
    "CompressOptions",
    "FineTune",
    "HessianSource",
    "OptionError",
    "Rate",
    "Scope",
    "Target",
    "check_rate",
    "default_rate",
    "require_data",
    "require_eval",
    "resolve_options",
]
