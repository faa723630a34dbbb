"""Gradient sessions in a separate process, so onnxhq never shares an environment with the
training build of onnxruntime.

onnxruntime-training provides the module ``onnxruntime`` too, so installing it beside a user's
onnxruntime would replace theirs. onnxhq therefore depends on the ordinary onnxruntime and runs
the gradient builder and the gradient sessions in a worker process (`worker_main`) whose
interpreter has the training build. The worker is found, in this order:

1. the interpreter named by the environment variable ``ONNXHQ_TRAINING_PYTHON``;
2. this interpreter, when its onnxruntime is the training build;
3. the environment ``onnxhq setup-training`` creates once in the cache folder
   (``$XDG_CACHE_HOME/onnxhq/training``, default ``~/.cache/onnxhq/training``).

A worker process also keeps a native abort of the gradient builder from taking onnxhq down: the
parent sees the worker die and raises `ModelError` quoting the worker's last stderr line.
One worker serves every gradient session of the process and starts on first use (a handshake:
an interpreter that cannot serve raises `TrainingUnavailable`). A session keeps the feeds it was
last sent, so parameters that did not change between calls cross the pipe once.

`training_available` says, without starting anything, whether an interpreter was found;
`unavailable_message` is the one line that says how to get one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np

from ..errors import ModelError, OnnxhqError
from . import worker_main

#: The training build the worker environment gets; it runs opsets <= 21 and IR versions <= 10.
TRAINING_PACKAGE = "onnxruntime-training-cpu==1.19.2"
TRAINING_MAX_OPSET = 21
TRAINING_MAX_IR = 10
ENV_PYTHON = "ONNXHQ_TRAINING_PYTHON"


class TrainingUnavailable(OnnxhqError):
    """No interpreter with onnxruntime-training was found for the gradient worker."""


class BuildRefused(ModelError):
    """The gradient builder refused the graph; the message is the builder's own (one line)."""


def cache_env() -> Path:
    """The folder ``onnxhq setup-training`` creates the worker environment in."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxhq" / "training"


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_training_build() -> bool:
    """Whether this interpreter's onnxruntime is the training build (without importing it)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "training").is_dir() for p in spec.submodule_search_locations)


def find_training_python() -> str | None:
    """The interpreter the worker runs in, or None when there is none (see the module doc)."""
    named = os.environ.get(ENV_PYTHON)
    if named:
        if not Path(named).is_file():
            raise TrainingUnavailable(
                f"{ENV_PYTHON}={named} is not a file; point it at a python "
                "whose onnxruntime is onnxruntime-training, or unset it"
            )
        return named
    if has_training_build():
        return sys.executable
    cached = env_python(cache_env())
    return str(cached) if cached.is_file() else None


def training_available() -> bool:
    """Whether a gradient worker can be started: an interpreter for it was found (see the module
    doc). Cheap: it starts nothing; the first gradient session checks the interpreter itself."""
    try:
        return find_training_python() is not None
    except TrainingUnavailable:
        return False


def unavailable_message(what: str) -> str:
    """One line: ``what`` (e.g. "--hessian fisher") needs onnxruntime-training; how to get it."""
    return (
        f"{what} needs onnxruntime-training, kept apart from your onnxruntime: run "
        f"'onnxhq setup-training' once (a separate environment in {cache_env()}) or set "
        f"{ENV_PYTHON} to a python that has {TRAINING_PACKAGE}"
    )


def setup_training(env: str | os.PathLike | None = None, *, python: str | None = None) -> Path:
    """Create the worker environment (a venv with the training build, onnx and numpy) in ``env``
    (default `cache_env`); returns its python. Needs the network (pip).

    ``python`` is the interpreter to create it with (one the training build has wheels for,
    CPython 3.8-3.12); default this one.
    """
    env = Path(env) if env is not None else cache_env()
    creator = python or sys.executable
    steps = [
        [creator, "-m", "venv", str(env)],
        [
            str(env_python(env)),
            "-m",
            "pip",
            "install",
            "--quiet",
            TRAINING_PACKAGE,
            "onnx",
            "numpy",
        ],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True)
        except OSError as exc:
            raise TrainingUnavailable(f"cannot run {step[0]}: {exc.strerror}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise TrainingUnavailable(
                f"could not create the training environment in {env}: {last} (it needs the "
                "network once, and a CPython 3.8-3.12 to create it with)"
            )
    return env_python(env)


def serves_gradients(python: str) -> bool:
    """Whether ``python`` runs the gradient worker (starts one for the handshake, then stops it)."""
    try:
        Worker(python).close()
    except TrainingUnavailable:
        return False
    return True


class Worker:
    """One worker process; `request` sends a frame and returns the reply's arrays."""

    def __init__(self, python: str) -> None:
        self.python = python
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the worker
        self._lock = threading.Lock()
        try:
            self._proc = subprocess.Popen(
                [python, worker_main.__file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env={**os.environ, "PYTHONNOUSERSITE": "1"},
            )
        except OSError as exc:
            self._log.close()
            raise TrainingUnavailable(
                f"cannot start {python} ({exc.strerror}); " + unavailable_message("a gradient")
            ) from None
        for pipe in (self._proc.stdin, self._proc.stdout):
            _widen(pipe)
        try:  # the handshake: an interpreter without the training build exits at once
            self.version = str(self.request("version")["version"])
        except ModelError:
            why = self._last_line()
            self.close()
            raise TrainingUnavailable(
                f"the gradient worker did not start in {python} ({why[-200:]}); "
                + unavailable_message("a gradient")
            ) from None

    def alive(self) -> bool:
        return self._proc.poll() is None

    def request(self, op: str, **arrays) -> dict[str, np.ndarray]:
        with self._lock:
            try:
                worker_main.write_frame(self._proc.stdin, {"op": np.array(op), **arrays})
                reply = worker_main.read_frame(self._proc.stdout)
            except (BrokenPipeError, OSError):
                reply = None
        if reply is None:
            raise (BuildRefused if op == "build" else ModelError)(self._death_message(op))
        if str(reply["op"]) == "error":
            kind = BuildRefused if str(reply["kind"]) == "build" else ModelError
            raise kind(str(reply["message"]))
        return reply

    def _last_line(self) -> str:
        """The worker's last non-empty stderr line (after it died)."""
        self._proc.wait()
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode(errors="replace").splitlines()]
        return next((ln for ln in reversed(lines) if ln), "no message")

    def _death_message(self, op: str) -> str:
        last, code = self._last_line()[-200:], self._proc.returncode
        if op == "build":  # the engine adds what to do instead (`graph.gradient_build_error`)
            return f"onnxruntime-training aborted building the gradient graph (exit {code}): {last}"
        return (
            f"the gradient worker stopped during '{op}' (exit {code}): {last}; "
            "use --hessian activations or none"
        )

    def close(self) -> None:
        if self.alive():
            try:
                assert self._proc.stdin is not None  # opened with stdin=PIPE
                worker_main.write_frame(self._proc.stdin, {"op": np.array("exit")})
                self._proc.stdin.close()
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._log.close()


def _widen(pipe) -> None:
    """Give ``pipe`` a 1 MiB buffer where Linux allows it: fewer switches per frame."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setsize is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), setsize, 1 << 20)


_shared: Worker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> Worker:
    """The process-wide worker, started (again, if it died) on first use."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive():
            python = find_training_python()
            if python is None:
                raise TrainingUnavailable(unavailable_message("this Hessian or training step"))
            _shared = Worker(python)
            atexit.register(_shared.close)
        return _shared


class RemoteSession:
    """A gradient session in the worker, used like an ``onnxruntime.InferenceSession``."""

    def __init__(
        self,
        worker: Worker,
        model: bytes,
        loss: str,
        params: Sequence[str],
        threads: int = 0,
        convert_to: tuple[int, int] = (0, 0),
    ) -> None:
        reply = worker.request(
            "build",
            model=np.frombuffer(model, np.uint8),
            loss=np.array(loss),
            params=np.array(list(params), dtype=str),
            threads=np.int64(threads),
            opset=np.int64(convert_to[0]),
            ir_version=np.int64(convert_to[1]),
        )
        self.worker = worker
        self.id = int(reply["id"])
        self.output_names = [str(n) for n in reply["outputs"]]
        self._sent: dict[str, np.ndarray] = {}  # what the worker keeps for this session

    def run(self, fetch: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The ``fetch`` outputs for ``feed``; feeds equal to the last ones sent are not resent."""
        arrays = {}
        for name, value in feed.items():
            value = np.asarray(value)
            last = self._sent.get(name)
            if last is None or not _same(last, value):
                arrays[f"set:{name}"] = value
                self._sent[name] = value.copy()
        reply = self.worker.request(
            "run",
            id=np.int64(self.id),
            fetch=np.array(list(fetch), dtype=str),
            feeds=np.array(list(feed), dtype=str),
            **arrays,
        )
        return [reply[f"out:{i}"] for i in range(len(fetch))]

    def __del__(self) -> None:
        try:
            if self.worker.alive():
                self.worker.request("drop", id=np.int64(self.id))
        except Exception:  # interpreter shutdown or a dead worker: nothing left to free
            pass


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def gradient_session(
    model: bytes,
    loss: str,
    params: Sequence[str],
    *,
    threads: int = 0,
    opset: int = 0,
    ir_version: int = 0,
) -> RemoteSession:
    """Build the gradient graph of the training graph ``model`` (serialized) in the worker and
    open a session on it: outputs ``loss`` then ``<param>_grad``.

    ``opset`` and ``ir_version`` are the model's (0: unknown, taken as supported); above
    `TRAINING_MAX_OPSET` / `TRAINING_MAX_IR` the worker converts the graph down first.
    Raises `TrainingUnavailable` without a worker, `ModelError` (one line) when it fails.
    """
    targets = (
        TRAINING_MAX_OPSET if opset > TRAINING_MAX_OPSET else 0,
        TRAINING_MAX_IR if ir_version > TRAINING_MAX_IR or opset > TRAINING_MAX_OPSET else 0,
    )
    return RemoteSession(shared_worker(), model, loss, params, threads, targets)
