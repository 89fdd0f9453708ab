"""Hostile peers against one ZmqTransport on 127.0.0.1: each attack that once crashed, stalled or
cut off a node, then the honest neighbours' messages, which must still arrive at their usual
latency (well within a deadline), with the attack's drops counted under their own reason."""

import ctypes
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
import torch

from gossipfl.transport import keys, wire
from gossipfl.transport.limits import Limits
from gossipfl.transport.wire import MAX_INDEX
from zmq_helpers import DEADLINE, LAYOUT, model, network, raw, vector  # noqa: F401 (fixtures)
from zmtp import zmtp_connect, zmtp_frame

FAST = DEADLINE / 2  # an honest message must arrive well within this


def honest_steps(receiver, sender, round_index, steps, size=None):
    """`sender` sends and `receiver` receives these steps one by one; asserts each is fast."""
    for step in steps:
        message = model(sender.node_id, round_index, step, value=step, **({"size": size} if size else {}))
        started = time.monotonic()
        sender.send(receiver.node_id, message)
        got = receiver.receive("model", round_index, step, {sender.node_id})
        assert time.monotonic() - started < FAST, f"step {step} paid a deadline"
        assert torch.equal(got[sender.node_id].vector, message.vector)


def settle(transport, spell_s=0.3):
    """Take in, without a receive, everything sent so far: libzmq refills the ROUTER's queue
    (a high-water mark of a few messages) from the kernel in the background."""
    until = time.monotonic() + spell_s
    while time.monotonic() < until:
        transport.claimed_rounds()
        time.sleep(0.01)


def header_with(**changes):
    return msgpack.packb(msgpack.unpackb(wire.encode(model(1, 0, 1), LAYOUT)[0]) | changes)


def spoofed(sender, round_index, step, kind="model"):
    message = model(sender, round_index, step, kind=kind)
    if kind in wire.CONTROL_KINDS:
        message = wire.Message(kind, sender, round_index, step, torch.empty(0))
    return wire.encode(message, LAYOUT)


def test_hostile_headers_are_counted_and_logged_in_bounded_lines(network, raw, caplog):
    a, b = network(2)
    honest_steps(a, b, 0, [0])
    nested = []
    for _ in range(1000):
        nested = [nested]
    payload = bytes(wire.encode(model(1, 0, 1), LAYOUT)[1])
    attacker = raw(a.endpoint)
    attacker.send_multipart([header_with(version=nested), payload])     # once a RecursionError
    attacker.send_multipart([header_with(extra={"x": {"y": [[[[[[1]]]]]]}}), payload])  # nested 10 deep
    attacker.send_multipart([header_with(layout="L" * 60_000), payload])  # once logged whole
    with caplog.at_level(logging.WARNING, logger="gossipfl.transport"):
        honest_steps(a, b, 0, [1, 2])
        settle(a)
    assert a.rejected == {"wrong_version": 1, "bad_header": 1, "wrong_layout": 1}
    assert caplog.records and all(len(r.getMessage()) < 300 for r in caplog.records)


def test_an_exception_inside_admission_costs_that_message_only(network, monkeypatch):
    a, b = network(2)
    offer = a._inbox.offer
    failures = iter([True])

    def failing_once(*args, **kwargs):
        if next(failures, False):
            raise KeyError("a bug reached by a message")
        offer(*args, **kwargs)

    monkeypatch.setattr(a._inbox, "offer", failing_once)
    b.send(0, model(1, 0, 0))
    assert a.receive("model", 0, 0, {1}) == {}  # that message was lost to the bug: one deadline
    assert a.rejected == {"internal_error": 1}
    honest_steps(a, b, 0, [1, 2])


def test_kinds_nobody_consumes_are_dropped_at_once(network, raw):
    """Eight spoofed pings once filled the buffer for good and cut the node off."""
    a, b = network(2, kinds={"model"})
    attacker = raw(a.endpoint)
    for i in range(8):
        attacker.send_multipart(spoofed(1, 10**6 + i, 0, kind="ping"))
        attacker.send_multipart(spoofed(1, 10**6 + i, 0, kind="pair_request"))
    honest_steps(a, b, 0, range(4))
    settle(a)
    assert a.rejected == {"unexpected_kind": 16}
    assert a.claimed_rounds() == {1: 0}  # a kind nobody consumes claims nothing
    with pytest.raises(ValueError):
        a.receive("pair_request", 0, 0, {1})


def test_far_future_messages_are_refused_and_an_impostors_round_is_no_claim(network, raw):
    """One spoofed message for round 2**31 - 1 once made a node jump there; spoofed claims for
    every neighbour, over another connection than theirs, later made a node skip rounds."""
    a, b = network(2)
    honest_steps(a, b, 0, [0])
    raw(a.endpoint).send_multipart(spoofed(1, MAX_INDEX, 0))
    raw(a.endpoint).send_multipart(spoofed(7, 99, 0))  # not a neighbour: no claim
    raw(a.endpoint).send_multipart([b"junk", b""])       # not a message: no claim
    honest_steps(a, b, 0, [1, 2])
    settle(a)
    assert a.rejected == {"too_far_ahead": 1, "unknown_sender": 1, "bad_header": 1}
    assert a.claimed_rounds() == {1: 0}  # node 1 is pinned to its own connection, which claims round 0


def test_one_sender_cannot_crowd_out_another(network, raw):
    """A flood of near-future messages claiming to be node 2 fills node 2's share only."""
    a, b, _ = network(3, limits=Limits(buffered_per_sender=2))
    attacker = raw(a.endpoint)
    for step in range(1, 7):
        attacker.send_multipart(spoofed(2, 0, step))
    for step in (1, 2):  # b runs two steps ahead: its messages must be kept
        b.send(0, model(1, 0, step, value=step))
    settle(a)
    assert a.rejected == {"buffer_full": 4}
    for step in (1, 2):
        started = time.monotonic()
        got = a.receive("model", 0, step, {1})
        assert time.monotonic() - started < FAST and torch.equal(got[1].vector, vector(step))


def test_kept_messages_expire(network, raw):
    a, b = network(2, limits=Limits(buffer_ttl_s=0.2))
    raw(a.endpoint).send_multipart(spoofed(1, 0, 5))
    settle(a, 0.1)  # taken in and kept
    time.sleep(0.2)
    honest_steps(a, b, 0, [0])
    assert a.rejected == {"expired": 1}


def test_a_spoofed_later_message_does_not_cut_a_receive_short(network, raw):
    """A receive stops waiting for a sender only on a later message over that sender's own
    connection; a claim from another connection once made the real message count as late."""
    a, b = network(2)
    honest_steps(a, b, 0, [0])  # pins node 1 to b's connection
    raw(a.endpoint).send_multipart(spoofed(1, 0, 5))
    time.sleep(0.05)
    threading.Timer(0.1, b.send, (0, model(1, 0, 1))).start()
    started = time.monotonic()
    got = a.receive("model", 0, 1, {1})
    assert 1 in got and 0.08 < time.monotonic() - started < FAST
    assert not a.rejected

    # b's own later message does end the wait: its connection is the pinned one.
    b.send(0, model(1, 0, 3))
    started = time.monotonic()
    assert a.receive("model", 0, 2, {1}) == {} and time.monotonic() - started < FAST


@pytest.mark.parametrize("with_keys", [False, True])
def test_a_fresh_receiver_trusts_a_later_message_only_from_an_authenticated_sender(network, tmp_path, with_keys):
    """A node that has returned nothing from a sender yet (it just started or resumed) has no
    pinned connection: without keys it waits out the deadline; with keys the sender's own later
    message ends the wait."""
    curve = None
    if with_keys:
        keys.write_keys(tmp_path, [0, 1])
        curve = [keys.load_keys(tmp_path, node) for node in (0, 1)]
    a, b = network(2, curve=curve)
    b.send(0, model(1, 0, 1))  # b is already past step 0
    time.sleep(0.1)
    started = time.monotonic()
    assert a.receive("model", 0, 0, {1}) == {}
    elapsed = time.monotonic() - started
    assert elapsed < FAST if with_keys else elapsed > 0.9 * DEADLINE


def test_a_restarted_peer_is_accepted_over_its_new_connection(network):
    a, b = network(2)
    honest_steps(a, b, 0, [0])
    endpoint, peers = b.endpoint, b.peers
    b.close()
    restarted = type(b)(1, endpoint, peers, LAYOUT, b.vector_size, deadline_s=DEADLINE)
    try:
        honest_steps(a, restarted, 0, [1, 2])
    finally:
        restarted.close()


def test_a_flooding_connection_is_limited_before_decoding(network, raw, monkeypatch):
    a, b, _ = network(3)
    decoded = []
    decode = wire.decode
    monkeypatch.setattr(wire, "decode", lambda *args, **kw: decoded.append(1) or decode(*args, **kw))
    attacker = raw(a.endpoint)
    attacker.sndhwm = 0  # queue all of them at once
    frames = spoofed(2, 0, 1)
    for _ in range(2000):
        attacker.send_multipart(frames)
    time.sleep(0.2)
    honest_steps(a, b, 0, range(3))
    settle(a)
    burst = a.limits.burst
    assert a.rejected["rate_limited"] >= 2000 - burst - 3
    assert len(decoded) <= burst + 3 + 3  # the attacker's allowance, plus b's three messages
    honest_steps(a, b, 0, range(3, 6))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocated_mb():
    """Memory the process holds in use from malloc (heap and mmapped blocks), not counting freed
    memory that glibc keeps for reuse (as it does after reuse_large_allocations, which `gossipfl
    simulate` sets for the whole process, in-process CLI tests included)."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def test_a_message_that_never_ends_is_cut_off_with_bounded_memory(network):
    """400 frames of 1 MiB with the MORE flag once grew a node by 356 MB, never released."""
    size = 250_000  # 1 MB models: frames of 1 MiB pass MAXMSGSIZE
    a, b = network(2, size=size)
    honest_steps(a, b, 0, [0], size=size)
    before = allocated_mb()
    attacker = zmtp_connect(a.endpoint)
    outcome = {}

    def stream():  # 1,000 MiB, were nothing to stop it
        frame = zmtp_frame(bytes(1 << 20), more=True)
        try:
            for sent in range(1000):
                attacker.sendall(frame)
            outcome["sent"] = 1000
        except OSError:
            outcome["cut_after"] = sent

    sender = threading.Thread(target=stream)
    sender.start()
    peak = before
    while sender.is_alive():
        peak = max(peak, allocated_mb())
        time.sleep(0.005)
    sender.join()
    attacker.close()
    # Cut after the cap (6.3 MB here) plus what arrives before the watcher's next check (50 ms
    # at most: some 50 MB at loopback speed; measured 29 to 62 MiB in all).
    assert "cut_after" in outcome and outcome["cut_after"] < 300
    honest_steps(a, b, 0, [1, 2], size=size)
    assert a.rejected == {"connection_memory": 1}
    assert peak - before < 300 and allocated_mb() - before < 30  # unbounded: 1,000 MB, never released


FLOOD = textwrap.dedent("""
    import resource, socket, sys, time
    sys.path.insert(0, sys.argv[3])
    from zmtp import zmtp_connect
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    endpoint, n = sys.argv[1], int(sys.argv[2])
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    held = []
    for i in range(n):  # half bare TCP, half handshaken ZMTP peers that then say nothing
        held.append(zmtp_connect(endpoint) if i % 2 else socket.create_connection((host, int(port))))
    print(len(held), flush=True)
    time.sleep(60)
""")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_a_connection_flood_is_evicted_and_fds_stay_bounded(network):
    """1,108 idle connections once exhausted the usual limit of 1,024 open files."""
    cap = 40
    a, b = network(2, limits=Limits(max_connections=cap, max_connections_per_address=10_000))
    honest_steps(a, b, 0, [0])  # b's connection has delivered: it is protected
    before = open_fds()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, a.endpoint, "1200", os.path.dirname(__file__)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().strip() == "1200"
        time.sleep(0.5)  # let the watcher catch up with the accepts
        honest_steps(a, b, 0, range(1, 4))
        assert open_fds() - before <= 2 * cap + 10
        a.claimed_rounds()
        assert a.rejected["connection_evicted"] >= 1200 - cap
        assert set(a.rejected) == {"connection_evicted"}
    finally:
        flood.kill()
        flood.wait()
    honest_steps(a, b, 0, range(4, 6))


def test_a_connection_that_never_sends_a_valid_message_is_closed(network):
    a, b = network(2, limits=Limits(idle_timeout_s=0.3))
    silent = zmtp_connect(a.endpoint)
    silent.settimeout(5)
    try:
        honest_steps(a, b, 0, [0])
        time.sleep(0.4)
        a.receive("model", 0, 1, {1})  # nothing queued: the watcher may now judge idleness
        while silent.recv(1 << 16):  # the greeting, then the end of the stream
            pass
        a.claimed_rounds()
        assert a.rejected == {"connection_idle": 1}
        honest_steps(a, b, 0, [2, 3])  # b's connection delivered valid messages: kept
    finally:
        silent.close()


def wait_until_watched(transport, peer, timeout_s=5):
    """Until the transport's watcher has taken in the accept of `peer`'s connection."""
    address = peer.getsockname()
    until = time.monotonic() + timeout_s
    while not any(r.sock and r.sock.getpeername() == address for r in list(transport._connections._by_fd.values())):
        assert time.monotonic() < until, "the watcher never saw the connection"
        time.sleep(0.01)


def test_a_connection_libzmq_drops_is_counted(network):
    a, b = network(2)
    peer = zmtp_connect(a.endpoint)
    peer.settimeout(5)
    try:
        honest_steps(a, b, 0, [0])
        wait_until_watched(a, peer)
        peer.sendall(b"\x02" + (1 << 40).to_bytes(8, "big"))  # announces a frame far over MAXMSGSIZE
        while peer.recv(1 << 16):  # the greeting, then the end of the stream
            pass
        time.sleep(0.1)
        a.claimed_rounds()
        assert a.rejected == {"connection_broken": 1}
        honest_steps(a, b, 0, [1, 2])
    finally:
        peer.close()
