"""The round plan: for round r, who trains and which exchanges happen, in order.

One plan serves every runtime: the Node engine runs all of it, a node process keeps the entries
that involve its own id, the vectorized engine turns broadcast steps into sparse products and runs
of disjoint pairs into batched pairwise merges.

Schedules: sync = Q lock-step broadcast steps (DFedSAM-MGS); poisson = the round's firings of
per-edge Poisson clocks, each a pairwise exchange whose lower id owns the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from ..graph import poisson
from ..seeding import POISSON_STREAM, round_seed

SCHEDULES = ("sync", "poisson")


@dataclass(frozen=True)
class Broadcast:
    """Gossip step `step`: every node sends its vector to all neighbours, then merges what arrived."""
    step: int


@dataclass(frozen=True)
class Pair:
    """Exchange number `seq` of the round: `owner` sends to `peer`, `peer` answers with its own vector
    and merges, `owner` merges the answer; both weigh the pair 1/2 : 1/2."""
    seq: int
    owner: int
    peer: int


Exchange = Union[Broadcast, Pair]


@dataclass(frozen=True)
class RoundPlan:
    round: int
    exchanges: list[Exchange]
    trainers: frozenset[int] | None = None  # None: every node trains and gossips
    idle: frozenset[int] = field(default_factory=frozenset)  # nodes that sit this round out

    def involving(self, node: int) -> list[Exchange]:
        """The exchanges a node takes part in, in the plan's order."""
        return [e for e in self.exchanges if isinstance(e, Broadcast) or node in (e.owner, e.peer)]


def pair_batches(exchanges: list[Exchange]) -> list[list[Pair]]:
    """Consecutive pairs grouped into runs that share no node: within a run the exchanges commute,
    so running a run at once gives exactly the sequential result."""
    runs: list[list[Pair]] = []
    busy: set[int] = set()
    for e in exchanges:
        if not isinstance(e, Pair):
            raise TypeError("pair_batches takes pairwise exchanges only")
        if not runs or e.owner in busy or e.peer in busy:
            runs.append([])
            busy = set()
        runs[-1].append(e)
        busy |= {e.owner, e.peer}
    return runs


def sync_plan(steps: int) -> Callable[[int], RoundPlan]:
    return lambda r: RoundPlan(r, [Broadcast(q) for q in range(steps)])


def poisson_plan(rates: np.ndarray, edges: list[tuple[int, int]], duration: float, seed: int) -> Callable[[int], RoundPlan]:
    """Each round replays its own seeded firings, so every runtime and every process draws alike."""
    def plan(r: int) -> RoundPlan:
        rng = np.random.default_rng(round_seed(seed, POISSON_STREAM, r))
        _, fired = poisson.firings(rates, duration, rng)
        pairs = [Pair(seq, min(edges[e]), max(edges[e])) for seq, e in enumerate(fired.tolist())]
        return RoundPlan(r, list(pairs))
    return plan
