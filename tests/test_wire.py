import math

import msgpack
import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    "wrong_version": (lambda f: with_header(f, version=wire.PROTOCOL_VERSION + 1), "wrong_version"),
    "no_version": (lambda f: with_header(f, version=...), "wrong_version"),
    "wrong_kind": (lambda f: with_header(f, kind="evil"), "unknown_kind"),
    "wrong_layout": (lambda f: with_header(f, layout="fedcba9876543210"), "wrong_layout"),
    "wrong_dtype": (lambda f: with_header(f, dtype="float64"), "wrong_dtype"),
    "count_mismatch": (lambda f: with_header([f[0], f[1][:-4]], count=COUNT - 1), "bad_length"),
    "byte_length_mismatch": (lambda f: [f[0], f[1][:-4]], "bad_length"),
    "control_with_payload": (lambda f: with_header(f, kind="ping", layout=wire.NO_LAYOUT), "bad_length"),
    "control_with_a_layout": (lambda f: with_header([f[0], b""], kind="ping", count=0,
                                                    checksum=xxhash.xxh3_64_intdigest(b"")), "wrong_layout"),
    "model_without_a_layout": (lambda f: with_header(f, layout=wire.NO_LAYOUT), "wrong_layout"),
    "oversized": (lambda f: [f[0], f[1] + bytes(4)], "oversized"),
    "bad_checksum": (lambda f: [f[0], bytes([f[1][0] ^ 1]) + f[1][1:]], "bad_checksum"),
    "not_a_buffer": (lambda f: [f[0], 12345], "bad_frames"),
    "version_nested_1000_deep": (lambda f: with_header(f, version=nested(1000)), "wrong_version"),
    "extra_nested_too_deep": (lambda f: with_header(f, extra={"a": nested(wire.MAX_DEPTH - 1)}), "bad_header"),
    "extra_too_many_items": (lambda f: with_header(f, extra={"a": [0] * (wire.MAX_ITEMS + 1)}), "bad_header"),
    "extension_type": (lambda f: with_header(f, extra={"a": msgpack.ExtType(5, b"x")}), "bad_header"),
    "empty_extension_type": (lambda f: [f[0][:-1] + b"\xc7\x00\x05", f[1]], "bad_header"),
    "map_key_not_a_string": (lambda f: with_header(f, extra={"a": {1: 2}}), "bad_header"),
}


def nested(depth):
    """A list nested `depth` levels deep, built without recursion."""
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_rejects(case):
    mutate, expected = BAD_CASES[case]
    assert reason(mutate(frames_of())) == expected


def test_extra_may_nest_up_to_the_limit():
    extra = {"a": nested(wire.MAX_DEPTH - 2)}  # header map, extra map, then the lists
    assert decode(frames_of(make_message(**extra)), LAYOUT, COUNT, MAX_BYTES).extra == extra


def test_error_texts_quote_a_bounded_excerpt():
    long_layout = with_header(frames_of(), layout="L" * 60_000)
    deep_version = with_header(frames_of(), version=nested(1000))
    for frames in (long_layout, deep_version):
        with pytest.raises(WireError) as caught:
            decode(frames, LAYOUT, COUNT, MAX_BYTES)
        assert len(str(caught.value)) <= len(caught.value.reason) + 2 + wire.MAX_DETAIL
    assert len(wire.excerpt(nested(1000))) <= wire.MAX_DETAIL


def test_an_unforeseen_failure_inside_decode_is_a_wire_error(monkeypatch):
    frames = frames_of()
    monkeypatch.setattr(wire, "checksum", lambda vector: 1 / 0)
    assert reason(frames) == "bad_message"


def test_a_wrong_into_buffer_is_the_callers_error():
    with pytest.raises(ValueError):
        decode(frames_of(), LAYOUT, COUNT, MAX_BYTES, into=torch.zeros(COUNT + 1))


def test_control_kinds_decode_with_an_into_buffer():
    got = decode(frames_of(make_message("ping", torch.empty(0))), LAYOUT, COUNT, MAX_BYTES, into=torch.zeros(COUNT))
    assert got.vector.numel() == 0


def test_check_message_accepts_what_an_encoder_sends():
    wire.check_message(make_message(view={"1": [2, True]}), COUNT)
    wire.check_message(make_message("ping", torch.empty(0)), COUNT)


NAN = torch.full((COUNT,), math.nan)
BAD_MESSAGES = {
    "unknown kind": (Message("gossip", 3, 7, 2, torch.zeros(COUNT)), "unknown_kind"),
    "negative sender": (Message("model", -1, 7, 2, torch.zeros(COUNT)), "bad_header"),
    "bool round": (Message("model", 3, True, 2, torch.zeros(COUNT)), "bad_header"),
    "huge step": (Message("model", 3, 7, 2**31, torch.zeros(COUNT)), "bad_header"),
    "extra not a map": (Message("model", 3, 7, 2, torch.zeros(COUNT), [1]), "bad_header"),
    "extra with a set": (Message("model", 3, 7, 2, torch.zeros(COUNT), {"a": {1}}), "bad_header"),
    "extra too deep": (Message("model", 3, 7, 2, torch.zeros(COUNT), {"a": nested(wire.MAX_DEPTH - 1)}), "bad_header"),
    "float64": (Message("model", 3, 7, 2, torch.zeros(COUNT, dtype=torch.float64)), "wrong_dtype"),
    "not a tensor": (Message("model", 3, 7, 2, np.zeros(COUNT, dtype=np.float32)), "wrong_dtype"),
    "two-dimensional": (Message("model", 3, 7, 2, torch.zeros(1, COUNT)), "bad_length"),
    "wrong length": (Message("model", 3, 7, 2, torch.zeros(COUNT - 1)), "bad_length"),
    "ping with a vector": (Message("ping", 3, 7, 2, torch.zeros(COUNT)), "bad_length"),
    "nan": (Message("model", 3, 7, 2, NAN), "non_finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_check_message_refuses(case):
    message, expected = BAD_MESSAGES[case]
    with pytest.raises(WireError) as caught:
        wire.check_message(message, COUNT)
    assert caught.value.reason == expected


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


# --- the checksum (XXH3-64 of the payload) ---

@pytest.mark.parametrize("count", [0, 1000, 655_363])
def test_checksum_is_xxh3_of_the_payload(count):
    random_bits = np.random.default_rng(count).integers(0, 2**32, size=count, dtype=np.uint32)
    vector = torch.from_numpy(random_bits.view(np.float32))  # any bit pattern
    header = header_of(frames_of(Message("model", 0, 0, 0, vector)))
    assert header["checksum"] == xxhash.xxh3_64_intdigest(random_bits.tobytes())


def test_checksum_catches_random_bit_flips():
    count = 917_507  # 3.5 MiB + 12 bytes
    sent = make_message(vector=torch.randn(count, generator=torch.Generator().manual_seed(1)))
    header, payload = frames_of(sent)
    rng = np.random.default_rng(7)
    for _ in range(200):
        corrupted = bytearray(payload)
        for position in rng.integers(0, len(payload), size=int(rng.integers(1, 4))):
            corrupted[position] ^= 1 << int(rng.integers(8))
        if corrupted != payload:
            assert wire.checksum(corrupted) != header_of([header])["checksum"]
            # decode refuses it too; a flip that makes a NaN is caught by the cheaper finiteness pass first
            assert reason([header, corrupted], expected_count=count, max_bytes=4 * count) in {"bad_checksum", "non_finite"}


def test_control_kinds_carry_no_layout_so_a_tool_without_the_model_can_speak():
    frames = [bytes(f) for f in encode(make_message("status", torch.empty(0), round=3), "any layout at all")]
    assert header_of(frames)["layout"] == wire.NO_LAYOUT
    assert decode(frames, LAYOUT, COUNT, MAX_BYTES).extra == {"round": 3}


# --- fuzzing: random frames and random mutations of a valid message ---

HOSTILE_VALUES = [nested(1000), nested(wire.MAX_DEPTH), {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}},
                  2**64 - 1, -2**63, 2**31, -1, True, None, math.nan, math.inf, 1e308, "x" * 70_000, "x" * 30_000,
                  b"\x00" * 1000, [0] * (wire.MAX_ITEMS + 1), {str(i): i for i in range(100)}, "",
                  "model", "ping", LAYOUT, "float32", COUNT, 0, [1, "a"], {"k": 1}, {"": []}]


def random_value(rng):
    choices = [lambda: int(rng.integers(-2**40, 2**40)), lambda: int(rng.integers(0, 40)),
               lambda: float(rng.standard_normal()), lambda: rng.bytes(int(rng.integers(0, 8))),
               lambda: HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]]
    return choices[int(rng.integers(len(choices)))]()


def mutate(frames, rng, donors):
    """One random corruption of a valid encoding: bit flips, insertions, deletions, truncations,
    splices from other valid encodings, hostile header values, missing or extra frames."""
    header, payload = bytearray(frames[0]), bytearray(frames[1])
    op = int(rng.integers(13))
    target = header if rng.integers(2) else payload
    at = int(rng.integers(len(target) + 1))
    if op == 0:  # random frames altogether
        return [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(0, 4)))]
    if op == 1:  # flip bits
        for i in rng.integers(0, max(1, len(target)), size=int(rng.integers(1, 4))):
            if target:
                target[i] ^= 1 << int(rng.integers(8))
    elif op == 2:  # insert bytes
        target[at:at] = rng.bytes(int(rng.integers(1, 9)))
    elif op == 3:  # delete bytes
        del target[at:at + int(rng.integers(1, 9))]
    elif op == 4:  # truncate
        del target[at:]
    elif op == 5:  # splice in a stretch of another valid encoding
        donor = donors[int(rng.integers(len(donors)))][0 if target is header else 1]
        start = int(rng.integers(len(donor) + 1))
        target[at:at + int(rng.integers(0, 16))] = donor[start:start + int(rng.integers(1, 32))]
    elif op in (6, 7):  # replace a header field with a random or hostile value
        fields = header_of(frames)
        keys = list(wire._FIELDS) + ["extra"]
        fields[keys[int(rng.integers(len(keys)))]] = random_value(rng)
        header = msgpack.packb(fields)
    elif op == 8:  # hostile values inside extra
        header = msgpack.packb(header_of(frames) | {"extra": {"view": random_value(rng), "x": random_value(rng)}})
    elif op == 9:  # drop or add frames
        return [bytes(header)] if rng.integers(2) else [bytes(header), bytes(payload)] + [rng.bytes(3)] * int(
            rng.integers(1, 4))
    elif op == 10:  # random header map from random keys and values
        keys = list(wire._FIELDS) + ["extra", "x"]
        header = msgpack.packb({keys[int(i)]: random_value(rng) for i in rng.integers(0, len(keys), 8)})
    elif op == 11:  # overwrite payload values with raw random words (may be NaN/Inf bit patterns)
        at = int(rng.integers(0, COUNT)) * 4
        payload[at:at + 4] = rng.bytes(4)
    else:  # a valid control message's header over the model's payload, or the reverse
        return [donors[1][0], bytes(payload)] if rng.integers(2) else [bytes(header), donors[1][1]]
    return [bytes(header), bytes(payload)]


def canonical(header_bytes):
    """A header's bytes with its top-level keys sorted and an empty `extra` left out, as an
    encoder writes it (nested maps keep their order through decode and encode alike)."""
    header = header_of([header_bytes])
    if header.get("extra") == {}:
        del header["extra"]
    return msgpack.packb(dict(sorted(header.items())))  # bytes: NaN and -0.0 compare exactly


def assert_sent_by_a_valid_encoder(got, frames, original):
    """What decode accepted is exactly what an encoder sends for it: the same header, field for
    field, and for a model the very vector that was encoded."""
    assert canonical(frames[0]) == canonical(encode(got, LAYOUT)[0])
    expected = original.vector if got.kind in wire.VECTOR_KINDS else torch.empty(0)
    assert got.vector.numpy().tobytes() == expected.numpy().tobytes()


@pytest.mark.parametrize("use_into", [False, True])
def test_fuzz_only_wire_errors_and_never_a_corrupted_message(use_into):
    rng = np.random.default_rng(1234 + use_into)
    original = make_message(view={"1": [4, True]})
    valid = frames_of(original)
    donors = [valid, frames_of(make_message("ping", torch.empty(0), asked=3)), frames_of(make_message())]
    outcomes = {"accepted": 0, "rejected": 0}
    for _ in range(20_000):
        frames = mutate(valid, rng, donors)
        into = torch.empty(COUNT) if use_into else None
        try:
            got = decode(frames, LAYOUT, COUNT, MAX_BYTES + 8, into=into)
        except WireError as error:
            assert error.reason and error.reason == error.reason.lower()
            assert len(str(error)) <= len(error.reason) + 2 + wire.MAX_DETAIL
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        assert_sent_by_a_valid_encoder(got, frames, original)
    assert outcomes["rejected"] > 15_000 and outcomes["accepted"] > 100


# --- property-based: arbitrary msgpack headers ---

SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4), max_leaves=16)
# Hypothesis spends 2 to 6 ms drawing each example here: the seeded fuzz above carries the volume.
FIELD_KEYS = sorted(wire._FIELDS) + ["extra"]


@st.composite
def headers(draw):
    """A valid model header with some fields replaced, removed or added, arbitrarily."""
    header = header_of(frames_of())
    for key in draw(st.lists(st.sampled_from(FIELD_KEYS + ["surprise"]), max_size=3)):
        header[key] = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(FIELD_KEYS), max_size=2)):
        header.pop(key, None)
    return header


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(header=headers())
def test_property_arbitrary_headers_decode_exactly_or_raise_wire_error(header):
    frames = [msgpack.packb(header), frames_of()[1]]
    try:
        got = decode(frames, LAYOUT, COUNT, MAX_BYTES)
    except WireError:
        return
    assert_sent_by_a_valid_encoder(got, frames, make_message())


def depth(value, level=1):
    if isinstance(value, dict):
        return max([depth(v, level + 1) for v in value.values()], default=level)
    if isinstance(value, list):
        return max([depth(v, level + 1) for v in value], default=level)
    return level - 1


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(extra=st.dictionaries(st.text(max_size=6), VALUES, max_size=4))
def test_property_extra_is_carried_exactly_when_within_the_limits(extra):
    frames = [msgpack.packb(header_of(frames_of()) | {"extra": extra}), frames_of()[1]]
    within = depth(extra, level=2) <= wire.MAX_DEPTH and len(frames[0]) <= wire.MAX_HEADER_BYTES
    try:
        got = decode(frames, LAYOUT, COUNT, MAX_BYTES)
    except WireError as error:
        assert not within and error.reason == "bad_header"
        return
    assert within
    assert msgpack.packb(got.extra) == msgpack.packb(extra)  # exact, NaN and -0.0 included
