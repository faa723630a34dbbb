"""Markers for tests that need onnxruntime-training, which onnxhq keeps out of the user's
environment (`onnxhq.training.worker`).

``needs_training``: the test computes gradients through the worker; skipped, with the way to
enable it, when no training interpreter is reachable (``make test-no-training``).
``needs_training_build``: the test runs the gradient builder in this very process; skipped
unless this interpreter's onnxruntime is the training build (the repository's ``.venv``-training
setups, or ``ONNXHQ_TRAINING_INPROCESS=1`` runs).
"""

from __future__ import annotations

import pytest

from onnxhq.training.worker import has_training_build, training_available, unavailable_message

_AVAILABLE = training_available()
needs_training = pytest.mark.skipif(not _AVAILABLE, reason=unavailable_message("this test"))
needs_training_build = pytest.mark.skipif(
    not has_training_build(),
    reason="runs the gradient builder in-process: this interpreter's onnxruntime is not "
    "onnxruntime-training (the worker's tests cover the same path)",
)

#: What the worker lookup's `TrainingUnavailable` says (no training interpreter found), also when
#: a CLI run in a subprocess printed it.
UNAVAILABLE = "needs onnxruntime-training, kept apart from your onnxruntime"


def without_training(test):
    """Declare that ``test`` must pass with no training interpreter (a forward-only path, a
    fallback): the hook below never turns its failure into a skip."""
    test.without_training = True
    return test


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without a training interpreter, a test whose failure quotes the worker lookup's message
    (`TrainingUnavailable` raised, or printed by a CLI run in a subprocess) is reported skipped
    with that message: it computes gradients without saying so by ``needs_training``. Other
    `TrainingUnavailable` errors (a misused ``ONNXHQ_TRAINING_*`` setting) and tests marked
    `without_training` stay failures; with a training interpreter reachable nothing changes.
    Registered by conftest."""
    outcome = yield
    report = outcome.get_result()
    info = call.excinfo
    if _AVAILABLE or info is None or not report.failed:
        return
    if getattr(getattr(item, "obj", None), "without_training", False):
        return
    text = str(info.value)
    start = text.find(UNAVAILABLE)
    if start < 0:
        return
    reason = text[text.rfind("\n", 0, start) + 1 :].splitlines()[0]
    report.outcome = "skipped"
    line = item.location[1] if item.location[1] is not None else 0
    report.longrepr = (str(item.path), line + 1, f"Skipped: {reason}")
