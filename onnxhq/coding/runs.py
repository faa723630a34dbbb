"""Run coding of one index stream, in bounded memory (the symbols are described in `layout`).

`run_counts` gives the histogram of the run symbols without making them: every index other than
the run symbol r is one symbol, of class 0 unless a run of r comes just before it, so only the
runs need looking at (found from the places where ``index == r`` flips, a byte-wide pass), and the
class-0 counts follow from the plain histogram. `run_symbols` makes the symbols, a chunk at a time,
once run coding has been chosen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Indices per step: the passes here are over bytes, so larger steps than `bitpack.CHUNK` pay.
SCAN = 1 << 20


def run_class(runs: np.ndarray) -> np.ndarray:
    """0 for no run, else ``bit_length(run)``: class c holds runs in [2**(c-1), 2**c)."""
    return np.frexp(np.asarray(runs, dtype=np.float64))[1].astype(np.int64)  # exact below 2**53


def runs_of(flat: np.ndarray, r: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(starts, stops)`` of the maximal runs of ``r`` in ``flat``, in order, a chunk at a time;
    positions are int64 into ``flat``, a run is ``[start, stop)``."""
    n, open_at = flat.size, -1  # open_at: start of a run still going at the chunk's end
    for begin in range(0, n, SCAN):
        same = flat[begin : begin + SCAN] == r
        flips = np.empty(same.size, dtype=bool)
        flips[0] = same[0] != (open_at >= 0)
        np.not_equal(same[1:], same[:-1], out=flips[1:])
        edges = np.flatnonzero(flips).astype(np.int64)
        edges += begin
        if open_at >= 0:
            if not edges.size:
                continue
            starts = np.concatenate(([open_at], edges[1::2]))
            stops = edges[0::2]
        else:
            starts, stops = edges[0::2], edges[1::2]
        open_at = -1
        if starts.size > stops.size:
            open_at, starts = int(starts[-1]), starts[:-1]
        yield starts, stops
    if open_at >= 0:
        yield np.array([open_at], np.int64), np.array([n], np.int64)


def run_counts(
    flat: np.ndarray, k: int, r: int, counts: np.ndarray, max_coded: int
) -> np.ndarray | None:
    """Counts of the run symbols (``classes * (k + 1)`` of them) of coding the runs of ``r``;
    None when that alphabet would exceed ``max_coded`` symbols.

    ``counts`` is the plain histogram of ``flat`` (k,).
    """
    n, size = flat.size, k + 1
    hist = np.zeros(2 * size, dtype=np.int64)  # classes 0 and 1; grown as longer runs turn up
    for starts, stops in runs_of(flat, r):
        classes = run_class(stops - starts)
        levels = flat.take(np.minimum(stops, n - 1)).astype(np.int64)
        levels[stops == n] = k  # the end of the stream, after the tail run
        part = np.bincount(classes * size + levels)
        if part.size > hist.size:
            hist = np.concatenate([hist, np.zeros(part.size - hist.size, np.int64)])
        hist[: part.size] += part
    n_classes = -(-hist.size // size)
    hist = np.concatenate([hist, np.zeros(n_classes * size - hist.size, np.int64)])
    while n_classes > 1 and not hist[(n_classes - 1) * size :].any():
        n_classes -= 1
    if n_classes * size > max_coded:
        return None
    hist = hist[: n_classes * size]
    after = hist.reshape(n_classes, size)[1:].sum(axis=0)  # indices that follow a run
    hist[:k] = counts - after[:k]  # class 0: every other index
    hist[r] = 0
    return hist


def run_symbols(
    flat: np.ndarray, k: int, r: int, step: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(symbols, extra)`` of run-coding ``flat`` (int64 each), a chunk of ``step`` indices at a
    time: symbol ``class * (k + 1) + index`` for each index other than ``r``, with class and extra
    bits from the run before it, then the end symbol if ``flat`` ends with a run."""
    last = -1  # position of the last index other than r so far
    for begin in range(0, flat.size, step):
        part = flat[begin : begin + step]
        keep = np.flatnonzero(part != r)
        if not keep.size:
            continue
        runs = np.diff(keep, prepend=last - begin)
        runs -= 1
        last = begin + int(keep[-1])
        yield _symbols(runs, part.take(keep), k)
    tail = flat.size - 1 - last
    if tail > 0:
        yield _symbols(np.array([tail], np.int64), np.array([k], np.int64), k)


def _symbols(runs: np.ndarray, levels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbols and extra values (int64 each) of the indices ``levels`` after ``runs``."""
    classes = np.frexp(runs.astype(np.float64))[1].astype(np.int64)  # 0, or bit_length(run)
    extra = np.left_shift(1, classes)
    extra >>= 1  # 2**(c-1), and 0 for class 0
    np.subtract(runs, extra, out=extra)
    classes *= k + 1
    classes += levels
    return classes, extra
