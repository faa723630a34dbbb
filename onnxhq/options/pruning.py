"""The options of `onnxhq.prune.prune_model` (and ``onnxhq prune``), checked before anything is
read: each bad value raises `OptionError` (a usage error, CLI exit status 2) naming it as the
keyword spells it (``sparsity=1.5``), what it is, and what to give instead."""

from __future__ import annotations

from collections.abc import Mapping

from .parts import OptionError, check_choice, is_int, is_real, show
from .vocabulary import PRUNE_CRITERIA, PRUNE_SCOPES


def check_prune_options(
    *,
    sparsity: object,
    criterion: object = PRUNE_CRITERIA[0],
    scope: object = None,
    steps: object = 4,
    retrain_epochs: object = 1.0,
    lr: object = 3e-4,
    batch_size: object = 64,
    hessian_samples: object = 1000,
    seed: object = 0,
) -> None:
    """Refuse any value `prune_model` cannot take (defaults as it has them); ``lr`` may also be
    a schedule (a callable). Which weights a per-layer ``sparsity`` names is checked later,
    against the model."""
    check_choice("criterion", criterion, PRUNE_CRITERIA)
    check_sparsity(sparsity, scope)
    for name, value in (("steps", steps), ("batch_size", batch_size),
                        ("hessian_samples", hessian_samples)):  # fmt: skip
        if not (is_int(value) and value >= 1):  # type: ignore[operator]
            raise OptionError(f"{show(name, value)} must be an integer >= 1", name)
    if not (is_int(seed) and seed >= 0):  # type: ignore[operator]
        raise OptionError(f"{show('seed', seed)} must be an integer >= 0", "seed")
    if not (is_real(retrain_epochs) and retrain_epochs >= 0):  # type: ignore[operator]
        raise OptionError(
            f"{show('retrain_epochs', retrain_epochs)} must be a number >= 0 (0: no retraining)",
            "retrain_epochs",
        )
    if not callable(lr) and not (is_real(lr) and lr > 0):  # type: ignore[operator]
        raise OptionError(f"{show('lr', lr)} must be a positive number (e.g. 3e-4)", "lr")


def check_sparsity(sparsity: object, scope: object) -> str:
    """The scope ``sparsity`` is pruned with (``scope``, or by default ``global`` for one number
    and ``layer`` for a mapping weight name -> fraction), once every fraction is in [0, 1)."""
    per_layer = isinstance(sparsity, Mapping)
    if scope is None:
        scope = "layer" if per_layer else "global"
    check_choice("scope", scope, PRUNE_SCOPES)
    if per_layer and scope == "global":
        raise OptionError(
            "per-layer sparsities need scope='layer'; give one number for a global target",
            "scope",
        )
    if not per_layer:
        if not _fraction(sparsity):
            raise OptionError(
                f"{show('sparsity', sparsity)} is outside [0, 1); it is the fraction of the "
                "weights set to zero",
                "sparsity",
            )
        return str(scope)
    assert isinstance(sparsity, Mapping)
    for name, s in sparsity.items():
        if not _fraction(s):
            raise OptionError(
                f"sparsity {s!r} of {name!r} is outside [0, 1); it is the fraction of the weights "
                "set to zero",
                "sparsity",
            )
    return str(scope)


def _fraction(value: object) -> bool:
    return is_real(value) and 0.0 <= value < 1.0  # type: ignore[operator]
