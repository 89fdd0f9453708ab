"""MoDeST decentralized sampling (de Vos et al. 2023): who trains and who aggregates each round,
decided by every node alone from its own view of the population.

A view holds, per peer, the last round it was seen active and its newest membership record (a
counter the peer increments at each change, and whether it joined or left). Views travel with
every model (the message header's `extra` map) and merge on receipt: the max of last-active, the
record with the higher counter. Joins a node hears of wait in `pending` until its next flush, so
a node that just joined is not sampled before everyone may know of it. A peer silent for
`inactivity` rounds, or whose newest record is a leave, is no candidate.

order(r) sorts the candidates by md5 of "<id>-<r>"; the sample of round r is the first s of them
that answer a ping, and the aggregators of round r are the first a of order(r + 1) that answer
(they belong to the next sample): equal views give equal samples, with no coordinator. An
aggregator merges once ceil(sf * s) trained models of its round arrived; a newer round resets it
and older rounds are ignored.

Everything here is pure bookkeeping over plain dicts of ints (JSON- and msgpack-safe); runtimes
decide how pings and models travel.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

SAMPLING_KINDS = ("none", "modest", "fedavg")


@dataclass
class View:
    """One node's view of the population: last_active[peer] = round, records[peer] = (counter,
    joined). `pending` holds joins heard of but not applied before the next flush."""
    last_active: dict[int, int] = field(default_factory=dict)
    records: dict[int, tuple[int, bool]] = field(default_factory=dict)
    pending: dict[int, tuple[int, int, bool]] = field(default_factory=dict)  # peer -> (round, counter, joined)

    @classmethod
    def of_members(cls, members: Iterable[int]) -> "View":
        """The view every initial member starts with: all of them joined at round 0."""
        members = list(members)
        return cls({i: 0 for i in members}, {i: (0, True) for i in members})

    def copy(self) -> "View":
        return View(dict(self.last_active), dict(self.records), dict(self.pending))

    def seen(self, peer: int, round_index: int) -> None:
        """`peer` was active in `round_index` (it sent something, or answered a ping)."""
        if peer in self.records:
            self.last_active[peer] = max(self.last_active.get(peer, round_index), round_index)

    def merge(self, other: "View") -> None:
        """Take in a received view: the max of each peer's last-active round, and for each peer the
        newer membership record (higher counter; at an equal counter a leave beats a join, so the
        merge is commutative whatever it is given); a join that would make a peer a candidate
        waits in `pending` for the next flush."""
        for peer, record in other.records.items():
            mine = self.records.get(peer)
            if mine is not None and newer(record) <= newer(mine):
                continue
            if record[1] and (mine is None or not mine[1]):  # a (re)joiner: no candidate before the next flush
                waiting = self.pending.get(peer)
                if waiting is None or newer(record) > newer(waiting[1:]):
                    self.pending[peer] = (other.last_active.get(peer, 0), *record)
            else:
                self.records[peer] = record
        for peer, round_index in other.last_active.items():
            if peer in self.records:
                self.last_active[peer] = max(self.last_active.get(peer, 0), round_index)

    def flush(self) -> None:
        """Apply the joins heard of since the last flush."""
        for peer, (round_index, counter, joined) in self.pending.items():
            if peer not in self.records or newer((counter, joined)) > newer(self.records[peer]):
                self.records[peer] = (counter, joined)
            self.last_active[peer] = max(self.last_active.get(peer, 0), round_index)
        self.pending = {}

    def record(self, peer: int, joined: bool, round_index: int) -> None:
        """`peer` itself announces a membership change (its counter goes up by one)."""
        counter = self.records.get(peer, (-1, False))[0] + 1
        self.records[peer] = (counter, joined)
        self.last_active[peer] = max(self.last_active.get(peer, round_index), round_index)

    def candidates(self, round_index: int, inactivity: int) -> list[int]:
        """Peers that may be sampled in `round_index`: joined, and active in the last `inactivity` rounds."""
        return sorted(p for p, (_, joined) in self.records.items()
                      if joined and self.last_active.get(p, 0) >= round_index - inactivity)

    def to_extra(self) -> dict[str, Any]:
        """The form that rides in a message header's `extra` (string keys, ints and bools)."""
        return {"active": {str(p): r for p, r in self.last_active.items()},
                "records": {str(p): [c, j] for p, (c, j) in self.records.items()}}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "View":
        """A received view, checked: a malformed one raises ValueError (the caller drops it)."""
        try:
            active = {int(p): int(r) for p, r in extra["active"].items()}
            records = {int(p): (int(c), bool(j)) for p, (c, j) in extra["records"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a MoDeST view: {exc}") from exc
        if any(p < 0 or r < 0 for p, r in active.items()) or any(p < 0 or c < 0 for p, (c, _) in records.items()):
            raise ValueError("not a MoDeST view: negative ids, rounds or counters")
        return cls(active, records)


def newer(record: tuple[int, bool]) -> tuple[int, int]:
    """The order of membership records: by counter, and at an equal counter a leave after a join."""
    counter, joined = record
    return counter, 0 if joined else 1


def order(candidates: Iterable[int], round_index: int) -> list[int]:
    """The candidates in the order every node derives for round r: by md5 of "<id>-<r>"."""
    return sorted(candidates, key=lambda peer: hashlib.md5(f"{peer}-{round_index}".encode()).digest())


def first_responsive(ordered: list[int], count: int, answers: Callable[[int], bool]) -> tuple[list[int], list[int]]:
    """The first `count` peers of `ordered` that answer a ping, and those skipped on the way."""
    chosen, skipped = [], []
    for peer in ordered:
        if len(chosen) == count:
            break
        (chosen if answers(peer) else skipped).append(peer)
    return chosen, skipped


def default_sample_size(n: int) -> int:
    return max(2, n // 10)


def quorum(sample_size: int, success_fraction: float) -> int:
    """How many trained models an aggregator waits for: ceil(sf * s), at least one."""
    return max(1, math.ceil(success_fraction * sample_size - 1e-9))


class Aggregation:
    """An aggregator's buffer of trained models for one round: a newer round resets it, older
    rounds are ignored, and it is ready once it holds `needed` models (one per sender)."""

    def __init__(self, needed: int):
        self.needed = needed
        self.round = -1
        self.models: dict[int, torch.Tensor] = {}
        self.done = False

    def offer(self, round_index: int, sender: int, vector: torch.Tensor) -> bool:
        """Take a trained model; True when this completes the quorum (exactly once per round)."""
        if round_index < self.round or (round_index == self.round and self.done):
            return False
        if round_index > self.round:
            self.round, self.models, self.done = round_index, {}, False
        self.models[sender] = vector
        if len(self.models) >= self.needed:
            self.done = True
            return True
        return False


@dataclass(frozen=True)
class Churn:
    """The churn schedule of a run: who crashes (stops answering, silently), who leaves (announces
    it, then stops) and who joins (announces itself, then takes part), each at a round."""
    n: int
    crash_at: int = -1
    crash: frozenset[int] = frozenset()
    leave_at: int = -1
    leave: frozenset[int] = frozenset()
    join_at: int = -1
    join: frozenset[int] = frozenset()

    def members(self) -> list[int]:
        """The nodes that are members from round 0."""
        return [i for i in range(self.n) if i not in self.join]

    def answers(self, node: int, round_index: int) -> bool:
        """Whether `node` is up and answering in `round_index`."""
        if node in self.join and round_index < self.join_at:
            return False
        if node in self.crash and round_index >= self.crash_at:
            return False
        return not (node in self.leave and round_index >= self.leave_at)
