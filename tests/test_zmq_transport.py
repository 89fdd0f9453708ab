"""ZmqTransport over real sockets on 127.0.0.1: exchange, deadlines, late and hostile messages,
CurveZMQ, and one peer in a separate OS process."""

import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import msgpack
import pytest
import torch
import zmq

import netns
from gossipfl.runtimes import stop_all
from gossipfl.transport import keys, wire
from gossipfl.transport.base import Message
from gossipfl.transport.limits import Limits
from gossipfl.transport.zmq import ZmqTransport
from zmq_helpers import DEADLINE, LAYOUT, SIZE, free_endpoints, model, network, raw, vector  # noqa: F401 (fixtures)

def exchange_step(transports, round_index, step):
    for t in transports:
        message = model(t.node_id, round_index, step, value=10 * t.node_id + step)
        for peer in t.peers:
            t.send(peer, message)
    return {t.node_id: t.receive("model", round_index, step, set(t.peers)) for t in transports}


def test_three_nodes_exchange_for_several_steps(network):
    transports = network(3)
    for round_index in range(2):
        for step in range(2):
            received = exchange_step(transports, round_index, step)
            for node, got in received.items():
                assert sorted(got) == sorted({0, 1, 2} - {node})
                for sender, message in got.items():
                    assert (message.sender, message.round, message.step) == (sender, round_index, step)
                    assert torch.equal(message.vector, vector(10 * sender + step))
    for t in transports:
        assert t.messages_sent == 8 and t.bytes_sent == 8 * SIZE * 4
        assert not t.rejected and not t.send_drops


def test_missing_neighbour_costs_one_deadline_then_late_message_is_dropped(network):
    a, b, c = network(3)
    b.send(0, model(1, 0, 0))
    start = time.monotonic()
    got = a.receive("model", 0, 0, {1, 2})
    elapsed = time.monotonic() - start
    assert sorted(got) == [1] and DEADLINE * 0.9 <= elapsed < DEADLINE + 0.25

    c.send(0, model(2, 0, 0))  # too late for step 0
    b.send(0, model(1, 0, 1))
    c.send(0, model(2, 0, 1))
    start = time.monotonic()
    got = a.receive("model", 0, 1, {1, 2})
    assert sorted(got) == [1, 2] and time.monotonic() - start < DEADLINE / 2
    a.receive("model", 0, 2, {1})  # nothing sent: drains whatever is still queued
    assert a.rejected == {"late": 1}


def test_future_steps_and_other_kinds_wait_for_their_receive(network):
    a, b = network(2)
    for step in range(3):
        b.send(0, model(1, 0, step, value=step))
    b.send(0, model(1, 0, 0, kind="pair_request"))
    start = time.monotonic()
    for step in range(3):
        got = a.receive("model", 0, step, {1})
        assert torch.equal(got[1].vector, vector(step))
    assert a.receive("pair_request", 0, 0, {1})[1].kind == "pair_request"
    assert time.monotonic() - start < DEADLINE and not a.rejected


def drain(transport, wait_s=0.3):
    """Let what was sent arrive, then take it in without a receive."""
    time.sleep(wait_s)
    transport.claimed_rounds()


def test_duplicates_and_buffer_overflow_are_counted(network):
    a, b, _ = network(3, limits=Limits(buffered_per_sender=1))
    b.send(0, model(1, 0, 0))
    assert 1 in a.receive("model", 0, 0, {1})  # b's connection is now the one a trusts for b
    step2 = model(1, 0, 2)
    b.send(0, step2)
    b.send(0, step2)  # the same message twice
    b.send(0, model(1, 0, 3))  # one future message more than the buffer holds
    drain(a)
    assert a.rejected == {"duplicate": 1, "buffer_full": 1}
    started = time.monotonic()
    assert a.receive("model", 0, 1, {1}) == {}  # b sent nothing for step 1 and has moved on:
    assert time.monotonic() - started < a.deadline_s / 2  # no use waiting out the deadline
    assert 1 in a.receive("model", 0, 2, {1})


def test_a_peer_that_was_not_asked_for_is_counted(network):
    a, _, c = network(3)
    c.send(0, model(2, 0, 0))  # c is a peer, but this receive asks only for b
    assert a.receive("model", 0, 0, {1}) == {}  # b sent nothing: one deadline
    assert a.rejected == {"unexpected_sender": 1}


def test_claimed_rounds_reveal_where_neighbours_are(network):
    a, b = network(2)
    assert a.claimed_rounds() == {}
    for round_index in (3, 5):
        b.send(0, model(1, round_index, 0))
    deadline = time.monotonic() + 5
    while a.claimed_rounds().get(1, -1) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.claimed_rounds() == {1: 5}
    assert 1 in a.receive("model", 5, 0, {1}) and a.rejected == {"late": 1}  # round 3 was skipped


def test_request_reply_between_two_peers(network):
    a, b = network(2)
    a.send(1, model(0, 5, 0, kind="pair_request"))
    request = b.receive("pair_request", 5, 0, {0})[0]
    b.send(0, Message("pair_reply", 1, request.round, request.step, request.vector + 1))
    reply = a.receive("pair_reply", 5, 0, {1})
    assert torch.equal(reply[1].vector, vector(1))


@pytest.mark.parametrize("sender_waits", [False, True], ids=["sender-trains", "sender-waits"])
def test_a_message_lost_to_a_connection_reset_is_resent_once_the_connection_is_back(tmp_path, sender_waits):
    """Node 0 reaches node 1 through tests/tcp_proxy.py, which swallows node 0's message and then
    resets the connection, as a dead NAT entry does. ZeroMQ reconnects but would not resend, and
    node 1 would wait its whole deadline; node 0 resends once its DEALER has reconnected, from the
    I/O thread while it trains, or from its own receive while it waits for node 1; only what node 1
    may still wait for."""
    a_end, b_end, proxy_end = free_endpoints(3)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen([sys.executable, str(netns.PROXY), f"{proxy_end[6:]}={b_end[6:]}"],
                                 stdout=out, stderr=subprocess.STDOUT)
    transports, waiting = [], None
    try:
        netns.wait_ready(log, proxy)
        a = ZmqTransport(0, a_end, {1: proxy_end}, LAYOUT, SIZE, deadline_s=10.0)
        transports.append(a)
        b = ZmqTransport(1, b_end, {0: a_end}, LAYOUT, SIZE, deadline_s=10.0)
        transports.append(b)
        a.send(1, model(0, 0, 0))
        assert sorted(b.receive("model", 0, 0, {0})) == [0]  # the link works
        b.send(0, model(1, 0, 1))  # node 1 is at step 1 now: node 0's step 0 is not awaited any more
        assert sorted(a.receive("model", 0, 1, {1})) == [1]
        proxy.send_signal(signal.SIGUSR1)
        netns.wait_ready(log, proxy, word="swallowing")
        a.send(1, model(0, 0, 1, value=7))
        time.sleep(0.2)  # it has left node 0, and the proxy swallowed it
        if sender_waits:
            waiting = threading.Thread(target=a.receive, args=("model", 0, 2, {1}))
            waiting.start()
            time.sleep(0.1)  # node 0's own thread reads its ROUTER now
        proxy.send_signal(signal.SIGUSR2)
        netns.wait_ready(log, proxy, word="reset")
        started = time.monotonic()
        got = b.receive("model", 0, 1, {0})
        assert sorted(got) == [0] and torch.equal(got[0].vector, vector(7))
        assert time.monotonic() - started < 3.0  # a reconnection (libzmq retries every 0.1 s), not the deadline
        assert a.resent == {1: 1} and set(b.rejected) <= {"connection_broken"}  # the reset, seen or not yet
        b.send(0, model(1, 0, 2))
    finally:
        if waiting is not None:
            waiting.join(timeout=15)  # its receive ends at node 1's message or at its deadline
        for transport in transports:
            transport.close()
        stop_all([proxy], grace=2.0)


def test_send_never_blocks_and_queues_at_most_hwm_for_a_dead_peer():
    own, dead = free_endpoints(2)
    t = ZmqTransport(0, own, {1: dead}, LAYOUT, SIZE, hwm=3)
    try:
        start = time.monotonic()
        for step in range(10):
            t.send(1, model(0, 0, step))
        assert time.monotonic() - start < 0.2
        assert t.messages_sent == 3 and t.send_drops[1] == 7
    finally:
        t.close()


def test_messages_sent_before_the_peer_starts_are_delivered():
    own, late = free_endpoints(2)
    t = ZmqTransport(0, own, {1: late}, LAYOUT, SIZE)
    try:
        t.send(1, model(0, 0, 0))
        time.sleep(0.2)
        peer = ZmqTransport(1, late, {0: own}, LAYOUT, SIZE, deadline_s=5)
        try:
            assert 0 in peer.receive("model", 0, 0, {0})
        finally:
            peer.close()
    finally:
        t.close()


def test_a_peer_that_stops_reading_costs_a_bounded_queue():
    size = 250_000  # 1 MB messages: kernel socket buffers hold only a few of them
    own, other = free_endpoints(2)
    a = ZmqTransport(0, own, {1: other}, LAYOUT, size, hwm=2)
    b = ZmqTransport(1, other, {0: own}, LAYOUT, size, hwm=2)
    try:
        message = Message("model", 0, 0, 0, torch.zeros(size))
        start = time.monotonic()
        for _ in range(100):  # b never receives
            a.send(1, message)
        assert time.monotonic() - start < 1
        assert a.messages_sent < 20 and a.messages_sent + a.send_drops[1] == 100
    finally:
        a.close()
        b.close()


def test_a_failed_construction_leaves_no_thread_behind(tmp_path):
    keys.write_keys(tmp_path, [0, 1])
    taken, peer = free_endpoints(2)
    first = ZmqTransport(0, taken, {1: peer}, LAYOUT, SIZE)
    threads = threading.active_count()
    try:
        with pytest.raises(zmq.ZMQError):
            ZmqTransport(1, taken, {0: peer}, LAYOUT, SIZE, curve=keys.load_keys(tmp_path, 1))
        assert threading.active_count() == threads
    finally:
        first.close()


def hostile_frames():
    """(frames, reason the receiver must count) sent by a raw DEALER."""
    valid = [bytes(f) for f in wire.encode(model(1, 0, 0), LAYOUT)]
    header = msgpack.unpackb(valid[0])
    nan = vector(1)
    nan[SIZE // 2] = float("nan")
    too_long = torch.zeros(SIZE + 1)
    return [
        ([b"garbage"], "bad_frames"),
        ([b"\xc1garbage", valid[1]], "bad_header"),
        ([msgpack.packb(header | {"version": 9}), valid[1]], "wrong_version"),
        ([msgpack.packb(header | {"layout": "another model!!!"}), valid[1]], "wrong_layout"),
        ([valid[0], valid[1][:-4] + b"\0\0\0\x40"], "bad_checksum"),  # a finite 2.0 where 1.0 was
        (wire.encode(Message("model", 1, 0, 0, nan), LAYOUT), "non_finite"),
        (wire.encode(Message("model", 1, 0, 0, too_long), LAYOUT), "oversized"),
        (wire.encode(model(7, 0, 0), LAYOUT), "unknown_sender"),
    ]


def test_hostile_frames_are_dropped_and_counted_while_valid_traffic_flows(network, raw):
    a, b = network(2)
    attacker = raw(a.endpoint)
    for frames, _ in hostile_frames():
        attacker.send_multipart(frames)
    # A frame beyond the ROUTER's MAXMSGSIZE: libzmq cuts that connection before buffering it.
    raw(a.endpoint).send_multipart([valid_header(), bytes(a.max_message_bytes + wire.MAX_HEADER_BYTES + 1)])
    b.send(0, model(1, 0, 0))
    assert torch.equal(a.receive("model", 0, 0, {1})[1].vector, vector(1))
    a.receive("model", 0, 1, {1})  # b is silent: waits one deadline and drains every queued frame
    expected = {reason: 1 for _, reason in hostile_frames()}
    # The MAXMSGSIZE cut counts as connection_broken when the watcher saw the connection before
    # libzmq closed it (it may live less than a millisecond).
    assert a.rejected - Counter(connection_broken=1) == expected

    b.send(0, model(1, 0, 2))
    assert 1 in a.receive("model", 0, 2, {1})


def valid_header():
    return bytes(wire.encode(model(1, 0, 0), LAYOUT)[0])


def test_curve_admits_listed_keys_only_and_binds_sender_to_key(network, raw, tmp_path):
    listing = keys.write_keys(tmp_path, [0, 1, 2])
    assert stat.S_IMODE((tmp_path / "node-0.secret").stat().st_mode) == 0o600
    configs = [keys.load_keys(tmp_path, node) for node in range(2)]
    assert keys.read_public_keys(listing)[1] == configs[1].public_key
    a, b = network(2, curve=configs)
    received = exchange_step([a, b], 0, 0)
    assert sorted(received[0]) == [1] and sorted(received[1]) == [0]

    intruder_keys = keys.generate_keypair()
    raw(a.endpoint, intruder_keys, configs[0].public_key).send_multipart(wire.encode(model(1, 0, 1), LAYOUT))
    raw(a.endpoint).send_multipart(wire.encode(model(1, 0, 1), LAYOUT))  # no CURVE at all
    node2 = keys.load_keys(tmp_path, 2)  # listed, but claims to be node 1
    raw(a.endpoint, (node2.public_key, node2.secret_key), configs[0].public_key).send_multipart(
        wire.encode(model(1, 0, 1), LAYOUT))
    assert a.receive("model", 0, 1, {1}) == {}
    assert a.rejected["unauthenticated"] >= 1 and a.rejected["spoofed_sender"] == 1
    assert set(a.rejected) == {"unauthenticated", "spoofed_sender"}


CHILD = textwrap.dedent("""
    import sys, torch
    from gossipfl.transport.base import Message
    from gossipfl.transport.zmq import ZmqTransport
    own, parent, layout, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    t = ZmqTransport(5, own, {0: parent}, layout, size, deadline_s=30)
    try:
        t.send(0, Message("model", 5, 0, 0, torch.arange(size, dtype=torch.float32)))
        reply = t.receive("pair_reply", 0, 0, {0})
        sys.exit(0 if reply and reply[0].vector.sum().item() == size else 3)
    finally:
        t.close()
""")


def test_peer_in_another_os_process():
    own, child = free_endpoints(2)
    t = ZmqTransport(0, own, {5: child}, LAYOUT, SIZE, deadline_s=30)
    process = subprocess.Popen([sys.executable, "-c", CHILD, child, own, LAYOUT, str(SIZE)])
    try:
        got = t.receive("model", 0, 0, {5})
        assert torch.equal(got[5].vector, torch.arange(SIZE, dtype=torch.float32))
        t.send(5, Message("pair_reply", 0, 0, 0, torch.ones(SIZE)))
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
        t.close()
