"""Mixed precision under a byte budget: one stored form per tensor, chosen greedily.

Each tensor offers a few forms (say 4 bits in blocks of 32, 8 bits in blocks of 128), each with
its bytes and its distortion (importance-weighted squared error). `allocate` starts every tensor
at its smallest form and, while the budget allows, makes the one upgrade (any tensor, to any of
its larger forms) that removes the most distortion per extra byte: the greedy solution of the
multiple-choice knapsack, optimal at the points it passes through when each tensor's forms are
convex in (bytes, distortion). Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Form:
    """One way to store a tensor: ``label`` (free text, e.g. ``"4-bit/32"``), its ``bytes`` and
    the ``distortion`` it causes."""

    label: str
    bytes: int
    distortion: float


def allocate(forms: Mapping[str, Sequence[Form]], budget: int | None = None) -> dict[str, Form]:
    """Tensor name -> the chosen `Form`, total bytes at most ``budget``.

    ``budget`` None: every tensor takes its least-distortion form (ties: fewer bytes). A budget
    below the sum of the smallest forms raises ConfigError naming both. Deterministic: ties go
    to the tensor and form listed first.
    """
    if any(not f for f in forms.values()):
        empty = next(n for n, f in forms.items() if not f)
        raise ConfigError(f"tensor {empty!r} has no form to store it in")
    if budget is None:
        return {n: min(f, key=lambda x: (x.distortion, x.bytes)) for n, f in forms.items()}
    chosen = {n: min(f, key=lambda x: (x.bytes, x.distortion)) for n, f in forms.items()}
    total = sum(f.bytes for f in chosen.values())
    if total > budget:
        raise ConfigError(
            f"the smallest forms of the {len(forms)} tensors take {total:,} bytes, more than the "
            f"budget of {budget:,}; raise the budget or use fewer bits"
        )
    while True:
        best = None
        for name, options in forms.items():
            cur = chosen[name]
            for f in options:
                extra = f.bytes - cur.bytes
                gain = cur.distortion - f.distortion
                if gain <= 0 or total + extra > budget:
                    continue
                rate = gain / extra if extra > 0 else float("inf")
                if best is None or rate > best[0]:
                    best = (rate, name, f)
        if best is None:
            return chosen
        _, name, f = best
        total += f.bytes - chosen[name].bytes
        chosen[name] = f
