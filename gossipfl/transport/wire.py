"""The message codec: a ZeroMQ multipart message of two frames.

Frame 0 is a small msgpack header (protocol version, kind, sender, round, step, layout hash,
dtype, element count, checksum of the payload, optional `extra` map whose unknown keys receivers
ignore); frame 1 is the raw little-endian float32 vector, sent and received without a copy.
Control kinds carry an empty vector and so no layout: their layout field is empty, which lets a
tool without the model (`gossipfl status`) speak the protocol.

A receiver treats every byte as hostile: `decode` checks the frame count, the header's size,
encoding, keys and types, every field, the nesting and item count of `extra`, the payload
length and checksum,
and the finiteness of every value before it hands out a vector. `decode` is total: any failure,
whatever its cause, is a `WireError` whose `reason` is one of bad_frames, bad_header,
wrong_version, unknown_kind, wrong_layout, wrong_dtype, bad_length, oversized, bad_checksum,
non_finite, bad_message (an unforeseen failure), and whose text quotes at most a short excerpt
of the input. `check_message` applies the checks that concern a built Message, so the memory
transport can validate as the wire does. Never pickle.
"""

from __future__ import annotations

import math
import reprlib
import sys
from collections.abc import Sequence
from typing import Any, Union

import msgpack
import numpy as np
import torch
import xxhash
import zmq

from .base import Message

PROTOCOL_VERSION = 2  # 2: XXH3 checksums, empty layout on control kinds

# Kinds that carry a full parameter vector: a gossip step's broadcast, the two halves of a
# pairwise (Poisson-clock) exchange, MoDeST's trained model (to an aggregator) and aggregate (to
# the next sample), and the final merge's convergecast and broadcast.
VECTOR_KINDS = frozenset({"model", "pair_request", "pair_reply", "trained", "aggregate", "merge_up", "merge_down"})
# Kinds that carry an empty vector; whatever they say rides in `extra` (liveness, status queries,
# MoDeST's end of the run, the final merge's set of live nodes).
CONTROL_KINDS = frozenset({"ping", "pong", "status", "done", "merge_live"})
KINDS = VECTOR_KINDS | CONTROL_KINDS

DTYPE = "float32"                 # always little-endian on the wire
MAX_HEADER_BYTES = 64 * 1024      # room for peer views in `extra`, far below any payload
MAX_INDEX = 2**31 - 1             # bound for sender, round and step
MAX_DEPTH = 8                     # nesting of maps and lists in the header; the header map is level 1
MAX_ITEMS = 16384                 # map entries plus list elements in the whole header
MAX_DETAIL = 120                  # characters of input an error text may quote
NO_LAYOUT = ""                    # the layout field of control kinds, which carry no vector

# Header keys and their exact types (bool is not an int here). "extra" is optional.
_FIELDS: dict[str, type] = {
    "version": int, "kind": str, "sender": int, "round": int, "step": int,
    "layout": str, "dtype": str, "count": int, "checksum": int,
}
_REQUIRED_KEYS, _ALLOWED_KEYS = frozenset(_FIELDS), frozenset(_FIELDS) | {"extra"}
_UNPACK_LIMITS = dict(
    raw=False, strict_map_key=True, use_list=True, max_ext_len=0,
    max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES, max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
)
# What a header may hold: msgpack's types without extension types; maps need string keys.
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 40, 40
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = 4

Frame = Union[bytes, bytearray, memoryview, zmq.Frame]

if sys.byteorder != "little":
    raise ImportError("gossipfl's wire format is little-endian and maps payloads without conversion")


class WireError(ValueError):
    """An incoming message failed validation; `reason` is a short snake_case label for counting.
    The text is cut to MAX_DETAIL characters of detail, so logging it costs a bounded line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail[:MAX_DETAIL]}" if detail else reason)
        self.reason = reason


def excerpt(value: Any) -> str:
    """A bounded repr of a value from the network: nesting, long strings and long containers are
    abbreviated (a plain repr of a hostile value can be huge or recurse without end)."""
    return _EXCERPT.repr(value)[:MAX_DETAIL]


def payload_view(vector: torch.Tensor) -> memoryview:
    """The vector's bytes as a flat memoryview of its own memory, without a copy."""
    try:  # numpy() refuses a GPU tensor, cast() a non-contiguous view: one check each, for free
        array = (vector.detach() if vector.requires_grad else vector).numpy()
        view = memoryview(array).cast("B")
    except (TypeError, RuntimeError) as error:
        raise ValueError("the wire carries contiguous CPU float32 vectors only") from error
    if array.dtype != np.float32:
        raise ValueError("the wire carries contiguous CPU float32 vectors only")
    return view


def checksum(payload: Frame) -> int:
    """XXH3-64 of the payload's bytes.

    Why XXH3: it runs at memory speed (measured: 4 us for 0.3 MB, 0.15 ms for 10 MB, 1.6 ms for
    45 MB; zlib's CRC-32 took 70 us, 2.3 ms and 10.6 ms), so checking every message costs little
    next to its transfer. It catches corruption (a bug, a broken link) as well as a CRC does in
    practice; no security claim: against an adversary, CurveZMQ authenticates every frame."""
    return xxhash.xxh3_64_intdigest(payload)


def encode(message: Message, layout_hash: str) -> list[Any]:
    """[header, payload] for `send_multipart(..., copy=False)`. The payload frame is a view of
    `message.vector`, so the vector must not change until ZeroMQ has sent it. A control kind's
    layout field is empty, whatever `layout_hash` says."""
    if message.kind not in KINDS:
        raise ValueError(f"unknown message kind {message.kind!r}; known kinds: {sorted(KINDS)}")
    payload = payload_view(message.vector)
    header = {
        "version": PROTOCOL_VERSION, "kind": message.kind, "sender": message.sender,
        "round": message.round, "step": message.step,
        "layout": layout_hash if message.kind in VECTOR_KINDS else NO_LAYOUT, "dtype": DTYPE,
        "count": message.vector.numel(), "checksum": checksum(payload),
    }
    if message.extra:
        header["extra"] = message.extra
    return [msgpack.packb(header, use_bin_type=True), payload]


def decode(frames: Sequence[Frame], expected_layout_hash: str, expected_count: int, max_bytes: int,
           into: torch.Tensor | None = None) -> Message:
    """Validate a received [header, payload] and return its Message, or raise WireError.

    The returned vector is a zero-copy view of the payload frame when that frame is writable
    (as received ZeroMQ frames are), else a copy; with `into` (a float32 tensor of
    `expected_count` elements) a model's payload is copied there instead, so a caller can reuse
    one warm buffer. The checksum and finiteness checks run on the vector before it is returned;
    `into` holds unspecified data if they fail. Raises ValueError only for a wrong `into`.
    """
    if into is not None and (into.dtype != torch.float32 or not into.is_contiguous()
                             or into.numel() != expected_count):
        raise ValueError("`into` must be a contiguous float32 tensor of the expected element count")
    try:
        return _decode(frames, expected_layout_hash, expected_count, max_bytes, into)
    except WireError:
        raise
    except Exception as error:  # a failure nobody foresaw is still only a bad message
        raise WireError("bad_message", type(error).__name__) from error


def _decode(frames: Sequence[Frame], expected_layout_hash: str, expected_count: int, max_bytes: int,
            into: torch.Tensor | None) -> Message:
    if len(frames) != 2:
        raise WireError("bad_frames", f"{len(frames)} frames, expected 2")
    header_bytes, payload = (_bytes_view(f) for f in frames)
    if len(payload) > max_bytes:
        raise WireError("oversized", f"{len(payload)} payload bytes > {max_bytes}")
    header = _parse_header(header_bytes)
    _check_fields(header, expected_layout_hash)
    kind, sender, round_index, step, extra = (header["kind"], header["sender"], header["round"], header["step"],
                                              header.get("extra", {}))
    _check_values(kind, sender, round_index, step, extra)
    count, expected = header["count"], _length_of(kind, expected_count)
    if count != expected or len(payload) != count * 4:
        raise WireError("bad_length", f"{len(payload)} bytes for {count} elements, expected {expected}")
    # Cheap checks first: a wrong kind or length costs no pass over the payload. Then the
    # checksum, whose pass brings the payload into the cache for the finiteness pass.
    if checksum(payload) != header["checksum"]:
        raise WireError("bad_checksum")
    vector = _as_vector(payload, into)
    if not all_finite(vector):
        raise WireError("non_finite")
    return Message(kind, sender, round_index, step, vector, extra)


def check_message(message: Message, expected_count: int) -> None:
    """Raise WireError unless `message` is one a valid encoder could send a model of
    `expected_count` elements: a known kind, sender/round/step ints in [0, MAX_INDEX], an
    `extra` map the header can carry, a 1-D float32 CPU vector of the kind's length
    (`expected_count`, or 0 for control kinds), every value finite. `decode` applies the same
    checks to what it reads."""
    _check_values(message.kind, message.sender, message.round, message.step, message.extra)
    vector = message.vector
    if not isinstance(vector, torch.Tensor) or vector.dtype != torch.float32 or not vector.is_cpu:
        raise WireError("wrong_dtype", "the vector is not a CPU float32 tensor")
    count = _length_of(message.kind, expected_count)
    if vector.dim() != 1 or vector.numel() != count:
        raise WireError("bad_length", f"shape {tuple(vector.shape)}, expected ({count},)")
    if not all_finite(vector):
        raise WireError("non_finite")


def _check_values(kind: Any, sender: Any, round_index: Any, step: Any, extra: Any) -> None:
    if kind not in KINDS:
        raise WireError("unknown_kind", excerpt(kind))
    if not (type(sender) is int and type(round_index) is int and type(step) is int
            and 0 <= sender <= MAX_INDEX and 0 <= round_index <= MAX_INDEX and 0 <= step <= MAX_INDEX):
        raise WireError("bad_header", "sender, round or step is not an int in range")
    if type(extra) is not dict:
        raise WireError("bad_header", "extra is not a map")
    if extra:
        _check_structure(extra, depth=2)  # `extra` sits inside the header map


def _length_of(kind: str, expected_count: int) -> int:
    """The vector length a kind carries: the model's, or none for control kinds."""
    return expected_count if kind in VECTOR_KINDS else 0


def all_finite(vector: torch.Tensor) -> bool:
    """True when no element is NaN or infinite, in one fast pass in the usual case: NaN and
    infinities propagate through a sum, so a finite sum proves every element finite (20 GB/s
    against 1 GB/s for `isfinite().all()`); only a non-finite sum, which an overflow of large
    finite values can also cause, needs the exact element-wise check."""
    return math.isfinite(vector.sum().item()) or bool(torch.isfinite(vector).all())


def _bytes_view(frame: Frame) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer  # always a flat view of bytes
    try:
        view = memoryview(frame)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as error:
        raise WireError("bad_frames", "a frame is not a contiguous byte buffer") from error


def _parse_header(data: memoryview) -> dict[str, Any]:
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("bad_header", f"header of {len(data)} bytes")
    try:
        header = msgpack.unpackb(data, **_UNPACK_LIMITS)
    except Exception as error:  # msgpack raises several types for malformed input; all mean the same
        raise WireError("bad_header", "not well-formed msgpack") from error
    if type(header) is not dict:
        raise WireError("bad_header", "header is not a map")
    return header


def _check_structure(value: Any, depth: int) -> None:
    """Raise WireError unless `value` (at nesting level `depth`) holds only msgpack scalars,
    lists and string-keyed maps, nested at most MAX_DEPTH levels, MAX_ITEMS items in all.
    Iterative, so no input can exhaust the interpreter's stack."""
    pending, items = [(value, depth)], 0
    while pending:
        value, depth = pending.pop()
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is not dict and kind is not list:
            raise WireError("bad_header", f"a value of type {kind.__name__[:32]}")
        if depth > MAX_DEPTH:
            raise WireError("bad_header", f"nested deeper than {MAX_DEPTH} levels")
        items += len(value)
        if items > MAX_ITEMS:
            raise WireError("bad_header", f"more than {MAX_ITEMS} items")
        if kind is dict:
            if any(type(key) is not str for key in value):
                raise WireError("bad_header", "a map key is not a string")
            value = value.values()
        pending.extend((child, depth + 1) for child in value)


def _check_fields(header: dict[str, Any], layout_hash: str) -> None:
    """The checks of header fields that `check_message` does not see: version, the exact key
    set and types (so a nested value anywhere but in `extra` is refused here, unwalked),
    checksum range, layout (empty for control kinds) and dtype."""
    if type(header.get("version")) is not int or header["version"] != PROTOCOL_VERSION:
        raise WireError("wrong_version", excerpt(header.get("version")))
    keys = header.keys()
    if not (_REQUIRED_KEYS <= keys <= _ALLOWED_KEYS):
        raise WireError("bad_header", f"keys {excerpt(list(keys))}")
    for key, expected_type in _FIELDS.items():
        if type(header[key]) is not expected_type:
            raise WireError("bad_header", f"{key} is not {expected_type.__name__}")
    if type(header.get("extra", {})) is not dict:
        raise WireError("bad_header", "extra is not a map")
    if not 0 <= header["checksum"] < 2**64:
        raise WireError("bad_header", "checksum out of range")
    if not 0 <= header["count"] <= MAX_INDEX:
        raise WireError("bad_header", "count out of range")
    if header["layout"] != (NO_LAYOUT if header["kind"] in CONTROL_KINDS else layout_hash):
        raise WireError("wrong_layout", excerpt(header["layout"]))
    if header["dtype"] != DTYPE:
        raise WireError("wrong_dtype", excerpt(header["dtype"]))


def _as_vector(payload: memoryview, into: torch.Tensor | None) -> torch.Tensor:
    if not payload:  # a control kind's (torch.frombuffer refuses an empty buffer)
        return torch.empty(0)
    if into is not None:
        np.copyto(into.numpy().reshape(-1), np.frombuffer(payload, dtype=np.float32))
        return into
    # A read-only source (bytes) must not be aliased by a tensor someone may write to.
    return torch.frombuffer(bytearray(payload) if payload.readonly else payload, dtype=torch.float32)
