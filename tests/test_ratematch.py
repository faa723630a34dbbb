"""match_rate: the smallest fitting rate multiplier, to 5 %, in a handful of assignments."""

import pytest

from onnxhq.errors import DataError
from onnxhq.ratematch import TOL, match_rate


def _sizes(root: float, power: float, tries: list[float]):
    """A size falling as ``lam**power`` from 1000 bits over the target at 0, 0 at ``root``."""

    def assign(lam: float) -> float:
        tries.append(lam)
        return 1000.0 * (1.0 - (lam / root) ** power)  # bits over the target

    return assign


@pytest.mark.parametrize("power", [0.3, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("root", [1e-9, 3e-4, 0.02, 40.0])
def test_the_smallest_fitting_multiplier_within_five_percent(root, power):
    tries: list[float] = []
    lam, got = match_rate(_sizes(root, power, tries), lambda bits: bits, 0.0, unit=1e-3)
    assert got <= 0 and lam >= root * (1 - 1e-12)  # it fits, so it is not below the root
    assert lam - root <= TOL * lam  # and it is the smallest, to 5 %
    assert got == 1000.0 * (1.0 - (lam / root) ** power)  # the assignment of that multiplier
    assert len(tries) == len(set(tries)) <= 12  # each multiplier assigned once, few of them


def test_a_fit_at_zero_and_no_fit_at_all():
    assert match_rate(lambda lam: lam, lambda lam: -1.0, 0.0, unit=1.0) == (0.0, 0.0)
    with pytest.raises(DataError, match="no rate multiplier meets"):
        match_rate(lambda lam: lam, lambda lam: 1.0, 0.0, unit=1.0)
