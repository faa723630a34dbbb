"""Canonical length-limited Huffman coding: round trips, code properties, errors."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxhq.coding import bitpack, huffdecode, huffman
from onnxhq.errors import ConfigError, SidecarError
from onnxhq.numeric import entropy_bits


def huffman_cost(counts) -> int:
    """Total bits of an unrestricted Huffman code (textbook heap construction), the reference."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def kraft(lengths) -> float:
    lengths = np.asarray(lengths, dtype=np.float64)
    return float((2.0 ** -lengths[lengths > 0]).sum())


def round_trip(symbols, lengths, block_size=None):
    payload, n_bits = huffman.encode(symbols, lengths)
    assert len(payload) == (n_bits + 7) // 8
    if block_size is None:
        return huffdecode.decode(payload, lengths, len(symbols))
    blocks = huffman.block_bits(symbols, lengths, block_size)
    assert blocks.sum() == n_bits
    return huffdecode.decode(
        payload, lengths, len(symbols), block_size=block_size, block_bits=blocks
    )


def geometric(rng, n, k, p=0.3):
    return np.minimum(rng.geometric(p, size=n) - 1, k - 1)


# ------------------------------------------------------------------ code lengths


def test_canonical_codes_are_assigned_by_length_then_symbol():
    lengths = np.array([2, 1, 3, 3])  # codes: 1 -> 0, 0 -> 10, 2 -> 110, 3 -> 111
    payload, n_bits = huffman.encode(np.array([0, 1, 2, 3]), lengths)
    assert (payload, n_bits) == (bytes([0b10011011, 0b10000000]), 9)


@pytest.mark.parametrize("k", [2, 3, 17, 256, 4096])
def test_lengths_equal_huffman_cost_when_the_limit_does_not_bind(k):
    counts = np.random.default_rng(k).integers(0, 1000, size=k)
    counts[counts > 0] += 100  # keeps the Huffman tree shallower than the limit
    lengths = huffman.code_lengths(counts, max_length=20)
    assert lengths.max() < 20
    assert int((lengths.astype(np.int64) * counts).sum()) == huffman_cost(counts)
    assert np.array_equal(lengths == 0, counts == 0)
    assert kraft(lengths) == pytest.approx(1.0)


def test_length_limit_binds_on_fibonacci_counts_and_stays_optimal_in_kraft():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    free = huffman.code_lengths(counts, max_length=20)
    assert free.max() > 12
    limited = huffman.code_lengths(counts, max_length=12)
    assert limited.max() == 12 and kraft(limited) == pytest.approx(1.0)
    assert (limited * counts).sum() >= (free * counts).sum()


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=300), st.integers(9, 20))
@settings(max_examples=150, deadline=None)
def test_lengths_respect_limit_and_kraft(counts, max_length):
    counts = np.array(counts, dtype=np.int64)
    lengths = huffman.code_lengths(counts, max_length=max_length)
    used = counts > 0
    assert lengths.dtype == np.uint8 and lengths.shape == counts.shape
    assert np.array_equal(lengths > 0, used)
    assert lengths.max() <= max_length
    assert kraft(lengths) <= 1.0 + 1e-12
    if used.sum() == 1:
        assert lengths[used][0] == 1
    elif used.sum() > 1:
        assert kraft(lengths) == pytest.approx(1.0)
        assert (lengths.astype(np.int64) * counts).sum() >= huffman_cost(counts)


def test_average_length_lies_between_entropy_and_entropy_plus_one():
    rng = np.random.default_rng(0)
    for counts in (
        rng.integers(1, 100, 50),
        np.bincount(geometric(rng, 50_000, 40)),
        np.array([990, 5, 5]),
    ):
        lengths = huffman.code_lengths(counts)
        mean = (lengths * counts).sum() / counts.sum()
        h = entropy_bits(counts)
        assert h <= mean < h + 1


def test_lengths_do_not_depend_on_symbol_order_beyond_ties():
    counts = np.array([5, 9, 5, 1, 0, 30])
    perm = np.array([3, 0, 5, 1, 2, 4])
    a = huffman.code_lengths(counts)
    b = huffman.code_lengths(counts[perm])
    assert sorted(a * counts) == sorted(b * counts[perm])


@pytest.mark.parametrize(
    "counts, kwargs, match",
    [
        (np.array([1, -1]), {}, "non-negative"),
        (np.array([[1, 2]]), {}, "1-D integer"),
        (np.array([0.5, 2.0]), {}, "1-D integer"),
        (np.ones(5, int), {"max_length": 2}, "used symbols"),
        (np.ones(2, int), {"max_length": 0}, "max_length"),
        (np.ones(2, int), {"max_length": 21}, "max_length"),
    ],
)
def test_code_lengths_rejects_bad_arguments(counts, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        huffman.code_lengths(counts, **kwargs)


def test_code_lengths_of_no_used_symbol_are_all_zero():
    assert not huffman.code_lengths(np.zeros(4, int)).any()
    assert huffman.code_lengths(np.zeros(0, int)).shape == (0,)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("k", [2, 3, 5, 31, 256, 1000, 65536])
@pytest.mark.parametrize("kind", ["uniform", "geometric"])
def test_round_trip(k, kind):
    rng = np.random.default_rng(k)
    n = 20_000
    x = rng.integers(0, k, size=n) if kind == "uniform" else geometric(rng, n, k)
    lengths = huffman.code_lengths(
        np.bincount(x, minlength=k), max_length=max(16, (k - 1).bit_length())
    )
    for block_size in (None, 1, 7, 256):
        y = round_trip(x, lengths, block_size)
        assert y.dtype == np.int32 and np.array_equal(y, x)


@pytest.mark.parametrize("n", [1, 2, 9, 1000])
def test_round_trip_of_a_single_used_symbol_costs_one_bit_each(n):
    x = np.full(n, 3)
    lengths = huffman.code_lengths(np.bincount(x, minlength=5))
    payload, n_bits = huffman.encode(x, lengths)
    assert n_bits == n and payload == bytes((n + 7) // 8)
    assert np.array_equal(round_trip(x, lengths), x) and np.array_equal(
        round_trip(x, lengths, 4), x
    )


def test_round_trip_of_nothing():
    lengths = np.array([1, 1])
    assert huffman.encode(np.zeros(0, int), lengths) == (b"", 0)
    assert huffdecode.decode(b"", lengths, 0).shape == (0,)
    assert huffdecode.decode(b"", lengths, 0, block_size=4, block_bits=np.zeros(0, int)).shape == (
        0,
    )


@given(st.lists(st.integers(0, 40), min_size=1, max_size=2000), st.sampled_from([1, 3, 64, 256]))
@settings(max_examples=100, deadline=None)
def test_round_trip_fuzz(symbols, block_size):
    x = np.array(symbols)
    lengths = huffman.code_lengths(np.bincount(x), max_length=16)
    assert np.array_equal(round_trip(x, lengths, block_size), x)  # block_size may exceed len(x)
    assert np.array_equal(round_trip(x, lengths), x)


def test_encode_does_not_mutate_its_inputs():
    x = np.array([0, 1, 1, 2])
    lengths = np.array([2, 1, 2], dtype=np.uint8)
    x0, l0 = x.copy(), lengths.copy()
    huffman.encode(x, lengths)
    assert np.array_equal(x, x0) and np.array_equal(lengths, l0)


# ------------------------------------------------------------------ decode errors


def test_decode_of_a_truncated_payload_fails():
    rng = np.random.default_rng(1)
    x = geometric(rng, 5000, 20)
    lengths = huffman.code_lengths(np.bincount(x))
    payload, _ = huffman.encode(x, lengths)
    with pytest.raises(SidecarError, match="too short"):
        huffdecode.decode(payload[:-3], lengths, x.size)
    blocks = huffman.block_bits(x, lengths, 64)
    with pytest.raises(SidecarError, match="shorter than"):
        huffdecode.decode(payload[:-3], lengths, x.size, block_size=64, block_bits=blocks)


def test_decode_rejects_a_block_index_that_does_not_match():
    x = np.arange(100) % 7
    lengths = huffman.code_lengths(np.bincount(x))
    payload, _ = huffman.encode(x, lengths)
    blocks = huffman.block_bits(x, lengths, 16)
    blocks[2] += 1
    blocks[3] -= 1
    with pytest.raises(SidecarError, match="block 2"):
        huffdecode.decode(payload, lengths, x.size, block_size=16, block_bits=blocks)
    with pytest.raises(SidecarError, match="block_bits must be"):
        huffdecode.decode(payload, lengths, x.size, block_size=16, block_bits=blocks[:-1])


def test_decode_rejects_bits_that_are_no_code_word():
    lengths = np.array([1, 0])  # incomplete code: only "0" is a code word
    with pytest.raises(SidecarError, match="no code word"):
        huffdecode.decode(b"\x40", lengths, 2)


@pytest.mark.parametrize(
    "lengths, match",
    [
        (np.array([1, 1, 1]), "Kraft"),
        (np.array([21, 1]), r"\[0, 20\]"),
        (np.array([0, 0]), "no symbol"),
    ],
)
def test_decode_rejects_impossible_code_lengths(lengths, match):
    with pytest.raises(SidecarError, match=match):
        huffdecode.decode(b"\x00", lengths, 1)


def test_encode_rejects_symbols_without_code():
    with pytest.raises(ConfigError, match="non-zero code length"):
        huffman.encode(np.array([0, 2]), np.array([1, 1, 0]))


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize("width", [0, 1, 5, 8, 13, 32])
def test_pack_bits_round_trip(width):
    values = np.random.default_rng(width).integers(0, 2**width, size=37)
    data, n_bits = huffman.pack_bits(values, width)
    assert n_bits == 37 * width
    assert len(data) == (n_bits + 7) // 8
    assert np.array_equal(
        huffman.read_bits(data, width * np.arange(37), np.full(37, width)), values
    )


def test_entropy_bits_of_the_coded_histograms():
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    assert entropy_bits([7, 0]) == 0.0
    assert entropy_bits([]) == 0.0
    assert entropy_bits([3, 1]) == pytest.approx(0.8112781244591328)


def test_many_streams_decode_together_as_they_decode_alone():
    # Different codes (longest lengths 1..~14), block sizes, extra bits, and an empty stream: the
    # shared lock-step loop must give each stream exactly what decoding it alone gives.
    rng = np.random.default_rng(11)
    streams, expected = [], []
    for k, n, block_size, with_extra in [
        (2, 37, 32, False),
        (300, 5000, 64, False),
        (5, 0, 32, False),
        (17, 2000, 256, True),
        (1, 9, 32, False),
        (64, 777, 32, True),
    ]:
        symbols = np.minimum(rng.geometric(0.3, size=n) - 1, k - 1)
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=k), max_length=16)
        widths = rng.integers(0, 6, size=k) if with_extra else None
        extra = rng.integers(0, 1 << widths[symbols]) if with_extra else None
        payload, _ = huffman.encode(symbols, lengths, extra, widths)
        blocks = huffman.block_bits(symbols, lengths, block_size, widths)
        streams.append(huffdecode.Coded(payload, lengths, n, block_size, blocks, widths))
        expected.append((symbols, extra))
    decoded = huffdecode.decode_many(streams)
    for (symbols, extra), coded, got in zip(expected, streams, decoded):
        alone = huffdecode.decode(
            coded.payload,
            coded.lengths,
            coded.count,
            block_size=coded.block_size,
            block_bits=coded.block_bits,
            extra_widths=coded.extra_widths,
        )
        if extra is None:
            np.testing.assert_array_equal(got, symbols)
            np.testing.assert_array_equal(alone, symbols)
        else:
            np.testing.assert_array_equal(got[0], symbols)
            np.testing.assert_array_equal(got[1], extra)
            np.testing.assert_array_equal(alone[1], extra)


def test_streams_split_into_several_lock_step_groups_decode_alike(monkeypatch):
    # Positions and tables bound how many streams share one loop; past the bounds the streams are
    # decoded in consecutive groups, with symbols and extra-bit positions numbered across them all.
    rng = np.random.default_rng(5)
    streams, expected = [], []
    for k, n in [(3, 50), (40, 900), (7, 0), (2, 33), (9, 400)]:
        symbols = np.minimum(rng.geometric(0.4, size=n) - 1, k - 1)
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=k), max_length=12)
        widths = rng.integers(0, 4, size=k)
        extra = rng.integers(0, 1 << widths[symbols])
        payload, _ = huffman.encode(symbols, lengths, extra, widths)
        streams.append(
            huffdecode.Coded(
                payload, lengths, n, 32, huffman.block_bits(symbols, lengths, 32, widths), widths
            )
        )
        expected.append((symbols, extra))
    together = huffdecode.decode_many(streams)
    monkeypatch.setattr(huffdecode, "_GROUP_BYTES", 60)  # about one stream per group
    grouped = huffdecode.decode_many(streams)
    assert len(list(huffdecode._Code(streams, None).groups())) >= 4
    for (symbols, extra), a, b in zip(expected, together, grouped):
        for got in (a, b):
            np.testing.assert_array_equal(got[0], symbols)
            np.testing.assert_array_equal(got[1], extra)


def test_a_bad_stream_among_many_is_named():
    lengths = np.array([1, 1])
    good = huffdecode.Coded(b"\x40", lengths, 2, 32, np.array([2]))
    bad = huffdecode.Coded(b"\x40", lengths, 2, 32, np.array([3]))  # block index disagrees
    with pytest.raises(SidecarError, match="stream 'b': payload is too short or inconsistent"):
        huffdecode.decode_many([good, bad], ["a", "b"])


# ------------------------------------------------------------------ bounded-memory bit packing


def plain_pack(values, widths) -> bytes:
    bits = "".join(format(int(v), f"0{w}b") if w else "" for v, w in zip(values, widths))
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.integers(1, 9))
@settings(max_examples=100, deadline=None)
def test_bit_writer_packs_fields_of_0_to_63_bits_in_any_chunks(seed, chunk, block_size):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 400))
    widths = rng.integers(0, 64, size=n).astype(np.uint64)
    if rng.random() < 0.5:  # narrow fields: many per 64-bit word
        widths %= np.uint64(rng.integers(1, 9))
    values = rng.integers(0, 2**63, size=n, dtype=np.uint64) >> (np.uint64(64) - widths)
    writer = bitpack.BitWriter(int(widths.sum()), block_size)
    for begin in range(0, n, chunk):
        w = widths[begin : begin + chunk]
        writer.write(values[begin : begin + chunk] << (np.uint64(64) - w), w)
    blocks = writer.block_bits()
    assert writer.payload() == plain_pack(values, widths)
    expected = [int(widths[b : b + block_size].sum()) for b in range(0, n, block_size)]
    np.testing.assert_array_equal(blocks, expected)


@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 2, 4, 32, 256]))
@settings(max_examples=60, deadline=None)
def test_bytes_coded_two_at_a_time_equal_symbols_coded_one_by_one(seed, block_size):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 3000)), int(rng.integers(1, 257))
    symbols = np.minimum(rng.geometric(0.2, size=n) - 1, k - 1).astype(np.uint8)
    counts = np.bincount(symbols, minlength=k)
    lengths = huffman.code_lengths(counts, max_length=16)
    paired = huffman.encode_counted(symbols, counts, lengths, block_size)
    widths = np.zeros(k, np.int64)
    one_by_one = huffman.encode_chunks(
        [(symbols.astype(np.int64), None)],
        lengths,
        widths,
        int(np.dot(counts, lengths)),
        block_size,
    )
    assert paired[0] == one_by_one[0] == huffman.encode(symbols.astype(np.int64), lengths)[0]
    np.testing.assert_array_equal(paired[1], one_by_one[1])
    if block_size:
        np.testing.assert_array_equal(paired[1], huffman.block_bits(symbols, lengths, block_size))


def test_histogram_in_chunks_equals_bincount(monkeypatch):
    monkeypatch.setattr(bitpack, "CHUNK", 4)
    values = np.random.default_rng(0).integers(0, 300, size=1000).astype(np.uint16)
    np.testing.assert_array_equal(
        bitpack.histogram(values, 300), np.bincount(values, minlength=300)
    )
