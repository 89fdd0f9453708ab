import math
import zlib

import msgpack
import numpy as np
import pytest
import torch

from gossipfl.transport import wire
from gossipfl.transport.base import Message
from gossipfl.transport.wire import WireError, decode, encode

LAYOUT = "0123456789abcdef"
COUNT = 37  # not a multiple of any SIMD width, so tail elements are exercised
MAX_BYTES = COUNT * 4


def make_message(kind="model", vector=None, **extra):
    vector = torch.randn(COUNT, generator=torch.Generator().manual_seed(0)) if vector is None else vector
    return Message(kind, 3, 7, 2, vector, extra)


def frames_of(message=None):
    """Frames as a receiver sees them: independent byte strings."""
    return [bytes(f) for f in encode(message or make_message(), LAYOUT)]


def header_of(frames):
    return msgpack.unpackb(frames[0])


def with_header(frames, **changes):
    header = header_of(frames) | changes
    return [msgpack.packb({k: v for k, v in header.items() if v is not ...}), frames[1]]


def reason(frames, **kwargs):
    args = dict(expected_layout_hash=LAYOUT, expected_count=COUNT, max_bytes=MAX_BYTES) | kwargs
    with pytest.raises(WireError) as caught:
        decode(frames, **args)
    return caught.value.reason


def test_round_trip_keeps_every_field_and_extra():
    sent = make_message(view={"5": [12, True], "9": [3, False]}, note="hi", weight=0.25)
    got = decode(frames_of(sent), LAYOUT, COUNT, MAX_BYTES)
    assert (got.kind, got.sender, got.round, got.step) == ("model", 3, 7, 2)
    assert torch.equal(got.vector, sent.vector)
    assert got.extra == {"view": {"5": [12, True], "9": [3, False]}, "note": "hi", "weight": 0.25}


def test_control_kinds_carry_an_empty_vector():
    got = decode(frames_of(make_message("ping", torch.empty(0), asked=1)), LAYOUT, COUNT, MAX_BYTES)
    assert got.kind == "ping" and got.vector.numel() == 0 and got.extra == {"asked": 1}


def test_encode_shares_the_vector_memory():
    vector = torch.randn(COUNT)
    payload = encode(make_message(vector=vector), LAYOUT)[1]
    assert np.shares_memory(np.frombuffer(payload, dtype=np.float32), vector.numpy())


def test_decode_into_reuses_the_given_buffer():
    into = torch.zeros(COUNT)
    sent = make_message()
    got = decode(frames_of(sent), LAYOUT, COUNT, MAX_BYTES, into=into)
    assert got.vector is into and torch.equal(into, sent.vector)


def test_received_frames_are_not_aliased_when_read_only():
    frames = frames_of()
    got = decode(frames, LAYOUT, COUNT, MAX_BYTES)
    got.vector.zero_()  # must not write into the immutable bytes object
    assert torch.equal(decode(frames, LAYOUT, COUNT, MAX_BYTES).vector, make_message().vector)


def test_encode_refuses_unknown_kind_and_non_float32():
    with pytest.raises(ValueError):
        encode(make_message("gossip"), LAYOUT)
    with pytest.raises(ValueError):
        encode(make_message(vector=torch.zeros(COUNT, dtype=torch.float64)), LAYOUT)


BAD_CASES = {
    "no_frames": (lambda f: [], "bad_frames"),
    "one_frame": (lambda f: f[:1], "bad_frames"),
    "three_frames": (lambda f: f + [b""], "bad_frames"),
    "truncated_header": (lambda f: [f[0][:-3], f[1]], "bad_header"),
    "truncated_payload": (lambda f: [f[0], f[1][:-2]], "bad_length"),
    "garbage_header": (lambda f: [b"\xc1\xff\x00garbage", f[1]], "bad_header"),
    "trailing_header_bytes": (lambda f: [f[0] + b"\x00", f[1]], "bad_header"),
    "header_not_a_map": (lambda f: [msgpack.packb([1, 2, 3]), f[1]], "bad_header"),
    "header_too_large": (lambda f: with_header(f, extra={"pad": "x" * wire.MAX_HEADER_BYTES}), "bad_header"),
    "missing_key": (lambda f: with_header(f, step=...), "bad_header"),
    "unknown_key": (lambda f: with_header(f, surprise=1), "bad_header"),
    "bool_as_int": (lambda f: with_header(f, sender=True), "bad_header"),
    "float_round": (lambda f: with_header(f, round=7.0), "bad_header"),
    "bytes_kind": (lambda f: with_header(f, kind=b"model"), "bad_header"),
    "extra_not_a_map": (lambda f: with_header(f, extra=[1]), "bad_header"),
    "negative_round": (lambda f: with_header(f, round=-1), "bad_header"),
    "huge_sender": (lambda f: with_header(f, sender=2**40), "bad_header"),
    "negative_checksum": (lambda f: with_header(f, checksum=-5), "bad_header"),
    "wrong_version": (lambda f: with_header(f, version=2), "wrong_version"),
    "no_version": (lambda f: with_header(f, version=...), "wrong_version"),
    "wrong_kind": (lambda f: with_header(f, kind="evil"), "unknown_kind"),
    "wrong_layout": (lambda f: with_header(f, layout="fedcba9876543210"), "wrong_layout"),
    "wrong_dtype": (lambda f: with_header(f, dtype="float64"), "wrong_dtype"),
    "count_mismatch": (lambda f: with_header([f[0], f[1][:-4]], count=COUNT - 1), "bad_length"),
    "byte_length_mismatch": (lambda f: [f[0], f[1][:-4]], "bad_length"),
    "control_with_payload": (lambda f: with_header(f, kind="ping"), "bad_length"),
    "oversized": (lambda f: [f[0], f[1] + bytes(4)], "oversized"),
    "bad_checksum": (lambda f: [f[0], bytes([f[1][0] ^ 1]) + f[1][1:]], "bad_checksum"),
    "not_a_buffer": (lambda f: [f[0], 12345], "bad_frames"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_rejects(case):
    mutate, expected = BAD_CASES[case]
    assert reason(mutate(frames_of())) == expected


def test_rejects_a_frame_above_max_bytes():
    assert reason(frames_of(), max_bytes=MAX_BYTES - 1) == "oversized"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, COUNT // 2, COUNT - 1])
def test_rejects_non_finite_values(value, position):
    vector = torch.randn(COUNT)
    vector[position] = value
    assert reason(frames_of(make_message(vector=vector))) == "non_finite"


def test_large_finite_values_whose_sum_overflows_are_accepted():
    vector = torch.full((COUNT,), 3e38)
    assert torch.equal(decode(frames_of(make_message(vector=vector)), LAYOUT, COUNT, MAX_BYTES).vector, vector)


# --- the checksum of large payloads (folded CRC-32) ---

def reference_checksum(payload: bytes) -> int:
    """The documented definition, with numpy's well-defined unsigned wrap-around."""
    blocks = len(payload) // wire.FOLD_BLOCK
    if blocks < 2:
        return zlib.crc32(payload)
    words = np.frombuffer(payload, dtype="<u8", count=blocks * wire.FOLD_BLOCK // 8).reshape(blocks, -1)
    folded = np.add.reduce(words, axis=0, dtype=np.uint64)
    return zlib.crc32(payload[blocks * wire.FOLD_BLOCK:], zlib.crc32(folded.tobytes()))


@pytest.mark.parametrize("count", [1000, 400_000, 655_363])  # below one block, one block + tail, folded + tail
def test_checksum_matches_its_definition(count):
    random_bits = np.random.default_rng(count).integers(0, 2**32, size=count, dtype=np.uint32)
    vector = torch.from_numpy(random_bits.view(np.float32))  # any bit pattern: the sums overflow
    assert wire.checksum(vector) == reference_checksum(random_bits.tobytes())


def test_folded_checksum_catches_random_bit_flips():
    count = 917_507  # 3.5 MiB + 12 bytes: three folded blocks and a tail
    sent = make_message(vector=torch.randn(count, generator=torch.Generator().manual_seed(1)))
    header, payload = frames_of(sent)
    rng = np.random.default_rng(7)
    for _ in range(200):
        corrupted = bytearray(payload)
        for position in rng.integers(0, len(payload), size=int(rng.integers(1, 4))):
            corrupted[position] ^= 1 << int(rng.integers(8))
        if corrupted != payload:
            assert reason([header, corrupted], expected_count=count, max_bytes=4 * count) == "bad_checksum"


# --- fuzzing: random frames and random mutations of a valid message ---

def random_value(rng):
    choices = [lambda: int(rng.integers(-2**40, 2**40)), lambda: int(rng.integers(0, 40)), lambda: -1,
               lambda: float(rng.standard_normal()), lambda: True, lambda: None, lambda: "model",
               lambda: LAYOUT, lambda: "float32", lambda: rng.bytes(int(rng.integers(0, 8))),
               lambda: [1, "a"], lambda: {"k": 1}, lambda: 2**63, lambda: COUNT]
    return choices[int(rng.integers(len(choices)))]()


def mutate(frames, rng):
    header, payload = bytearray(frames[0]), bytearray(frames[1])
    op = int(rng.integers(9))
    if op == 0:  # random frames altogether
        return [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(0, 4)))]
    if op == 1:  # flip bits in the header
        for i in rng.integers(0, len(header), size=int(rng.integers(1, 4))):
            header[i] ^= 1 << int(rng.integers(8))
    elif op == 2:  # flip bits in the payload
        for i in rng.integers(0, len(payload), size=int(rng.integers(1, 4))):
            payload[i] ^= 1 << int(rng.integers(8))
    elif op == 3:  # truncate or extend a frame
        cut = int(rng.integers(-8, 8))
        target = header if rng.integers(2) else payload
        target[max(0, len(target) + min(cut, 0)):] = rng.bytes(max(cut, 0))
    elif op == 4:  # replace a header field with a random value of a random type
        fields = header_of(frames)
        fields[list(wire._FIELDS)[int(rng.integers(len(wire._FIELDS)))]] = random_value(rng)
        header = msgpack.packb(fields)
    elif op == 5:  # random bytes spliced into the header
        at = int(rng.integers(len(header)))
        header[at:at + 4] = rng.bytes(4)
    elif op == 6:  # drop or add a frame
        return [bytes(header)] if rng.integers(2) else [bytes(header), bytes(payload), rng.bytes(3)]
    elif op == 7:  # random header map from random keys and values
        keys = list(wire._FIELDS) + ["extra", "x"]
        header = msgpack.packb({keys[int(i)]: random_value(rng) for i in rng.integers(0, len(keys), 8)})
    else:  # overwrite payload values with raw random words (may be NaN/Inf bit patterns)
        at = int(rng.integers(0, COUNT)) * 4
        payload[at:at + 4] = rng.bytes(4)
    return [bytes(header), bytes(payload)]


@pytest.mark.parametrize("use_into", [False, True])
def test_fuzz_only_wire_errors_and_never_a_corrupted_payload(use_into):
    rng = np.random.default_rng(1234)
    original = make_message(view={"1": [4, True]})
    valid = frames_of(original)
    outcomes = {"accepted": 0, "rejected": 0}
    for _ in range(10_000):
        frames = mutate(valid, rng)
        into = torch.empty(COUNT) if use_into else None
        try:
            got = decode(frames, LAYOUT, COUNT, MAX_BYTES + 8, into=into)
        except WireError as error:
            assert error.reason and error.reason == error.reason.lower()
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        expected = original.vector if got.kind in wire.VECTOR_KINDS else torch.empty(0)
        assert got.vector.numpy().tobytes() == expected.numpy().tobytes()
    assert outcomes["rejected"] > 9000 and outcomes["accepted"] > 0
