"""The round plan: for round r, who trains and which exchanges happen, in order.

One plan serves every runtime: the Node engine runs all of it, a node process keeps the entries
that involve its own id, the vectorized engine turns broadcast steps into sparse products and runs
of disjoint pairs into batched pairwise merges.

Schedules: sync = Q lock-step broadcast steps (DFedSAM-MGS); poisson = the round's firings of
per-edge Poisson clocks, each a pairwise exchange whose lower id owns the edge; async = no plan of
exchanges at all: each node trains, merges whatever arrived and sends at its own pace (a round is
then a window of clock time in which to do so: real time in node processes, a virtual clock with
per-node compute times and per-link latencies in simulation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from ..graph import poisson
from ..seeding import POISSON_STREAM, TIMING_STREAM, round_seed

SCHEDULES = ("sync", "poisson", "async")


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
    window: tuple[float, float] | None = None  # async: the clock time [start, end) of the round

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


def async_plan(period: float) -> Callable[[int], RoundPlan]:
    """Round r is the clock time [r * period, (r + 1) * period), in which nodes act on their own."""
    return lambda r: RoundPlan(r, [], window=(r * period, (r + 1) * period))


def compute_times(n: int, mean: float, spread: float, slow: list[int], slow_factor: float, seed: int) -> np.ndarray:
    """Seconds of one local round per node: mean x a seeded log-normal factor (median 1), and
    slow_factor x that for the listed nodes."""
    rng = np.random.default_rng(round_seed(seed, TIMING_STREAM, 0))
    times = mean * np.exp(spread * rng.standard_normal(n))
    times[list(slow)] *= slow_factor
    return times


def link_latencies(edges: list[tuple[int, int]], mean: float, spread: float, seed: int) -> dict[tuple[int, int], float]:
    """One-way seconds per link, the same both ways: mean x a seeded log-normal factor."""
    rng = np.random.default_rng(round_seed(seed, TIMING_STREAM, 1))
    factors = np.exp(spread * rng.standard_normal(len(edges)))
    latencies = {}
    for (u, v), f in zip(edges, factors.tolist()):
        latencies[u, v] = latencies[v, u] = mean * f
    return latencies
