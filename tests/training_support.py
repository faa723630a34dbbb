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

from onnxhq.training.worker import (
    TrainingUnavailable,
    has_training_build,
    training_available,
    unavailable_message,
)

needs_training = pytest.mark.skipif(
    not training_available(), reason=unavailable_message("this test")
)
needs_training_build = pytest.mark.skipif(
    not has_training_build(),
    reason="runs the gradient builder in-process: this interpreter's onnxruntime is not "
    "onnxruntime-training (the worker's tests cover the same path)",
)


_AVAILABLE = training_available()
#: What every `TrainingUnavailable` message says, also when a CLI run in a subprocess printed it.
UNAVAILABLE = "needs onnxruntime-training, kept apart from your onnxruntime"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without a training interpreter, a test that fails with `TrainingUnavailable`, or whose
    failure quotes its message (a CLI run in a subprocess), is reported skipped with that message:
    it computes gradients without saying so by ``needs_training``. With a training interpreter
    reachable nothing changes: such an error stays a failure. Registered by conftest."""
    outcome = yield
    report = outcome.get_result()
    info = call.excinfo
    if _AVAILABLE or info is None or not report.failed:
        return
    text = str(info.value)
    if info.errisinstance(TrainingUnavailable) or UNAVAILABLE in text:
        start = text.find(UNAVAILABLE)
        reason = text if start < 0 else text[text.rfind("\n", 0, start) + 1 :].splitlines()[0]
        report.outcome = "skipped"
        line = item.location[1] if item.location[1] is not None else 0
        report.longrepr = (str(item.path), line + 1, f"Skipped: {reason}")
