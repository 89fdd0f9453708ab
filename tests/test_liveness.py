"""Failure detection, adaptive deadlines, asynchronous drain and status queries: the rules of
`liveness.Liveness` on a made-up clock, then ZmqTransport over real sockets on 127.0.0.1."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from gossipfl.transport.liveness import Detection, Liveness
from gossipfl.transport.status import query_status
from gossipfl.transport.wire import MAX_INDEX
from gossipfl.transport.zmq import ZmqTransport
from zmq_helpers import LAYOUT, SIZE, free_endpoints, model, network  # noqa: F401 (fixture)

CEILING = 1.0
FLOOR = 0.05


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def step(live, clock, key, got, expected=(1,), delay=0.0):
    """One receive of `key` in which the senders in `got` arrive `delay` after its start."""
    clock.now += 0.01
    start = live.begin(key, CEILING)
    clock.now += delay
    for sender in got:
        live.heard(sender, key, clock.now)
    live.end(got, expected)
    return start


def test_the_wait_is_the_ceiling_until_a_delay_is_known_then_the_slowest_recent_delay_plus_the_floor():
    clock = Clock()
    live = Liveness([1], Detection(floor_s=FLOOR), clock=clock)
    assert live.timeout(1, CEILING) == CEILING
    step(live, clock, ("model", 0, 0), [1], delay=0.5)  # the first message carries start-up: not measured
    assert live.timeout(1, CEILING) == CEILING
    step(live, clock, ("model", 0, 1), [1], delay=0.2)
    step(live, clock, ("model", 0, 2), [1], delay=0.1)
    assert live.timeout(1, CEILING) == pytest.approx(0.2 + FLOOR)
    for s in range(3, 11):  # eight quick steps push the slow one out of the window
        step(live, clock, ("model", 0, s), [1], delay=0.01)
    assert live.timeout(1, CEILING) == pytest.approx(0.01 + FLOOR)
    step(live, clock, ("model", 1, 0), [1], delay=5.0)
    assert live.timeout(1, CEILING) == CEILING  # never above the ceiling


def test_two_silent_receives_suspect_a_neighbour_and_its_next_timely_message_readmits_it():
    clock = Clock()
    live = Liveness([1, 2], Detection(floor_s=FLOOR, suspect_after=2), clock=clock)
    step(live, clock, ("model", 0, 0), [1, 2], expected=(1, 2))
    step(live, clock, ("model", 0, 1), [2], expected=(1, 2))
    assert live.waits_for(1) and live.snapshot(CEILING)[1]["misses"] == 1
    step(live, clock, ("model", 0, 2), [2], expected=(1, 2))
    assert not live.waits_for(1) and live.snapshot(CEILING)[1]["state"] == "suspected"
    assert live.waits_for(2)
    live.heard(1, ("model", 0, 4), clock.now)  # for a receive still to come
    assert live.waits_for(1) and live.snapshot(CEILING)[1] | {"heard_s_ago": 0} == {
        "state": "alive", "delay_s": None, "wait_s": CEILING, "misses": 0, "heard_s_ago": 0}


def test_a_late_message_within_the_ceiling_is_measured_and_readmits_one_later_than_that_does_not():
    clock = Clock()
    live = Liveness([1], Detection(floor_s=FLOOR, suspect_after=1), clock=clock)
    step(live, clock, ("model", 0, 0), [1])
    step(live, clock, ("model", 0, 1), [])
    start = step(live, clock, ("model", 0, 2), [])
    assert not live.waits_for(1)
    clock.now = start + 0.6
    live.heard(1, ("model", 0, 2), clock.now)  # its message came 0.6 s after that receive began
    assert live.waits_for(1) and live.timeout(1, CEILING) == pytest.approx(0.6 + FLOOR)
    step(live, clock, ("model", 0, 3), [])
    clock.now += 2
    live.heard(1, ("model", 0, 3), clock.now)  # 2 s late: alive, but slower than this node waits
    assert not live.waits_for(1) and live.snapshot(CEILING)[1]["heard_s_ago"] == 0


def test_a_disabled_detector_waits_the_ceiling_and_suspects_nobody():
    clock = Clock()
    live = Liveness([1], Detection(enabled=False), clock=clock)
    for s in range(5):
        step(live, clock, ("model", 0, s), [])
    assert live.waits_for(1) and live.timeout(1, CEILING) == CEILING
    assert live.snapshot(CEILING)[1]["state"] == "alive" and live.snapshot(CEILING)[1]["misses"] == 5


def test_asynchronous_misses_count_the_waits_that_passed_in_silence():
    clock = Clock()
    live = Liveness([1], Detection(floor_s=FLOOR, suspect_after=2), asynchronous=True, clock=clock)
    for _ in range(4):  # a message every 0.2 s; the first gap is start-up and not measured
        clock.now += 0.2
        live.heard(1, ("model", 0, 0), clock.now)
    assert live.timeout(1, CEILING) == pytest.approx(0.2 + FLOOR)
    clock.now += 0.3
    live.drained(CEILING)
    assert live.snapshot(CEILING)[1]["misses"] == 1 and live.waits_for(1)
    clock.now += 0.3
    assert live.snapshot(CEILING)[1]["state"] == "suspected"
    live.heard(1, ("model", 9, 0), clock.now)
    assert live.snapshot(CEILING)[1]["state"] == "alive"


# --- over real sockets ---

DEADLINE = 0.5
FAST = 0.15  # a step that waits for nobody


def broadcast(transports, round_index, step):
    for t in transports:
        message = model(t.node_id, round_index, step)
        for peer in t.peers:
            if peer == 0:
                t.send(0, message)


def test_a_neighbour_that_stops_costs_at_most_two_deadlines_and_is_readmitted_when_it_sends(network):
    a, b, c = network(3, detection=Detection(floor_s=FLOOR))
    for t in (a, b, c):
        t.deadline_s = DEADLINE
    for s in range(5):
        broadcast([b, c], 0, s)
        assert sorted(a.receive("model", 0, s, {1, 2})) == [1, 2]
    started = time.monotonic()
    for s in range(5, 25):  # c stopped: twenty steps with b alone
        broadcast([b], 0, s)
        assert sorted(a.receive("model", 0, s, {1, 2})) == [1]
    assert time.monotonic() - started < 2 * DEADLINE + 20 * FAST / 3  # without detection: 20 deadlines
    state = a.liveness()
    assert state[2]["state"] == "suspected" and state[2]["misses"] == 20 and state[1]["state"] == "alive"
    broadcast([b, c], 0, 25)  # c is back: not waited for yet, but its message readmits it
    a.receive("model", 0, 25, {1, 2})
    deadline = time.monotonic() + 5
    while a.liveness()[2]["state"] != "alive":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert a.liveness()[2]["misses"] == 0
    broadcast([b, c], 0, 26)
    assert sorted(a.receive("model", 0, 26, {1, 2})) == [1, 2]


def test_a_slow_neighbour_that_always_comes_late_within_the_ceiling_keeps_being_waited_for(network):
    a, b, c = network(3, detection=Detection(floor_s=0.2))
    a.deadline_s = 1.5
    lateness = 0.3
    merged = []
    for s in range(8):
        broadcast([b], 0, s)  # b at once, c 0.3 s after a starts waiting
        timer = threading.Timer(lateness, c.send, (0, model(2, 0, s)))
        started = time.monotonic()
        timer.start()
        got = a.receive("model", 0, s, {1, 2})
        elapsed = time.monotonic() - started
        timer.join()
        merged.append(2 in got)
        assert elapsed >= lateness * 0.9 or 2 not in got
        assert a.liveness()[2]["state"] == "alive"
    assert sum(merged) >= 6, merged  # a miss now and then (a late timer) is measured, not suspected
    assert lateness <= a.liveness()[2]["wait_s"] < 1.5  # learnt: below the ceiling, above its delay


def test_drain_returns_the_newest_message_per_sender_and_never_waits(network):
    a, b, c = network(3, asynchronous=True, kinds={"model"})
    started = time.monotonic()
    assert a.drain("model") == {} and time.monotonic() - started < 0.05
    b.send(0, model(1, MAX_INDEX, 0))  # a far round claimed does not pin b's slot
    for r in range(3):
        b.send(0, model(1, r, 0, value=r))
    c.send(0, model(2, 7, 0))
    deadline = time.monotonic() + 5
    while a.claimed_rounds().get(2) != 7 or a.claimed_rounds().get(1) != MAX_INDEX:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    got = a.drain("model")
    assert sorted(got) == [1, 2] and (got[1].round, got[2].round) == (2, 7)
    assert torch.equal(got[1].vector, torch.full((SIZE,), 2.0))
    assert a.drain("model") == {}  # taken: nothing new since
    with pytest.raises(ValueError):
        a.receive("model", 0, 0, {1})


def test_a_neighbour_faster_than_the_drains_is_not_rate_limited(network):
    a, b = network(2, asynchronous=True, kinds={"model"})
    for drain in range(4):  # 40 messages between 4 drains: more than the burst of 16
        for i in range(10):
            b.send(0, model(1, 10 * drain + i, 0))
            time.sleep(0.005)  # within b's queue of 4
        time.sleep(0.1)
        assert a.drain("model")[1].round == 10 * drain + 9
    assert not a.rejected


BUSY_NODE = textwrap.dedent("""
    import sys, time
    from gossipfl.transport.zmq import ZmqTransport
    own, peer, layout = sys.argv[1], sys.argv[2], sys.argv[3]
    t = ZmqTransport(4, own, {9: peer}, layout, 10)
    t.set_status(lambda: {"round": 7, "accuracy": 0.5})
    print("ready", flush=True)
    until = time.monotonic() + 4
    n = 0
    while time.monotonic() < until:  # "training": pure Python, holding the interpreter lock
        n += 1
    t.close()
""")


def test_a_status_query_is_answered_while_the_node_is_busy():
    own, peer = free_endpoints(2)
    node = subprocess.Popen([sys.executable, "-c", BUSY_NODE, own, peer, LAYOUT], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().strip() == "ready"
        started = time.monotonic()
        answers = query_status({4: own, 5: peer}, timeout_s=1.0)  # nobody listens at the peer's address
        assert time.monotonic() - started < 1.5 and node.poll() is None
        assert answers[5] is None
        assert answers[4] == {"round": 7, "accuracy": 0.5, "node": 4, "rejected": {},
                              "liveness": {"9": {"state": "alive", "delay_s": None, "wait_s": 5.0, "misses": 0,
                                                 "heard_s_ago": None}}}
    finally:
        node.kill()
        node.wait()


def test_a_status_callback_that_fails_is_reported_not_fatal(network):
    a, _ = network(2)
    a.set_status(lambda: 1 / 0)
    assert query_status({0: a.endpoint}, 2.0)[0]["error"] == "the status callback failed: ZeroDivisionError"
    a.set_status(lambda: {"bad key": {1: 2}})  # a map key the wire does not carry
    assert "cannot be sent" in query_status({0: a.endpoint}, 2.0)[0]["error"]
