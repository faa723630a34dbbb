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
One worker serves every gradient session of the process and starts on first use.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def cache_env() -> Path:
    """The folder ``onnxhq setup-training`` creates the worker environment in."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxhq" / "training"


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_training_build() -> bool:
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
    if _has_training_build():
        return sys.executable
    cached = env_python(cache_env())
    return str(cached) if cached.is_file() else None


def unavailable_message(what: str) -> str:
    return (
        f"{what} needs onnxruntime-training, kept apart from your onnxruntime: run "
        f"'onnxhq setup-training' once (a separate environment in {cache_env()}) or set "
        f"{ENV_PYTHON} to a python that has {TRAINING_PACKAGE}"
    )


def setup_training(env: str | os.PathLike | None = None, *, python: str | None = None) -> Path:
    """Create the worker environment (a venv with the training build and numpy); returns its python.

    ``python`` is the interpreter to create it with (one the training build has wheels for,
    CPython 3.8-3.12); default this one.
    """
    env = Path(env) if env is not None else cache_env()
    creator = python or sys.executable
    steps = [
        [creator, "-m", "venv", str(env)],
        [str(env_python(env)), "-m", "pip", "install", "--quiet", TRAINING_PACKAGE, "numpy"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise TrainingUnavailable(f"could not create the training environment in {env}: {last}")
    return env_python(env)


class Worker:
    """One worker process; `request` sends a frame and returns the reply's arrays."""

    def __init__(self, python: str) -> None:
        self.python = python
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the worker
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [python, worker_main.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )

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
            raise ModelError(self._death_message(op))
        if str(reply["op"]) == "error":
            raise ModelError(f"gradient worker: {reply['message']}")
        return reply

    def _death_message(self, op: str) -> str:
        code = self._proc.wait()
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode(errors="replace").splitlines()]
        last = next((ln for ln in reversed(lines) if ln), "no message")
        return (
            f"onnxruntime-training stopped during '{op}' (exit {code}): {last[-400:]}; "
            "this model's gradient graph cannot be built, use --hessian activations or none"
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
        self, worker: Worker, model: bytes, loss: str, params: Sequence[str], threads: int = 0
    ) -> None:
        reply = worker.request(
            "build",
            model=np.frombuffer(model, np.uint8),
            loss=np.array(loss),
            params=np.array(list(params), dtype=str),
            threads=np.int64(threads),
        )
        self.worker = worker
        self.id = int(reply["id"])
        self.output_names = [str(n) for n in reply["outputs"]]

    def run(self, fetch: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = {f"in:{k}": np.asarray(v) for k, v in feed.items()}
        reply = self.worker.request(
            "run", id=np.int64(self.id), fetch=np.array(list(fetch), dtype=str), **arrays
        )
        return [reply[f"out:{i}"] for i in range(len(fetch))]

    def __del__(self) -> None:
        try:
            if self.worker.alive():
                self.worker.request("drop", id=np.int64(self.id))
        except Exception:  # interpreter shutdown or a dead worker: nothing left to free
            pass


def gradient_session(
    model: bytes, loss: str, params: Sequence[str], *, threads: int = 0
) -> RemoteSession:
    """Build the gradient graph of the training graph ``model`` (serialized, opset <= 21, IR <= 10)
    in the worker and open a session on it: outputs ``loss`` then ``<param>_grad``."""
    return RemoteSession(shared_worker(), model, loss, params, threads)
