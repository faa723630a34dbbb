"""The sidecar format: round trips, pinned bytes, a plain reference reader, hostile files,
fuzzing, and the coding's efficiency."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxhq import sidecar
from onnxhq.coding import bitpack, blockdecode, huffman, layout, runs, unpack
from onnxhq.coding.layout import MAX_WRITTEN_LENGTH, _choose_coding
from onnxhq.errors import ConfigError, SidecarError
from onnxhq.sidecar import (
    IndexStream,
    decode_sidecar,
    describe_sidecar,
    encode_sidecar,
    encode_sidecar_with_layouts,
    read_sidecar,
    write_sidecar,
)


def reference_read(data: bytes):
    """A plain reader written from the format description alone: no CRCs, no checks, slow."""
    magic, version, _, size = struct.unpack_from("<8sIIQ", data)
    assert (magic, version) == (b"ONNXHQSC", 2)
    header = json.loads(zlib.decompress(data[24 : 24 + size]))
    buffer = data[24 + size :]
    metadata = header.pop("__metadata__", {})
    streams = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        bits = "".join(f"{byte:08b}" for byte in buffer[begin:end])
        k, classes, run = e["alphabet_size"], e["run_classes"], e["run_symbol"]
        n_codes = classes * (k + 1) if classes else k
        groups = [g for g in range(-(-n_codes // 8)) if bits[g] == "1"]
        at = -(-n_codes // 8)
        coded = [
            8 * g + j for i, g in enumerate(groups) for j in range(8) if bits[at + 8 * i + j] == "1"
        ]
        at, width = at + 8 * len(groups), 4 if n_codes <= 65536 else 5
        lengths = {
            s: 1 + int(bits[at + width * j : at + width * (j + 1)], 2) for j, s in enumerate(coded)
        }
        n_blocks = -(-e["symbols"] // e["block_size"])
        at = 8 * -(-e["table_bits"] // 8) + 8 * -(-e["block_width"] * max(n_blocks - 1, 0) // 8)
        codes, code, prev = {}, 0, 0
        for length, symbol in sorted((n, s) for s, n in lengths.items()):
            code <<= length - prev
            codes[format(code, f"0{length}b")] = symbol
            code, prev = code + 1, length
        values, word, n_symbols = [], "", 0
        while n_symbols < e["symbols"]:
            word, at = word + bits[at], at + 1
            if word not in codes:
                continue
            s, word, n_symbols = codes[word], "", n_symbols + 1
            if not classes:
                values.append(s)
                continue
            c, i = divmod(s, k + 1)
            extra = int(bits[at : at + c - 1] or "0", 2) if c > 1 else 0
            at += max(c - 1, 0)
            values += [run] * ((1 << (c - 1)) + extra if c else 0) + ([i] if i < k else [])
        streams[name] = (tuple(e["shape"]), values)
    return streams, metadata


def tiny_streams():
    runs = np.zeros(100, dtype=np.uint8)
    runs[50] = 1
    return [
        IndexStream("b", (100,), 2, runs),
        IndexStream("a", (2, 3), 4, np.array([[0, 1, 2], [3, 0, 0]])),
    ]


def laplace_indices(rng, n, levels=32):
    w = rng.laplace(size=n)
    return np.clip(np.digitize(w, np.linspace(w.min(), w.max(), levels + 1)) - 1, 0, levels - 1)


def sparse_indices(rng, n, nonzero=16, density=0.1):
    return np.where(rng.random(n) < density, rng.integers(1, nonzero + 1, size=n), 0)


def mixed_streams():
    rng = np.random.default_rng(7)
    return [
        IndexStream(
            "conv1.w_idx", (20, 1, 5, 5), 32, laplace_indices(rng, 500).reshape(20, 1, 5, 5)
        ),
        IndexStream("fc1.w_idx", (300, 100), 17, sparse_indices(rng, 30_000).reshape(300, 100)),
        IndexStream(
            "fc2.w_idx", (64, 64), 17, sparse_indices(rng, 4096, density=0.02).reshape(64, 64)
        ),
        IndexStream("big_k", (3000,), 65536, rng.integers(0, 65536, size=3000).astype(np.uint16)),
        IndexStream("empty", (0, 4), 8, np.zeros((0, 4), dtype=np.int64)),
        IndexStream("constant", (33,), 5, np.full(33, 4)),
        IndexStream("all_pruned", (1000,), 9, np.full(1000, 2)),
    ]


def fuzz_target() -> bytes:
    rng = np.random.default_rng(3)
    extra = IndexStream("c", (600,), 8, laplace_indices(rng, 600, levels=8))  # 19 decode blocks
    return encode_sidecar(tiny_streams() + [extra], metadata={"model": "tiny"})


FUZZ_TARGET = fuzz_target()

GOLDEN = bytes.fromhex(
    "4f4e4e584851534302000000bf8e1a0ad30000000000000078da9d8fdd6e83300c85dfc5d7b9884d1b445ea59a220782"
    "400b50d5a9a6aee2dd1b40fddb76b53b1f9fe39fef0ace0d2171c3899d037b85616a42040ba91f2f302be0a5c9f1d8b1"
    "0fc949ff1dc0ee14f83e0958c45cc5a9fe749e251bfa2eb75c4177fdd537a95bfdfa541704d6ec3455a62a8d82f5f6d4"
    "b612969507adcc8782d3797475649120ebd8a2e532f829ff369e6354201d1ff38d03a922e7372f67f3c2c43e06b77d48"
    "fbcce0ff60a00703fd97010b347b431aab5f104621fea428df29f41301b57e45a07704ace6f9066bf287bdf80110806f"
    "002300004b10"
)


# ------------------------------------------------------------------ round trips and pinned bytes


def test_golden_bytes_pin_the_format():
    # Buffer, by hand. Stream "a" (plain, 4 symbols): code table = group bit 1, mask 11110000,
    # lengths - 1 = 0,2,2,1 in 4 bits (f8 01 10 80); codes 0->0 3->10 1->110 2->111 over 0,1,2,3,0,0
    # (6f 00). Stream "b" (runs of 0; 7 classes, so 21 symbols in 3 groups): group bits 001, mask
    # 00011000 for symbols 19 = class 6 then index 1 and 20 = class 6 then the end, lengths - 1 =
    # 0,0 (23 00 00); payload '0' + the 5 extra bits of 50 - 32 (10010), '1' + those of 49 - 32
    # (10001): 4b 10.
    assert encode_sidecar(tiny_streams(), metadata={"model": "tiny"}) == GOLDEN
    streams, metadata = decode_sidecar(GOLDEN)
    assert streams == sorted(tiny_streams(), key=lambda s: s.name) and metadata == {"model": "tiny"}


def test_round_trip_of_mixed_streams():
    streams = mixed_streams()
    data = encode_sidecar(streams, metadata={"graph": "lenet.onnx", "b": ""})
    decoded, metadata = decode_sidecar(data)
    assert decoded == sorted(streams, key=lambda s: s.name)
    assert metadata == {"graph": "lenet.onnx", "b": ""}
    by_name = {s.name: s for s in decoded}
    assert (
        by_name["big_k"].indices.dtype == np.uint16
        and by_name["conv1.w_idx"].indices.dtype == np.uint8
    )
    assert all(not s.indices.flags.writeable for s in decoded)


def test_plain_reference_reader_agrees():
    for data in (GOLDEN, FUZZ_TARGET, encode_sidecar(mixed_streams()[:3] + mixed_streams()[4:])):
        streams, metadata = decode_sidecar(data)
        reference, ref_metadata = reference_read(data)
        assert ref_metadata == metadata
        assert {s.name: (s.shape, s.indices.ravel().tolist()) for s in streams} == reference


STREAM_KINDS = st.tuples(
    st.sampled_from(["dense", "sparse", "constant", "empty"]),
    st.integers(1, 300),
    st.integers(0, 3000),
    st.integers(0, 2**32 - 1),
)


@given(st.lists(STREAM_KINDS, min_size=1, max_size=9))
@settings(max_examples=60, deadline=None)
def test_any_set_of_streams_decodes_together_as_written(kinds):
    # All streams of a file are read, decoded and run-expanded together: plain and run-coded,
    # empty, uint8 and uint16 alphabets side by side must each come back exactly (and as the plain
    # reader says).
    streams = []
    for j, (kind, k, n, seed) in enumerate(kinds):
        rng = np.random.default_rng(seed)
        if kind == "dense":
            values = rng.integers(0, k, size=n)
        elif kind == "constant":
            values = np.full(n, k - 1)
        elif kind == "sparse":
            values = np.where(rng.random(n) < 0.05, rng.integers(0, k, size=n), k // 2)
        else:
            values = np.zeros(0, np.int64)
        streams.append(IndexStream(f"s{j}", values.shape, k, values))
    data = encode_sidecar(streams)
    decoded, _ = decode_sidecar(data)
    assert decoded == sorted(streams, key=lambda s: s.name)
    reference, _ = reference_read(data)
    assert {s.name: s.indices.tolist() for s in decoded} == {
        name: values for name, (_, values) in reference.items()
    }


def test_output_does_not_depend_on_stream_or_metadata_order():
    streams = mixed_streams()
    first = encode_sidecar(streams, metadata={"x": "1", "y": "2"})
    assert encode_sidecar(streams[::-1], metadata={"y": "2", "x": "1"}) == first
    assert encode_sidecar(streams, metadata={"x": "1", "y": "2"}) == first


def test_encoding_does_not_mutate_indices():
    indices = np.array([0, 0, 3, 0, 1])
    before = indices.copy()
    encode_sidecar([IndexStream("w", (5,), 4, indices)])
    assert np.array_equal(indices, before) and indices.flags.writeable


def test_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "model.onnxhq"
    written = write_sidecar(path, mixed_streams(), metadata={"graph": "g.onnx"})
    assert written == path.stat().st_size
    assert read_sidecar(path) == decode_sidecar(path.read_bytes())


# ------------------------------------------------------------------ coding efficiency


def plain_huffman_bits(indices, k):
    """Payload and code-table bits of plain (one symbol per index) coding, computed
    independently."""
    counts = np.bincount(np.ravel(indices), minlength=k)
    lengths = huffman.code_lengths(counts, max_length=MAX_WRITTEN_LENGTH)
    groups = np.pad(counts > 0, (0, -k % 8)).reshape(-1, 8).any(axis=1)
    return (
        int((lengths.astype(np.int64) * counts).sum())
        + groups.size
        + 8 * groups.sum()
        + 4 * np.count_nonzero(counts)
    )


def test_dense_laplacian_stream_codes_within_two_percent_of_entropy():
    indices = laplace_indices(np.random.default_rng(0), 100_000)
    (layout,) = describe_sidecar(encode_sidecar([IndexStream("w", indices.shape, 32, indices)]))
    assert (
        layout.entropy_bits <= 8 * layout.payload_bytes / layout.count <= 1.02 * layout.entropy_bits
    )
    # + code lengths and block index
    assert layout.coded_bits_per_weight <= 1.03 * layout.entropy_bits


def test_run_coding_of_a_ninety_percent_zero_stream():
    # i.i.d. 90 % zeros and 16 equally likely other indices: entropy 0.469 + 0.1 * 4 = 0.869 bits
    # per weight. Plain Huffman pays >= 1 bit per zero (about 1.4 bits per weight in all); run
    # symbols (a run of zeros, then index i) must come within 5 % of the entropy, i.e. far below 1
    # bit.
    indices = sparse_indices(np.random.default_rng(1), 200_000)
    (runs,) = describe_sidecar(encode_sidecar([IndexStream("w", indices.shape, 17, indices)]))
    assert runs.entropy_bits == pytest.approx(0.869, abs=0.01)
    assert runs.run_symbol == 0
    assert runs.coded_bits_per_weight < 1.05 * runs.entropy_bits < 0.95
    assert 8 * (runs.payload_bytes + runs.table_bytes) < 0.7 * plain_huffman_bits(indices, 17)


def test_runs_of_any_dominant_index_code_near_the_entropy():
    # A coarse uniform grid puts most weights of a layer in its zero cell, whatever that cell's
    # index: 99.5 % index 12 here, entropy ~0.05 bits per weight. Plain Huffman cannot go below
    # 1 bit per weight; runs of the dominant index must.
    rng = np.random.default_rng(4)
    indices = np.where(rng.random(100_000) < 0.995, 12, rng.integers(0, 25, size=100_000))
    (layout,) = describe_sidecar(encode_sidecar([IndexStream("w", indices.shape, 25, indices)]))
    assert layout.run_symbol == 12
    assert layout.entropy_bits < layout.coded_bits_per_weight < 1.15 * layout.entropy_bits + 0.01


def test_a_constant_stream_costs_a_few_bytes_however_long():
    for n in (1_000, 10_000_000):
        data = encode_sidecar([IndexStream("w", (n,), 7, np.full(n, 3, dtype=np.uint8))])
        (layout,) = describe_sidecar(data)
        assert layout.payload_bytes + layout.table_bytes <= 16
        assert np.all(decode_sidecar(data)[0][0].indices == 3)


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_the_coder_never_does_worse_than_plain_huffman(seed, k, dominance):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    indices = np.where(rng.random(n) < dominance, rng.integers(0, k), rng.integers(0, k, size=n))
    chosen = _choose_coding(indices.astype(np.int64), k)
    assert chosen.bits <= plain_huffman_bits(indices, k)
    (layout,) = describe_sidecar(encode_sidecar([IndexStream("w", (n,), k, indices)]))
    assert layout.run_symbol == chosen.run_symbol


def test_layout_accounts_for_every_byte():
    data = encode_sidecar(mixed_streams(), metadata={"graph": "g.onnx"})
    layouts = describe_sidecar(data)
    assert [x.name for x in layouts] == sorted(s.name for s in mixed_streams())
    assert sum(x.payload_bytes + x.table_bytes + x.header_bytes for x in layouts) == len(data)
    for x in layouts:
        if x.count:
            assert x.coded_bits_per_weight == pytest.approx(
                8 * (x.payload_bytes + x.table_bytes) / x.count
            )
    # given the decoded streams, the accounting is the same, not decoded again
    decoded, _ = decode_sidecar(data)
    assert describe_sidecar(data, streams=decoded) == layouts
    with pytest.raises(ConfigError, match="what decode_sidecar returned"):
        describe_sidecar(data, streams=decoded[::-1])


def test_layouts_made_while_encoding_equal_those_read_from_the_bytes():
    streams = mixed_streams()
    streams.append(IndexStream("wide", (5,), 300, np.array([0, 299, 7, 7, 7], dtype=np.uint64)))
    data, layouts = encode_sidecar_with_layouts(streams[::-1], metadata={"graph": "g.onnx"})
    assert data == encode_sidecar(streams, metadata={"graph": "g.onnx"})
    assert layouts == describe_sidecar(data)


def test_a_constant_stream_has_zero_entropy_not_minus_zero():
    (layout,) = describe_sidecar(encode_sidecar([IndexStream("w", (9,), 4, np.full(9, 2))]))
    assert str(layout.entropy_bits) == "0.0"


# ------------------------------------------------------------------ argument errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": ""}, "non-empty"),
        ({"name": "__metadata__"}, "other than"),
        ({"shape": (3, -1)}, "non-negative"),
        ({"shape": (4,)}, "shape"),
        ({"alphabet_size": 0}, "alphabet_size"),
        ({"alphabet_size": 65537}, "alphabet_size"),
        ({"alphabet_size": True}, "alphabet_size"),
        ({"indices": np.array([0.0, 1, 2])}, "integer array"),
        ({"indices": np.array([0, 1, 4])}, r"\[0, 4\]"),
        ({"indices": np.array([0, -1, 2])}, "outside"),
    ],
)
def test_index_stream_rejects_bad_fields(kwargs, match):
    fields = {"name": "w", "shape": (3,), "alphabet_size": 4, "indices": np.array([0, 1, 2])}
    with pytest.raises(ConfigError, match=match):
        IndexStream(**{**fields, **kwargs})


def test_encoder_rejects_duplicates_and_bad_metadata():
    stream = IndexStream("w", (1,), 2, np.array([1]))
    with pytest.raises(ConfigError, match="duplicate"):
        encode_sidecar([stream, stream])
    with pytest.raises(ConfigError, match="str to str"):
        encode_sidecar([stream], metadata={"n": 1})
    with pytest.raises(ConfigError, match="IndexStream"):
        encode_sidecar([("w", np.array([1]))])


# ------------------------------------------------------------------ hostile files


def split(data: bytes):
    size = struct.unpack_from("<Q", data, 16)[0]
    return json.loads(zlib.decompress(data[24 : 24 + size])), bytearray(data[24 + size :])


def join(header, buffer, *, text: bytes | None = None, compress: bool = True) -> bytes:
    """A sidecar with valid CRCs around whatever header and buffer it is given."""
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if name != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2:
            entry["crc32"] = zlib.crc32(bytes(buffer[offsets[0] : offsets[1]]))
    if text is None:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    packed = zlib.compress(text) if compress else text
    return (
        b"ONNXHQSC"
        + struct.pack("<IIQ", 2, zlib.crc32(packed), len(packed))
        + packed
        + bytes(buffer)
    )


def edit(fn):
    def make(data):
        header, buffer = split(data)
        return fn(header, buffer) or join(header, buffer)

    return make


def _dirty_block_index_padding(header, buffer):
    c = header["c"]  # all blocks but the last store their length in block_width bits, then padding
    index_bits = (-(-c["symbols"] // c["block_size"]) - 1) * c["block_width"]
    assert index_bits % 8, "the block index of stream c has no padding bits"
    buffer[c["data_offsets"][0] + (c["table_bits"] + 7) // 8 + (index_bits + 7) // 8 - 1] |= 1


def _set(path, value):
    def fn(header, buffer):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return fn


HOSTILE = {
    "short file": (lambda d: d[:20], "shorter than"),
    "wrong magic": (lambda d: b"ONNXHQSX" + d[8:], "magic"),
    "unknown version": (lambda d: d[:8] + struct.pack("<I", 3) + d[12:], "version 3"),
    "version 1": (lambda d: d[:8] + struct.pack("<I", 1) + d[12:], "onnxhq 0.1"),
    "header too big": (lambda d: d[:16] + struct.pack("<Q", 17 << 20) + d[24:], "header length"),
    "header crc": (lambda d: d[: 8 + 4] + b"\0\0\0\0" + d[16:], "header CRC32"),
    "header not zlib": (
        edit(lambda h, b: join(h, b, text=b'{"a":1}', compress=False)),
        "not a zlib stream",
    ),
    "header bomb": (edit(lambda h, b: join(h, b, text=b" " * (17 << 20))), "at most"),
    "header with a tail": (
        edit(lambda h, b: join(h, b, text=zlib.compress(b"{}") + b"x", compress=False)),
        "one complete",
    ),
    "not json": (edit(lambda h, b: join(h, b, text=b"{nope")), "not ASCII JSON"),
    "not ascii": (edit(lambda h, b: join(h, b, text='{"\u00e9":1}'.encode())), "not ASCII JSON"),
    "deep nesting": (
        edit(lambda h, b: join(h, b, text=b"[" * 100_000 + b"]" * 100_000)),
        "not ASCII JSON",
    ),
    "header is a list": (edit(lambda h, b: join(h, b, text=b"[]")), "JSON object"),
    "metadata type": (edit(_set(["__metadata__", "model"], 3)), "__metadata__"),
    "empty name": (edit(lambda h, b: h.__setitem__("", h.pop("a"))), "empty name"),
    "missing field": (edit(lambda h, b: h["a"].pop("bits") and None), "must have fields"),
    "unknown field": (edit(_set(["a", "dtype"], "uint8")), "must have fields"),
    "bool as int": (edit(_set(["a", "alphabet_size"], True)), "alphabet_size"),
    "float as int": (edit(_set(["a", "bits"], 11.0)), "bits"),
    "huge int": (edit(_set(["a", "symbols"], 2**70)), "symbols"),
    "negative dim": (edit(_set(["a", "shape"], [2, -3])), "shape"),
    "shape not list": (edit(_set(["a", "shape"], "2x3")), "shape"),
    "offsets not pair": (edit(_set(["a", "data_offsets"], [0])), "data_offsets"),
    "reversed offsets": (edit(_set(["a", "data_offsets"], [5, 0])), "data_offsets"),
    "hole": (
        edit(lambda h, b: (b.insert(6, 0), h["b"].update(data_offsets=[7, 12]))[-1]),
        "hole or overlap",
    ),
    "overlap": (edit(_set(["b", "data_offsets"], [5, 10])), "hole or overlap"),
    "duplicate key": (
        edit(
            lambda h, b: join(
                h, b, text=json.dumps(h, sort_keys=True).replace('"b":', '"a":').encode()
            )
        ),
        "starts at 6, expected 0",
    ),
    "beyond buffer": (edit(lambda h, b: b.__delitem__(slice(-2, None))), "beyond"),
    "trailing bytes": (lambda d: d + b"\0", "trailing"),
    "stream crc": (lambda d: d[:-1] + bytes([d[-1] ^ 0x80]), "CRC32 mismatch"),
    "count mismatch": (edit(_set(["a", "shape"], [7])), "cannot hold"),
    "expansion bomb": (edit(_set(["b", "shape"], [1 << 20])), "cannot hold"),
    "symbols without bits": (
        edit(lambda h, b: h["b"].update(symbols=90, shape=[100], bits=12) and None),
        "cannot fit in 12 bits",
    ),
    "runs without run symbol": (
        edit(_set(["b", "run_symbol"], None)),
        "run_classes=7 does not fit",
    ),
    "run symbol out of range": (edit(_set(["b", "run_symbol"], 2)), "run_symbol"),
    "classes without run symbol": (edit(_set(["a", "run_classes"], 2)), "does not fit"),
    "too many classes": (edit(_set(["b", "run_classes"], 34)), "run_classes"),
    "alphabet vs table": (edit(_set(["a", "alphabet_size"], 9)), "code table"),
    "block width vs size": (edit(_set(["c", "block_width"], 31)), "fields need"),
    "block base": (edit(lambda h, b: h["c"].update(block_base=h["c"]["block_base"] + 1)), "block"),
    "runs cover too few": (edit(_set(["b", "shape"], [103])), "run symbols cover"),
    "table size": (edit(_set(["b", "table_bits"], 20)), "table_bits=20"),
    "table too short": (edit(_set(["b", "table_bits"], 2)), "presence bits"),
    "table padding": (
        edit(lambda h, b: b.__setitem__(8, b[8] | 1)),
        "padding bits after the code table",
    ),
    "empty group": (
        edit(lambda h, b: b.__setitem__(slice(0, 4), bytes.fromhex("80011080"))),
        "empty group",
    ),
    "over-subscribed code": (
        edit(lambda h, b: b.__setitem__(slice(0, 4), bytes.fromhex("f8000000"))),
        "Kraft",
    ),
    "payload padding": (edit(lambda h, b: b.__setitem__(5, b[5] | 1)), "padding"),
    "block index padding": (
        edit(_dirty_block_index_padding),
        "padding bits after the last packed field",
    ),
    # b's two symbols get lengths 1 and 2: code word 11 is unused, and the payload has it
    "unused code word": (
        edit(lambda h, b: b.__setitem__(slice(6, 9), bytes.fromhex("230020"))),
        "no code word",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_rejected_with_a_precise_message(case):
    make, match = HOSTILE[case]
    with pytest.raises(SidecarError, match=match):
        decode_sidecar(make(FUZZ_TARGET))


@given(st.integers(0, len(FUZZ_TARGET) - 1))
@settings(max_examples=200, deadline=None)
def test_every_truncation_is_rejected(length):
    with pytest.raises(SidecarError):
        decode_sidecar(FUZZ_TARGET[:length])


@given(
    st.lists(
        st.tuples(st.integers(0, len(FUZZ_TARGET) - 1), st.integers(1, 255)), min_size=1, max_size=3
    )
)
@settings(max_examples=200, deadline=None)
def test_every_byte_flip_is_rejected(flips):
    data = bytearray(FUZZ_TARGET)
    for at, mask in flips:
        data[at] ^= mask
    if bytes(data) != FUZZ_TARGET:  # two flips of one byte may cancel
        with pytest.raises(SidecarError):
            decode_sidecar(bytes(data))


@given(st.binary(max_size=600), st.booleans())
@settings(max_examples=200, deadline=None)
def test_garbage_is_rejected(junk, with_prefix):
    if with_prefix:
        junk = FUZZ_TARGET[:12] + junk
    with pytest.raises(SidecarError):
        decode_sidecar(junk)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**70),
    st.integers(0, 700),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(-3, 700), max_size=3),
)


@given(st.sampled_from("abc"), st.sampled_from(sorted(sidecar._FIELDS)), JSON_VALUES)
@settings(max_examples=200, deadline=None)
def test_any_header_value_with_valid_crcs_gives_sidecar_error_or_a_valid_result(
    stream, field, value
):
    data = edit(_set([stream, field], value))(FUZZ_TARGET)
    try:
        decoded, _ = decode_sidecar(data)
    except SidecarError:
        return
    assert all(isinstance(s, IndexStream) and s.indices.shape == s.shape for s in decoded)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_corrupt_buffer_with_valid_crcs_gives_sidecar_error_or_a_valid_result(flips):
    def corrupt(header, buffer):
        for at, mask in flips:
            buffer[at % len(buffer)] ^= mask

    try:
        decoded, _ = decode_sidecar(edit(corrupt)(FUZZ_TARGET))
    except SidecarError:
        return
    assert all(
        s.indices.shape == s.shape and s.indices.max(initial=0) < s.alphabet_size for s in decoded
    )


# ------------------------------------------------------------------ files


def test_reading_a_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.onnxhq"
    with pytest.raises(SidecarError, match=r"nope\.onnxhq"):
        read_sidecar(path)
    with pytest.raises(SidecarError, match="cannot read"):
        read_sidecar(tmp_path)


def test_reading_a_corrupt_file_names_it(tmp_path):
    path = tmp_path / "bad.onnxhq"
    path.write_bytes(FUZZ_TARGET[:-1])
    with pytest.raises(SidecarError, match=r"bad\.onnxhq"):
        read_sidecar(path)


@pytest.mark.parametrize("victim", ["fsync", "replace"])
def test_a_failing_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, victim):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    fresh, old = tmp_path / "fresh.onnxhq", tmp_path / "old.onnxhq"
    write_sidecar(old, tiny_streams())
    monkeypatch.setattr(os, victim, boom)
    for path in (fresh, old):
        with pytest.raises(SidecarError, match="No space left"):
            write_sidecar(path, mixed_streams())
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnxhq"]
    assert read_sidecar(old)[0] == sorted(tiny_streams(), key=lambda s: s.name)


def test_a_failing_encode_writes_nothing(tmp_path):
    stream = IndexStream("w", (1,), 2, np.array([1]))
    with pytest.raises(ConfigError):
        write_sidecar(tmp_path / "x.onnxhq", [stream, stream])
    assert list(tmp_path.iterdir()) == []


def test_module_constants_describe_the_prefix():
    assert GOLDEN[:8] == sidecar.MAGIC
    assert struct.unpack_from("<I", GOLDEN, 8)[0] == sidecar.SIDECAR_FORMAT_VERSION


# ------------------------------------------------------------------ the encoder against a reference


def reference_encode(indices, k):
    """``(coding fields, bytes)`` of one stream, written from the format description in plain
    Python (one string of bits per symbol): the smaller of plain coding and runs of the most
    frequent index. Only the code lengths (package-merge) come from onnxhq."""
    x = [int(v) for v in np.ravel(indices)]

    def coded(symbols, extra, widths, size):
        counts = np.bincount(symbols, minlength=size) if symbols else np.zeros(size, np.int64)
        used = int(np.count_nonzero(counts))
        longest = max(MAX_WRITTEN_LENGTH, (used - 1).bit_length())
        lengths = huffman.code_lengths(counts, max_length=longest)
        code, c, prev = {}, 0, 0
        for length, s in sorted((int(n), s) for s, n in enumerate(lengths) if n):
            c <<= length - prev
            code[s], c, prev = format(c, f"0{length}b"), c + 1, length
        groups = [[8 * g + j in code for j in range(8)] for g in range(-(-size // 8))]
        table = "".join("1" if any(g) else "0" for g in groups)
        table += "".join("".join("1" if b else "0" for b in g) for g in groups if any(g))
        width = "04b" if size <= 65536 else "05b"
        table += "".join(format(int(lengths[s]) - 1, width) for s in sorted(code))
        words = [
            code[s] + (format(e, f"0{widths[s]}b") if widths[s] else "")
            for s, e in zip(symbols, extra)
        ]
        return table, words

    plain = (None, 0, *coded(x, [0] * len(x), [0] * k, k))
    best = plain
    if x:
        r = int(np.argmax(np.bincount(x, minlength=k)))
        symbols, extra, run = [], [], 0
        for v in x + [k]:  # k: the end of the stream
            if v == r:
                run += 1
                continue
            if v < k or run:
                c = run.bit_length()
                symbols.append(c * (k + 1) + v)
                extra.append(run - (1 << (c - 1)) if c else 0)
            run = 0
        n_classes = max(s // (k + 1) for s in symbols) + 1
        if n_classes * (k + 1) <= 1 << 17:
            widths = [max(s // (k + 1) - 1, 0) for s in range(n_classes * (k + 1))]
            runs = (r, n_classes, *coded(symbols, extra, widths, n_classes * (k + 1)))
            if sum(map(len, runs[3])) + len(runs[2]) < sum(map(len, plain[3])) + len(plain[2]):
                best = runs
    run_symbol, run_classes, table, words = best
    size = min(256, max(32, 1 << max(0, -(-len(words) // 64) - 1).bit_length()))
    blocks = [sum(map(len, words[b : b + size])) for b in range(0, len(words), size)][:-1]
    base = min(blocks, default=0)
    width = (max(blocks, default=0) - base).bit_length()
    index = "".join(format(b - base, f"0{width}b") if width else "" for b in blocks)
    payload = "".join(words)

    def pad(bits):
        bits += "0" * (-len(bits) % 8)
        return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))

    fields = {
        "shape": list(np.shape(indices)),
        "alphabet_size": k,
        "run_symbol": run_symbol,
        "run_classes": run_classes,
        "table_bits": len(table),
        "symbols": len(words),
        "bits": len(payload),
        "block_size": size,
        "block_base": base,
        "block_width": width,
    }
    return fields, pad(table) + pad(index) + pad(payload)


def random_indices(seed, k, dominance, n_max=3000, dtype=None, n=None):
    """Indices in [0, k): i.i.d., a share ``dominance`` of them one index, in runs half the time;
    ``n`` of them, else a random number below ``n_max``."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, n_max)) if n is None else n
    top = int(rng.integers(0, k))
    if rng.random() < 0.5:
        x = np.where(rng.random(n) < dominance, top, rng.integers(0, k, size=n))
    else:  # runs: a dominant index in stretches of geometric lengths
        lengths = rng.geometric(max(1 - dominance, 1e-3), size=n + 1)
        inside = (np.repeat(np.arange(lengths.size) % 2, lengths)[:n]).astype(bool)
        x = np.where(inside, top, rng.integers(0, k, size=n))
    return x.astype(dtype or (np.uint8 if k <= 256 else np.uint16))


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2, 3, 16, 17, 32, 255, 256, 257, 4096, 65536]),
    st.floats(0.0, 1.0),
    st.sampled_from([None, np.int64, np.int32]),
)
@settings(max_examples=120, deadline=None)
def test_the_encoder_writes_what_the_plain_reference_writes(seed, k, dominance, dtype):
    indices = random_indices(seed, k, dominance, dtype=dtype)
    entry, data = layout.encode_stream("w", indices, k)
    assert (entry, data) == reference_encode(indices, k)


@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 17, 32, 300]), st.floats(0.5, 1.0))
@settings(max_examples=40, deadline=None)
def test_chunk_boundaries_change_no_byte(seed, k, dominance):
    indices = random_indices(seed, k, dominance, n_max=2000)
    expected = reference_encode(indices, k)
    with pytest.MonkeyPatch.context() as mp:  # tiny chunks: carries at every boundary
        mp.setattr(huffman, "CHUNK", 5)
        mp.setattr(bitpack, "CHUNK", 3)
        mp.setattr(runs, "SCAN", 7)
        assert layout.encode_stream("w", indices, k) == expected


# ------------------------------------------------------------------ large streams, bounded memory


def decode_in_groups(data: bytes, group: int):
    """`decode_sidecar` with every stream taken as large, decoded ``group`` symbols at a time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unpack, "LARGE", 1)
        mp.setattr(blockdecode, "GROUP_SYMBOLS", group)
        return decode_sidecar(data)


@pytest.mark.parametrize("group", [1, 40, 1000, 1 << 20])
def test_streams_decoded_in_groups_of_blocks_equal_those_decoded_together(group):
    data = encode_sidecar(mixed_streams() + tiny_streams())
    assert decode_in_groups(data, group) == decode_sidecar(data)


@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_a_corrupt_large_stream_gives_the_error_of_a_small_one(flips):
    streams = [
        IndexStream("a", (3000,), 17, random_indices(1, 17, 0.9, n=3000)),
        IndexStream("b", (2000,), 32, random_indices(2, 32, 0.1, n=2000)),
    ]
    header, buffer = split(encode_sidecar(streams))
    buffer = bytearray(buffer)
    victim = header["ab"[flips[0][0] % 2]]["data_offsets"]  # one stream: streams are decoded
    for at, mask in flips:  # in another order in groups, so two faults may be met in another
        buffer[victim[0] + at % (victim[1] - victim[0])] ^= mask
    for entry in header.values():
        begin, end = entry["data_offsets"]
        entry["crc32"] = zlib.crc32(buffer[begin:end])
    data = join(header, bytes(buffer))
    outcomes = []
    for decode in (decode_sidecar, lambda d: decode_in_groups(d, 64)):
        try:
            outcomes.append(decode(data))
        except SidecarError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_a_stream_past_the_large_threshold_round_trips():
    rng = np.random.default_rng(11)
    n = unpack.LARGE + 12_345
    dense = IndexStream("dense", (n,), 32, rng.integers(0, 32, size=n).astype(np.uint8))
    sparse = IndexStream("sparse", (n,), 17, sparse_indices(rng, n).astype(np.uint8))
    wide = IndexStream("wide", (n,), 3000, rng.integers(0, 3000, size=n).astype(np.uint16))
    streams = [dense, sparse, wide]
    assert decode_sidecar(encode_sidecar(streams))[0] == streams


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_coding_a_large_stream_takes_a_few_bytes_per_index():
    # 8 M indices of ~4.4 bits: encoding used to peak at ~66 bytes per index, decoding at ~17;
    # now the result, the decoded indices and a few MB of chunk temporaries
    n = 8_000_000
    rng = np.random.default_rng(12)
    indices = np.clip(np.round(rng.laplace(size=n) * 4) + 16, 0, 31).astype(np.uint8)
    stream = IndexStream("w", (n,), 32, indices)
    data = encode_sidecar([stream])
    assert traced_peak(lambda: encode_sidecar([stream])) < 1.5 * n + (16 << 20)
    assert traced_peak(lambda: decode_sidecar(data)) < 1.5 * n + (16 << 20)
