"""What a node knows of each neighbour's liveness, and so how long it waits for each.

Lock-step gossip (receives). A neighbour's delay is the time from the start of a receive to the
arrival of that neighbour's message for it (0 when it was there first). It includes how much
longer the neighbour's training takes than this node's, so a neighbour that is slow only because
it trains longer has a large but steady delay: the wait learns it and keeps waiting for it. The
wait for a neighbour is the slowest of its last DELAY_WINDOW delays plus `floor_s`, at most the
receive's ceiling (deploy.deadline_s), and the ceiling while nothing is known. The window adapts
at once to a slower neighbour and forgets a start-up within two rounds (TCP's smoothed estimate,
RFC 6298, took five rounds to forget one in a replay of a start-up, and follows a periodic delay,
long after training and short between steps, less closely).

Messages that arrive after their receive gave up are measured too, since the transport stamps
every arrival: a wait that was too short grows at once instead of turning into suspicion. So a
miss is a receive that waited for the neighbour and heard nothing from it that could have been
waited for: a message for that receive or a later one, or a late one within the ceiling. After
`suspect_after` consecutive misses the neighbour is suspected and no longer waited for; its
messages are still taken while a receive runs, and the next one that could have been waited for
readmits it. A message later than the ceiling says only that the neighbour is alive but slower
than this node waits: it is heard, and does not readmit (else such a neighbour would cost a
ceiling at every step). A neighbour's very first message carries its start-up (importing torch,
loading data), not its usual delay, and is not measured.

Asynchronous gossip (drains). Nothing waits; a neighbour's delay is the gap between two of its
messages, and its misses are the waits (gap plus floor) that passed since its last message.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

DELAY_WINDOW = 8        # delays remembered per neighbour: two rounds of four gossip steps
KEPT_RECEIVES = 64      # receive starts remembered, to measure messages that come late
ALIVE, SUSPECTED = "alive", "suspected"

Key = tuple[str, int, int]  # (kind, round, step)


@dataclass(frozen=True)
class Detection:
    """How a transport judges its neighbours. With `enabled` False every receive waits its
    ceiling for every neighbour, and nobody is suspected (states are still reported)."""
    enabled: bool = True
    floor_s: float = 1.0        # the least wait beyond a neighbour's usual delay (TCP's least timeout is 1 s)
    suspect_after: int = 2      # consecutive misses before a neighbour is no longer waited for

    def __post_init__(self) -> None:
        if not self.floor_s > 0:
            raise ValueError(f"floor_s = {self.floor_s} must be > 0")
        if self.suspect_after < 1:
            raise ValueError(f"suspect_after = {self.suspect_after} must be >= 1")


@dataclass
class _Peer:
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=DELAY_WINDOW))
    misses: int = 0
    suspected: bool = False
    heard_at: float | None = None   # its last message of any kind
    alive_at: float | None = None   # its last message that could have been waited for
    measured: bool = False          # its first measurable message was skipped (start-up)


@dataclass
class _Receive:
    start: float
    ceiling: float
    arrived: dict[int, float] = field(default_factory=dict)   # first arrival per sender while it ran
    measured: set[int] = field(default_factory=set)           # senders whose delay was taken


class Liveness:
    """Per-neighbour state for one transport. Not thread-safe: the transport calls it under its lock."""

    def __init__(self, peers: Iterable[int], detection: Detection = Detection(), asynchronous: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.detection, self.asynchronous, self._clock = detection, asynchronous, clock
        self._peers = {peer: _Peer() for peer in peers}
        self._started = clock()
        self._receives: OrderedDict[Key, _Receive] = OrderedDict()
        self._current: Key | None = None
        self._newest: dict[str, tuple[int, int]] = {}  # per kind, the newest position a receive began

    # --- what arrives ---

    def heard(self, sender: int, key: Key, at: float) -> None:
        """A message from `sender` for position `key` passed the codec and the sender checks at `at`."""
        peer = self._peers[sender]
        previous, peer.heard_at = peer.heard_at, at
        if self.asynchronous:
            if previous is not None:
                self._measure(peer, at - previous)
            return self._alive(peer, at)
        receive = self._receives.get(key)
        if key == self._current:
            receive.arrived.setdefault(sender, at)
            self._alive(peer, at)
        elif receive is not None:  # it comes after its receive ended
            if at - receive.start <= receive.ceiling:
                if sender not in receive.measured:
                    receive.measured.add(sender)
                    self._measure(peer, at - receive.start)
                self._alive(peer, at)
        elif key[1:] > self._newest.get(key[0], (-1, -1)):  # for a receive still to come
            self._alive(peer, at)

    # --- lock-step receives ---

    def begin(self, key: Key, ceiling: float) -> float:
        """A receive for `key` starts now, waiting at most `ceiling`; returns its start time."""
        start = self._clock()
        self._receives[key] = _Receive(start, ceiling)
        self._receives.move_to_end(key)
        while len(self._receives) > KEPT_RECEIVES:
            self._receives.popitem(last=False)
        self._current = key
        self._newest[key[0]] = max(self._newest.get(key[0], key[1:]), key[1:])
        return start

    def waits_for(self, sender: int) -> bool:
        return not (self.detection.enabled and self._peers[sender].suspected)

    def timeout(self, sender: int, ceiling: float) -> float:
        """How long after a receive's start this node waits for `sender`."""
        delays = self._peers[sender].delays
        if not self.detection.enabled or not delays:
            return ceiling
        return min(ceiling, max(delays) + self.detection.floor_s)

    def end(self, got: Collection[int], expected: Collection[int]) -> None:
        """The receive in progress returned `got` of the `expected` senders."""
        receive = self._receives[self._current]
        for sender in got:
            if sender in self._peers and sender not in receive.measured:
                receive.measured.add(sender)
                self._measure(self._peers[sender], max(0.0, receive.arrived.get(sender, receive.start) - receive.start))
        for sender in expected:
            peer = self._peers.get(sender)
            if peer is None or sender in got or (peer.alive_at is not None and peer.alive_at >= receive.start):
                continue
            peer.misses += 1
            peer.suspected = peer.misses >= self.detection.suspect_after
        self._current = None

    # --- reporting ---

    def snapshot(self, ceiling: float) -> dict[int, dict[str, Any]]:
        """Per neighbour: state (alive or suspected), delay_s (the slowest recent delay; in async
        mode the gap between messages), wait_s (how long it is waited for now, given `ceiling`),
        misses, and heard_s_ago (since its last message of any kind); None where unknown."""
        now = self._clock()
        if self.asynchronous:
            self._count_silence(now, ceiling)
        return {sender: {"state": SUSPECTED if peer.suspected and self.detection.enabled else ALIVE,
                         "delay_s": max(peer.delays) if peer.delays else None,
                         "wait_s": self.timeout(sender, ceiling),
                         "misses": peer.misses,
                         "heard_s_ago": None if peer.heard_at is None else now - peer.heard_at}
                for sender, peer in self._peers.items()}

    def drained(self, ceiling: float) -> None:
        """Asynchronous gossip: a drain happened; bring misses and suspicion up to date."""
        self._count_silence(self._clock(), ceiling)

    # --- internals ---

    def _measure(self, peer: _Peer, delay: float) -> None:
        if peer.measured:
            peer.delays.append(delay)
        peer.measured = True

    def _alive(self, peer: _Peer, at: float) -> None:
        peer.alive_at, peer.misses, peer.suspected = at, 0, False

    def _count_silence(self, now: float, ceiling: float) -> None:
        """Misses in async mode: the waits that passed since the neighbour's last message (since
        this transport started, for one never heard)."""
        for sender, peer in self._peers.items():
            since = peer.alive_at if peer.alive_at is not None else self._started
            peer.misses = int((now - since) // self.timeout(sender, ceiling))
            peer.suspected = peer.misses >= self.detection.suspect_after


def as_document(table: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A liveness table with string keys, as JSON and the wire's header maps require."""
    return {str(sender): row for sender, row in sorted(table.items())}

