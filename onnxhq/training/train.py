"""Adam on the mean cross-entropy, in resumable steps, with one cosine learning-rate schedule.

A run is a `TrainState`: parameters, Adam moments, the steps taken and planned, the rest of the
current shuffled pass and the random generator's state. `start_training` makes one,
`train_steps` advances it by any number of steps and returns the new state, and
`save_checkpoint` / `load_checkpoint` keep it in a file, so a long run can stop and resume
anywhere with bit-identical results. `train` runs a whole run in one call.

Inputs are never mutated; the engine's own values change only in `train`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_write_bytes
from ..data import read_npz
from ..errors import ConfigError, DataError
from ..numeric import is_int

if TYPE_CHECKING:
    from .engine import GradientEngine

Arrays = Mapping[str, np.ndarray]
#: A learning rate: a number, or a function of the fraction of the run done (0..1).
Rate = float | Callable[[float], float]
#: ``(feed, rng) -> feed``, applied to each training batch.
Augment = Callable[[dict, np.random.Generator], dict]
#: Called after every step with (steps done, steps in the run, batch loss).
Progress = Callable[[int, int, float], None]


def cosine_lr(base: float, floor: float = 0.01) -> Callable[[float], float]:
    """The schedule ``f -> base * (floor + (1 - floor) * (1 + cos(pi f)) / 2)``, f in [0, 1].

    It starts at ``base`` and decays to ``floor * base`` at the end of the run.
    """
    if not (base > 0 and math.isfinite(base)):
        raise ConfigError(f"learning rate {base} must be a positive number (e.g. 1e-3)")
    if not 0 <= floor <= 1:
        raise ConfigError(f"floor={floor} is outside [0, 1]; it is the final rate over the first")
    return lambda f: base * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * f)))


# --- Adam -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamState:
    """First and second moments (keyed like the parameters, float32) after ``step`` updates."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int
    beta1: float = 0.9
    beta2: float = 0.999

    def second_moment(self) -> dict[str, np.ndarray]:
        """Bias-corrected second moment v-hat (the paper's Hessian alternative takes its root)."""
        scale = 1.0 / (1.0 - self.beta2 ** max(self.step, 1))
        return {k: (v * scale).astype(np.float32) for k, v in self.v.items()}


def adam_init(params: Arrays) -> AdamState:
    """Zero moments shaped like ``params``."""
    zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()}
    return AdamState(m=zeros, v={k: z.copy() for k, z in zeros.items()}, step=0)


def adam_step(
    params: Arrays,
    grads: Arrays,
    state: AdamState,
    *,
    lr: float,
    eps: float = 1e-8,
    masks: Arrays | None = None,
) -> tuple[dict[str, np.ndarray], AdamState]:
    """One Adam update; returns new parameters and state (inputs are not mutated).

    ``masks`` (bool, True = keep) hold pruned entries at exactly zero.
    """
    t = state.step + 1
    b1, b2 = state.beta1, state.beta2
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = b1 * state.m[k] + (1 - b1) * g
        v = b2 * state.v[k] + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        q = p - lr * mhat / (np.sqrt(vhat) + eps)
        if masks is not None and k in masks:
            q = np.where(masks[k], q, 0.0)
        new_p[k], new_m[k], new_v[k] = q.astype(p.dtype), m.astype(np.float32), v.astype(np.float32)
    return new_p, AdamState(new_m, new_v, t, b1, b2)


# --- resumable runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainState:
    """A training run between two steps.

    ``done`` of ``total`` steps are taken; ``order`` (int64) holds the sample indices of the
    current shuffled pass not used yet, and ``rng`` the numpy bit generator's state that draws
    the next passes and feeds ``augment``.
    """

    params: dict[str, np.ndarray]
    adam: AdamState
    done: int
    total: int
    samples: int
    batch_size: int
    order: np.ndarray
    rng: dict[str, Any]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.samples // self.batch_size)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def start_training(
    params: Arrays,
    samples: int,
    *,
    epochs: float,
    batch_size: int = 64,
    seed: int = 0,
    masks: Arrays | None = None,
    adam: AdamState | None = None,
) -> TrainState:
    """A run of ``epochs`` passes over ``samples`` samples from ``params``, nothing done yet.

    ``masks`` zero the masked-out entries of the starting parameters; ``adam`` continues the
    moments of an earlier run (default: zero moments).
    """
    if not (is_int(samples) and samples > 0):
        raise ConfigError(f"samples={samples} must be a positive integer (the training set size)")
    if not (is_int(batch_size) and batch_size > 0):
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    if not (epochs >= 0 and math.isfinite(epochs)):
        raise ConfigError(f"epochs={epochs} must be a nonnegative number")
    start = {k: np.array(v, copy=True) for k, v in params.items()}
    if masks is not None:
        start = {
            k: np.where(masks[k], v, 0).astype(v.dtype) if k in masks else v
            for k, v in start.items()
        }
    per_epoch = max(1, int(samples) // int(batch_size))
    return TrainState(
        params=start,
        adam=adam if adam is not None else adam_init(start),
        done=0,
        total=round(epochs * per_epoch),
        samples=int(samples),
        batch_size=int(batch_size),
        order=np.zeros(0, np.int64),
        rng=dict(np.random.default_rng(seed).bit_generator.state),
    )


def train_steps(
    engine: GradientEngine,
    inputs: Arrays,
    labels: np.ndarray,
    state: TrainState,
    *,
    steps: int | None = None,
    lr: Rate = 1e-3,
    masks: Arrays | None = None,
    augment: Augment | None = None,
    progress: Progress | None = None,
) -> TrainState:
    """Take ``steps`` more Adam steps (default: to the end of the run); returns the new state.

    Each step draws ``batch_size`` samples from shuffled passes over ``inputs`` (name -> (N, ...))
    and ``labels`` (N,). ``lr``, ``masks`` and ``augment`` belong to the run: give every call the
    same ones, and the steps equal those of one uninterrupted call.
    """
    if steps is not None and not (is_int(steps) and steps >= 0):
        raise ConfigError(f"steps={steps} must be a nonnegative integer (or None: to the end)")
    if len(labels) != state.samples:
        raise ConfigError(
            f"the training run was started for {state.samples} samples but the data has "
            f"{len(labels)}; resume it with the same data"
        )
    stop = state.total if steps is None else min(state.total, state.done + int(steps))
    rng = _generator(state.rng)
    params, adam, order, bs = state.params, state.adam, state.order, state.batch_size
    for step in range(state.done, stop):
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(state.samples)])
        batch, order = order[:bs], order[bs:]
        feed = {k: v[batch] for k, v in inputs.items()}
        if augment is not None:
            feed = augment(feed, rng)
        loss, grads = engine.loss_and_gradients(feed, labels[batch], params)
        rate = lr(step / state.total) if callable(lr) else lr
        params, adam = adam_step(params, grads, adam, lr=rate, masks=masks)
        if progress is not None:
            progress(step + 1, state.total, loss)
    done = max(stop, state.done)
    return TrainState(
        params, adam, done, state.total, state.samples, bs, order, dict(rng.bit_generator.state)
    )


def train(
    engine: GradientEngine,
    inputs: Arrays,
    labels: np.ndarray,
    *,
    epochs: float,
    batch_size: int = 64,
    lr: Rate = 1e-3,
    seed: int = 0,
    masks: Arrays | None = None,
    state: AdamState | None = None,
    augment: Augment | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], AdamState]:
    """A whole run from the engine's current values; returns final parameters and Adam state.

    Adam on mean cross-entropy over shuffled mini-batches (see `train_steps`); ``state``
    continues earlier Adam moments. The engine's values become the final parameters.
    """
    run = start_training(
        engine.values,
        len(labels),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        masks=masks,
        adam=state,
    )
    run = train_steps(
        engine, inputs, labels, run, lr=lr, masks=masks, augment=augment, progress=progress
    )
    engine.with_values(run.params)
    return run.params, run.adam


def _generator(state: Mapping[str, Any]) -> np.random.Generator:
    bit_generator = getattr(np.random, str(state["bit_generator"]))()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


# --- checkpoints ----------------------------------------------------------------------------------

_SCALARS = ("done", "total", "samples", "batch_size", "adam_step", "adam_beta1", "adam_beta2")


def checkpoint_bytes(state: TrainState) -> bytes:
    """The ``.npz`` bytes of ``state``: ``param/``, ``adam_m/``, ``adam_v/`` arrays by name,
    the scalars, ``order`` and ``rng`` (the generator state as JSON)."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, values in (
        ("param/", state.params),
        ("adam_m/", state.adam.m),
        ("adam_v/", state.adam.v),
    ):
        arrays.update({prefix + k: np.asarray(v) for k, v in values.items()})
    scalars = (
        state.done,
        state.total,
        state.samples,
        state.batch_size,
        state.adam.step,
        state.adam.beta1,
        state.adam.beta2,
    )
    arrays.update({k: np.asarray(v) for k, v in zip(_SCALARS, scalars)})
    arrays["order"] = np.asarray(state.order, np.int64)
    arrays["rng"] = np.asarray(json.dumps(state.rng, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, state: TrainState) -> int:
    """Write ``state`` to ``path`` (``.npz``) atomically; returns the bytes written."""
    return atomic_write_bytes(path, checkpoint_bytes(state))


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a state written by `save_checkpoint`; a missing or mismatched entry is a `DataError`."""
    arrays = read_npz(path, "training checkpoint")
    where = f"training checkpoint {path}"
    missing = [k for k in (*_SCALARS, "order", "rng") if k not in arrays]
    if missing:
        raise DataError(f"{where} has no entry {missing[0]!r}; was it written by save_checkpoint?")

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    params, m, v = group("param/"), group("adam_m/"), group("adam_v/")
    if not (params.keys() == m.keys() == v.keys()):
        raise DataError(f"{where}: the parameters and the Adam moments name different tensors")
    try:
        rng = json.loads(str(arrays["rng"]))
        _generator(rng)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"{where}: the random generator state is unreadable ({exc})") from None
    done, total, samples, batch_size, step = (int(arrays[k]) for k in _SCALARS[:5])
    beta1, beta2 = (float(arrays[k]) for k in _SCALARS[5:])
    adam = AdamState(m, v, step, beta1, beta2)
    order = np.asarray(arrays["order"], np.int64)
    return TrainState(params, adam, done, total, samples, batch_size, order, rng)
