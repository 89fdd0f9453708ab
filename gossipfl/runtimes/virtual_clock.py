"""Asynchronous gossip (gossip.schedule = "async") in one process, on a virtual clock.

Each node works at its own pace, as it does in a node process: it trains one local round, then
merges the newest vector each neighbour sent since its last merge (weighted by the mixing weight
times gossip.staleness_decay ** rounds behind), sends its vector to every neighbour, and trains
the next round; it never waits for anyone. Node i's local round takes timing.compute_times[i]
seconds of virtual time and a message over link (i, j) arrives latency[i, j] later, both drawn
once from the seed, so a run replays exactly and researchers can study heterogeneous networks
(stragglers, slow links) in one process. A metrics round is a window of timing.compute_s of
virtual time: each node does as many local rounds in it as its speed allows.
"""

from __future__ import annotations

import heapq
import time
from typing import Any

import numpy as np

from ..algorithms.schedule import RoundPlan, compute_times, link_latencies
from ..experiment import Experiment
from ..transport import MemoryNetwork
from .node import MODEL
from .sim import NodeEngine


class TimedNetwork(MemoryNetwork):
    """Mailboxes whose letters arrive after their link's latency on the virtual clock."""

    def __init__(self, vector_size: int, latencies: dict[tuple[int, int], float]):
        super().__init__(vector_size)
        self.latencies, self.now = latencies, 0.0
        self.in_flight: list[tuple[float, int, int, Any]] = []  # (arrival, sequence, destination, message)
        self._sequence = 0

    def deliver(self, dst: int, message: Any) -> None:
        arrival = self.now + self.latencies[message.sender, dst]
        heapq.heappush(self.in_flight, (arrival, self._sequence, dst, message))
        self._sequence += 1

    def advance(self, now: float) -> None:
        """Move the clock to `now`, putting every letter due by then into its mailbox."""
        self.now = now
        while self.in_flight and self.in_flight[0][0] <= now:
            _, _, dst, message = heapq.heappop(self.in_flight)
            super().deliver(dst, message)


class VirtualClockEngine(NodeEngine):
    """Nodes over a TimedNetwork, driven by the events of a virtual clock. Not resumable: its state
    includes the letters in flight, which checkpoints do not hold."""

    resumable = False

    def __init__(self, experiment: Experiment):
        cfg = experiment.cfg
        t = cfg.timing
        super().__init__(experiment, TimedNetwork(experiment.layout.size, link_latencies(
            list(experiment.graph.edges), t.latency_s, t.latency_spread, cfg.seed)))
        self.compute = compute_times(experiment.n, t.compute_s, t.compute_spread, experiment.slow_nodes,
                                     t.slow_factor, cfg.seed)
        self.decay = cfg.gossip.staleness_decay
        self.local_round = np.zeros(experiment.n, dtype=np.int64)  # the round each node is training
        self.events: list[tuple[float, int]] = []  # (time a node finishes its local round, node)
        self.started = False

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        """Every event of the window [start, end): (mean loss of the local rounds trained, seconds)."""
        assert plan.window is not None, "the virtual clock runs asynchronous plans"
        losses, train_seconds = [], 0.0
        if not self.started:  # at time 0 every node starts its first local round
            self.started = True
            for i, node in enumerate(self.nodes):
                begin = time.perf_counter()
                loss = node.train(0)
                train_seconds += time.perf_counter() - begin
                losses += [] if node.attack else [loss]
                heapq.heappush(self.events, (float(self.compute[i]), i))
        while self.events and self.events[0][0] < plan.window[1]:
            now, i = heapq.heappop(self.events)
            self.network.advance(now)
            node, r = self.nodes[i], int(self.local_round[i])
            node.merge_arrived(list(node.transport.drain(MODEL).values()), r, self.decay)
            if node.attack:  # what it sends each honest neighbour, from every node's vector now
                node.send_vectors(MODEL, r, 0, {j: self.attack_vectors(j, r, 0)[i] for j in node.neighbour_weights
                                                if j not in self.attackers})
            else:
                node.send(r, 0)
            self.local_round[i] = r + 1
            begin = time.perf_counter()
            loss = node.train(r + 1)
            train_seconds += time.perf_counter() - begin
            losses += [] if node.attack else [loss]
            heapq.heappush(self.events, (now + float(self.compute[i]), i))
        return (float(np.mean(losses)) if losses else float("nan")), train_seconds
