"""What a receiver keeps between its receive calls, and the rules that stop a peer from filling it.

Every message offered here has passed the codec and the sender checks, and is of a kind the
runtime consumes. It goes to the receive in progress if it is for that (kind, round, step);
otherwise it is kept for a later receive, within bounds a sender cannot stretch:

- a position already received, or before the current one, is late (`late`);
- one message per position and sender (`duplicate`);
- at most `rounds_ahead` rounds ahead of the receiver's current round (`too_far_ahead`);
- at most `per_sender` kept messages per sender, so one sender never displaces another's
  messages, and the current step's messages are never refused for space (`buffer_full`);
- none kept longer than `ttl_s` (`expired`).

It also keeps what messages tell about their senders. `claimed_rounds`: the newest round each
sender claimed, as data for a rejoin policy (a claim, not an order), counted over the
connection that sender is pinned to once it is pinned (see below): an impostor who claims a far
round for every neighbour of a running node must not make it skip rounds. And whether a missing
sender has moved past the current step: ZeroMQ keeps each connection in order, so a later
message over the connection that sender's last returned message came from proves its message
for this step is not coming; a claim over any other connection (an impostor's, or a restarted
peer's before one of its messages was returned) proves nothing, unless the connection is
authenticated as that sender (CurveZMQ), when the sender itself said it moved on.

Costs: `offer` is O(1); `begin` and `end` are linear in the kept messages and the senders.

Asynchronous gossip keeps less: `Latest` holds, per kind and sender, only the message that
arrived last.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .base import Message

Key = tuple[str, int, int]      # (kind, round, step)
Position = tuple[int, int]      # (round, step)


@dataclass
class _Kept:
    message: Message
    connection: bytes
    since: float


class Inbox:
    def __init__(self, per_sender: int, rounds_ahead: int, ttl_s: float, drop: Callable[[str, int], None],
                 clock: Callable[[], float] = time.monotonic):
        """`drop(reason, sender)` is called for every message refused or discarded."""
        self.per_sender, self.rounds_ahead, self.ttl_s = per_sender, rounds_ahead, ttl_s
        self._drop, self._clock = drop, clock
        self._kept: dict[Key, dict[int, _Kept]] = {}
        self._kept_by_sender: Counter[int] = Counter()
        self._done: dict[str, Position] = {}       # per kind, the newest position received
        self._round: int | None = None             # the newest receive's round: the window's base
        self._current: Key | None = None
        self._senders: Collection[int] = ()
        self._box: dict[int, _Kept] = {}           # the current receive's messages
        self._waiting: set[int] = set()            # expected senders neither arrived nor moved on
        self._pinned: dict[int, bytes] = {}        # sender -> connection of its last returned message
        self._passed: dict[tuple[str, int], Position] = {}  # (kind, sender) -> newest position over the pin
        self._claims: dict[int, int] = {}

    def begin(self, kind: str, round_index: int, step: int, senders: Collection[int]) -> None:
        """Start a receive: discard what is late, expired or now beyond the window, and take the
        kept messages for this step."""
        self._current, self._senders, self._round = (kind, round_index, step), senders, round_index
        now = self._clock()
        for key in list(self._kept):
            box = self._kept[key]
            for sender in list(box):
                reason = ("late" if self._is_late(key) else "too_far_ahead" if self._too_far(key[1])
                          else "expired" if now - box[sender].since > self.ttl_s else None)
                if reason:
                    self._unkeep(key, sender)
                    self._drop(reason, sender)
        self._box = self._kept.pop(self._current, {})
        for sender in self._box:
            self._kept_by_sender[sender] -= 1
        position = (round_index, step)
        self._waiting = {s for s in senders if s not in self._box and not self._moved_on(kind, s, position)}

    def complete(self) -> bool:
        """True when every expected sender's message arrived or cannot arrive any more."""
        return not self._waiting

    @property
    def waiting(self) -> set[int]:
        """The expected senders whose message neither arrived nor can arrive any more (read only)."""
        return self._waiting

    def offer(self, message: Message, connection: bytes, authenticated: bool = False) -> None:
        """Take one message that arrived over `connection` (its ROUTER routing id);
        `authenticated` when that connection's key belongs to the message's sender."""
        kind, sender, position = message.kind, message.sender, (message.round, message.step)
        key = (kind, *position)
        own = authenticated or connection == self._pinned.get(sender)  # the sender's own connection
        if own or sender not in self._pinned:  # a claim, over its own connection or while it has none
            self._claims[sender] = max(self._claims.get(sender, -1), message.round)
        current = self._current
        if own:
            self._passed[kind, sender] = max(self._passed.get((kind, sender), position), position)
            if current is not None and kind == current[0] and position > current[1:]:
                self._waiting.discard(sender)
        if key == current:
            if sender in self._box:
                return self._drop("duplicate", sender)
            self._box[sender] = _Kept(message, connection, 0.0)
            self._waiting.discard(sender)
        elif self._is_late(key):
            self._drop("late", sender)
        elif self._too_far(message.round):
            self._drop("too_far_ahead", sender)
        elif sender in self._kept.get(key, ()):
            self._drop("duplicate", sender)
        elif self._kept_by_sender[sender] >= self.per_sender:
            self._drop("buffer_full", sender)
        else:
            self._kept.setdefault(key, {})[sender] = _Kept(message, connection, self._clock())
            self._kept_by_sender[sender] += 1

    def end(self) -> dict[int, Message]:
        """Finish the receive: its messages from the expected senders, each sender now pinned to
        the connection its message came over."""
        kind, position = self._current[0], self._current[1:]
        self._done[kind] = max(self._done.get(kind, position), position)
        got = {}
        for sender, kept in self._box.items():
            if sender in self._senders:
                got[sender] = kept.message
                self._pin(sender, kept.connection)
            else:
                self._drop("unexpected_sender", sender)
        self._current, self._box, self._waiting = None, {}, set()
        return got

    def claimed_rounds(self) -> dict[int, int]:
        """Per sender, the newest round of any message it sent (kept, late or too far ahead) over
        its pinned connection, or over any while it has none (a node that just started or resumed)."""
        return dict(self._claims)

    def _pin(self, sender: int, connection: bytes) -> None:
        if self._pinned.get(sender) != connection:
            self._pinned[sender] = connection
            for key in [k for k in self._passed if k[1] == sender]:  # proofs over the old connection
                del self._passed[key]

    def _moved_on(self, kind: str, sender: int, position: Position) -> bool:
        return self._passed.get((kind, sender), position) > position

    def _is_late(self, key: Key) -> bool:
        kind, position, current = key[0], key[1:], self._current
        done = self._done.get(kind)
        return ((current is not None and kind == current[0] and position < current[1:])
                or (done is not None and position <= done))

    def _too_far(self, round_index: int) -> bool:
        return self._round is not None and round_index > self._round + self.rounds_ahead

    def _unkeep(self, key: Key, sender: int) -> None:
        box = self._kept[key]
        del box[sender]
        self._kept_by_sender[sender] -= 1
        if not box:
            del self._kept[key]


class Latest:
    """What asynchronous gossip keeps: per kind and sender, the message that arrived last.

    Newest by arrival, not by the round it claims: over one connection ZeroMQ keeps a sender's
    order, so the last to arrive is the last sent, and a claim of a far round (2**31 - 1, say)
    cannot pin the slot: the sender's next message replaces it. Rounds are not windowed, since
    nodes that train at their own pace are any number of rounds apart; a round matters only as
    a claim and as the staleness the merge weighs. Memory: one message per kind and sender, and
    senders are the transport's peers."""

    def __init__(self) -> None:
        self._newest: dict[str, dict[int, Message]] = {}
        self._claims: dict[int, int] = {}

    def offer(self, message: Message, connection: bytes, authenticated: bool = False) -> None:
        """Keep `message`, replacing the kept one of its kind and sender (the signature of `Inbox.offer`)."""
        self._claims[message.sender] = max(self._claims.get(message.sender, -1), message.round)
        self._newest.setdefault(message.kind, {})[message.sender] = message

    def take(self, kind: str) -> dict[int, Message]:
        """The kept messages of `kind`, by sender; they are no longer kept."""
        return self._newest.pop(kind, {})

    def claimed_rounds(self) -> dict[int, int]:
        return dict(self._claims)
