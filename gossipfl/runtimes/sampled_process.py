"""MoDeST in one node process: the round of runtimes/sampled.py, message for message, over
ZeroMQ with real pings and wall-clock timeouts (algorithms/sampling.py has the rules).

Every node is a peer of every other (a complete overlay) and never blocks on one: it polls its
asynchronous transport every POLL_S, answers each ping with a pong, and acts on what arrived.
Round r: a member of sample r (the first s of order(0) at the start, alike for all; later whoever
received an aggregate of round r - 1) trains from it, pings its way down order(r + 1) of its own
view to the first `a` that answer, the aggregators, and sends each its trained model with its
view. An aggregator merges the views, buffers the models with `Aggregation` (older rounds
ignored, a newer one resets), and once ceil(sf * s) arrived, or `ping_timeout_s` after the
first one came, filters and averages them with the node's own filters and merge rule (weight 0
for its own vector), pings its way to the first s that answer in order(r + 1) and sends them
the aggregate with its view: they are sample r + 1. The aggregator of the last round sends
`done` to everyone, which ends every node's run.

Pinging is `first_responsive` in wall time: the first `count` candidates not yet given up are
pinged every `ping_interval_s`; one silent for `ping_timeout_s` is skipped and the next in order
takes its place (a peer that never answered yet may still be starting: it is not given up before
deploy.startup_s from this node's start). Pings are answered between training rounds, so
ping_timeout_s must exceed a round of local training. A pong carries the answerer's stage (2r:
holds round r's starting model, 2r + 1: trained round r and sent it, 2r + 2: aggregated round r
and sent it), so whoever hands something over
keeps pinging the peers it gave it to until one of them got past it: a trainer until an
aggregator of its round aggregated, an aggregator until a member of the next sample trained. A
peer that dies holding the round is thus replaced by the next in order and the run goes on; it
stalls only if every trainer of a round and all their aggregators die within the same round.
A node that hears nothing for `silence_s` (the run ended or stalled without it) ends its run.

Churn schedules (crash_at, leave_at, join_at) are simulation-only: in processes a crash is a
real kill. A restarted (resumed) node starts idle with a fresh view and takes part when sampled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import torch

from ..algorithms.sampling import Aggregation, View, first_responsive, order, quorum
from ..transport import Message

if TYPE_CHECKING:
    from .process import NodeProcess

TRAINED, AGGREGATE, PING, PONG, DONE = "trained", "aggregate", "ping", "pong", "done"
KINDS = frozenset({TRAINED, AGGREGATE, PING, PONG, DONE})
POLL_S = 0.01  # how often a node takes in what arrived and moves its handoffs on
EMPTY = torch.empty(0)

log = logging.getLogger("gossipfl.node")


def holding(r: int) -> int:
    """The stage of a node that holds the model to train round r on."""
    return 2 * r


def trained(r: int) -> int:
    """The stage of a node that trained round r and handed its model to an aggregator."""
    return 2 * r + 1


def aggregated(r: int) -> int:
    """The stage of a node that aggregated round r and handed the aggregate on (= holding(r + 1))."""
    return 2 * r + 2


@dataclass
class Handoff:
    """Give something to the first `count` responsive peers of `ordered` (`deliver(peer)`), then
    watch them until one of them (or this node) reaches stage `target`; `report` runs once all
    of the first `count` have it (this node's metrics line for its part of the round)."""
    round: int
    ordered: list[int]
    count: int
    target: int
    deliver: Callable[[int], None]
    report: Callable[["Handoff"], None]
    given_up: set[int] = field(default_factory=set)
    asked: dict[int, float] = field(default_factory=dict)      # peer -> its oldest unanswered ping
    pinged: dict[int, float] = field(default_factory=dict)     # peer -> its newest ping
    delivered: list[int] = field(default_factory=list)
    placed: bool = False

    def chosen(self) -> list[int]:
        return first_responsive(self.ordered, self.count, lambda q: q not in self.given_up)[0]

    def give(self, peer: int) -> None:
        if peer not in self.delivered:
            self.delivered.append(peer)
            self.deliver(peer)


class ModestLoop:
    """The MoDeST rounds of one node process; `run` returns the newest round it knows ended."""

    def __init__(self, process: NodeProcess, metrics: IO[str], started: float):
        self.process, self.metrics, self.started = process, metrics, started
        cfg, experiment = process.cfg, process.experiment
        self.cfg, self.id, self.node, self.transport = cfg, process.id, process.node, process.transport
        self.sampling, self.rounds = cfg.sampling, cfg.rounds
        self.s, self.a = experiment.sample_size, cfg.sampling.aggregators
        self.members = set(range(experiment.n))
        self.view = View.of_members(range(experiment.n))
        self.buffer = Aggregation(quorum(self.s, cfg.sampling.success_fraction))
        self.first_model_at = math.inf       # when the buffer's round got its first model
        self.stage = -1
        self.hold: tuple[int, torch.Tensor] | None = None  # (round, model) this node is to train next
        self.started_round = -1  # the newest round this node took a starting model for
        self.handoffs: list[Handoff] = []
        self.pong_at: dict[int, float] = {}
        self.pong_stage: dict[int, int] = {}
        self.heard_at = time.monotonic()
        self.startup_until = self.heard_at + cfg.deploy.startup_s
        self.finished = False
        if not process.resumed and self.id in self.ordered(0)[:self.s]:  # everyone is up at the start
            self.take(0, self.node.vector.clone())
        log.info("node %d runs MoDeST with %d peers%s", self.id, len(self.members) - 1,
                 ", in the first sample" if self.hold else "")

    # -- the loop

    def run(self) -> int:
        silence = self.sampling.silence_s
        while not (self.finished or self.process.stopping.is_set()):
            self.take_in()
            if self.hold is not None:
                self.train(*self.hold)
            now = time.monotonic()
            for handoff in list(self.handoffs):
                if self.advance(handoff, now):
                    self.handoffs.remove(handoff)
            if self.buffer.models and not self.buffer.done and now - self.first_model_at > self.sampling.ping_timeout_s:
                self.aggregate(self.buffer.round)
            if now - self.heard_at > silence:
                log.warning("node %d heard nothing for %.0f s: it ends its run", self.id, silence)
                break
            self.process.completed = self.completed()
            self.process.stopping.wait(POLL_S)
        return self.completed()

    def completed(self) -> int:
        """The newest round this node knows ended (-1: none)."""
        return self.rounds - 1 if self.finished else max(-1, self.stage // 2 - 1)

    def ordered(self, r: int) -> list[int]:
        """order(r) of this node's candidates."""
        return order(self.view.candidates(r, self.sampling.inactivity_rounds), r)

    def take_in(self) -> None:
        """Everything that arrived: answer pings, note pongs, buffer models, take aggregates."""
        drained = {kind: self.transport.drain(kind) for kind in (PING, PONG, TRAINED, AGGREGATE, DONE)}
        now = time.monotonic()
        if any(drained.values()):
            self.heard_at = now
        for q, m in drained[PING].items():
            self.view.seen(q, m.round)
            self.transport.send(q, Message(PONG, self.id, m.round, 0, EMPTY, {"stage": self.stage}))
        for q, m in drained[PONG].items():
            self.view.seen(q, m.round)
            self.pong_at[q] = now
            if type(m.extra.get("stage")) is int:
                self.pong_stage[q] = max(self.pong_stage.get(q, -1), m.extra["stage"])
        for q, m in drained[TRAINED].items():
            if m.round < self.rounds and self.merge_view(m):
                self.view.seen(q, m.round)
                self.offer(m.round, q, m.vector)
        for q, m in drained[AGGREGATE].items():
            if m.round + 1 < self.rounds and self.merge_view(m):
                self.view.seen(q, m.round + 1)
                self.take(m.round + 1, m.vector)
        if drained[DONE]:
            self.finished = True

    def merge_view(self, message: Message) -> bool:
        """Merge the view a model came with; a malformed one, or one naming nodes outside the
        deployment (which would grow this node's view without bound), drops the model."""
        try:
            view = View.from_extra(message.extra)
        except ValueError:
            view = None
        if view is None or not view.records.keys() | view.last_active.keys() <= self.members:
            self.transport.rejected["bad_view"] += 1
            return False
        self.view.merge(view)
        return True

    # -- the roles

    def take(self, r: int, vector: torch.Tensor) -> None:
        """A model to train round r from; one for a round this node already started from (a
        second aggregator's of the same round, or an older one) is ignored."""
        if r > self.started_round:
            self.hold, self.started_round = (r, vector), r
            self.stage = max(self.stage, holding(r))

    def train(self, r: int, vector: torch.Tensor) -> None:
        self.hold = None
        begin = time.perf_counter()
        self.node.vector.copy_(vector)
        loss = self.node.train(r)
        seconds = time.perf_counter() - begin
        model = self.node.vector.clone()
        view = self.view.to_extra()

        def deliver(q: int) -> None:
            self.stage = max(self.stage, trained(r))
            if q == self.id:
                self.offer(r, q, model)
            else:
                self.transport.send(q, Message(TRAINED, self.id, r, 0, model, view))

        self.handoffs.append(Handoff(r, self.ordered(r + 1), self.a, aggregated(r), deliver, lambda h: self.line(
            r, "trained", aggregators=h.delivered, train_loss=loss, train_seconds=seconds, skipped=len(h.given_up))))
        self.process.round = r

    def offer(self, r: int, sender: int, vector: torch.Tensor) -> None:
        before = self.buffer.round
        if self.buffer.offer(r, sender, vector):
            self.aggregate(r)
        elif self.buffer.round != before:
            self.first_model_at = time.monotonic()

    def aggregate(self, r: int) -> None:
        """Filter and average the buffered models (the aggregator's own vector weighs 0), evaluate
        per eval.every, and hand the aggregate to the next sample (or end the run after the last)."""
        self.buffer.done, self.first_model_at = True, math.inf
        senders = sorted(self.buffer.models)
        self.node.merge([Message(TRAINED, j, r, 0, self.buffer.models[j]) for j in senders], [1.0] * len(senders),
                        r, 0, self_weight=0.0)
        model = self.node.vector.clone()
        evaluate = (r + 1) % self.cfg.eval.every == 0 or r == self.rounds - 1
        scores = self.process.evaluate() if evaluate else {}
        self.process.accuracy = scores.get("accuracy", self.process.accuracy)
        fields = dict(sample=senders, **scores, flagged=sum(self.node.counters.flagged.values()),
                      rolled_back=self.node.counters.rolled_back)
        if r == self.rounds - 1:
            self.stage = aggregated(r)
            for q in sorted(self.members - {self.id}):
                self.transport.send(q, Message(DONE, self.id, r, 0, EMPTY))
            self.line(r, "aggregated", recipients=[], skipped=0, **fields)
            self.finished = True
            return
        view = self.view.to_extra()

        def deliver(q: int) -> None:
            self.stage = max(self.stage, aggregated(r))
            if q == self.id:
                self.take(r + 1, model)
            else:
                self.transport.send(q, Message(AGGREGATE, self.id, r, 0, model, view))

        self.handoffs.append(Handoff(r, self.ordered(r + 1), self.s, trained(r + 1), deliver, lambda h: self.line(
            r, "aggregated", recipients=h.delivered, skipped=len(h.given_up), **fields)))

    # -- pings

    def advance(self, h: Handoff, now: float) -> bool:
        """Ping, deliver and give up as `h` needs; True once it is placed and one of its peers (or
        this node) got past its target."""
        if h.placed and max([self.stage, *(self.pong_stage.get(q, -1) for q in h.delivered)]) >= h.target:
            return True
        timeout, interval = self.sampling.ping_timeout_s, self.sampling.ping_interval_s
        for q in h.chosen():
            if q == self.id:
                h.give(q)
                continue
            asked = h.asked.get(q)
            if asked is not None and self.pong_at.get(q, -math.inf) >= asked:
                del h.asked[q]
                h.give(q)
            elif asked is not None and now - asked > timeout and (q in self.pong_at or now > self.startup_until):
                h.given_up.add(q)
                continue
            if now - h.pinged.get(q, -math.inf) >= interval:
                self.transport.send(q, Message(PING, self.id, h.round, 0, EMPTY))
                h.pinged[q] = now
                h.asked.setdefault(q, now)
        if not h.placed and all(q in h.delivered for q in h.chosen()):
            h.placed = True
            self.view.flush()
            h.report(h)
        return False

    # -- metrics

    def line(self, r: int, role: str, **fields: Any) -> None:
        """This node's metrics line for its part in round r."""
        record = {"node": self.id, "round": r, "role": role, **fields, "bytes_sent": self.transport.bytes_sent,
                  "rejected": dict(self.transport.rejected), "io_errors": self.process.io_errors,
                  "wall_seconds": time.perf_counter() - self.started}
        self.process.best_effort(f"the metrics line of round {r}", lambda: (
            self.metrics.write(json.dumps(record) + "\n"), self.metrics.flush()))
        log.info("round %d: %s%s", r, role,
                              f", accuracy {record['accuracy']:.4f}" if "accuracy" in record else "")
