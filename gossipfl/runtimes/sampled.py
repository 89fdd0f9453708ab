"""Sampled rounds in `gossipfl simulate`: MoDeST (sampling.kind = "modest"), and federated
averaging with a server's uniform sample of the same size as its reference ("fedavg").

MoDeST round r, as node processes run it (algorithms/sampling.py has the rules): the members of
sample r, each holding the aggregate it received, train; each pings its way down order(r + 1)
from its own view to the first `a` that answer, the aggregators, and sends them its model with
its view; an aggregator merges the views, waits for ceil(sf * s) models (merging what came by
the round's end otherwise), filters and averages them, pings its way to the first s that answer
in order(r + 1), and sends them the average: they are sample r + 1. Pings, views and flushes are
simulated exactly; messages are instant and never lost, so churn (crashes, graceful leaves,
joins from `sampling.*`) is what makes nodes miss each other. The model maths is the engine's
(one Node per member, or batched rows), so both engines run MoDeST alike.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..algorithms.robust import FilterInput
from ..algorithms.sampling import Aggregation, View, first_responsive, order, quorum
from ..algorithms.schedule import RoundPlan
from ..experiment import Experiment
from ..seeding import SAMPLE_STREAM, round_seed


class SampledEngine:
    """Rounds of a sample of nodes over `base`, the engine that trains them (Node or vectorized)."""

    resumable = False  # views and holdings are not checkpointed

    def __init__(self, experiment: Experiment, base: Any):
        cfg = experiment.cfg
        self.experiment, self.base, self.kind = experiment, base, cfg.sampling.kind
        self.s, self.a = experiment.sample_size, cfg.sampling.aggregators
        self.needed = quorum(self.s, cfg.sampling.success_fraction)
        self.inactivity, self.seed, self.churn = cfg.sampling.inactivity_rounds, cfg.seed, experiment.churn
        self.model_bytes = experiment.layout.size * 4
        self.filters, self.merger = experiment.filters(experiment.n, network=False), experiment.merger(experiment.layout)
        members = self.churn.members()
        self.views = {i: View.of_members(members) for i in members}
        self.bytes = np.zeros(experiment.n, dtype=np.int64)
        self.server_bytes = 0
        self.seen: dict[tuple[int, int], tuple[int, float]] = {}
        self.flagged = 0
        start = base.vectors()[members[0]].clone()
        self.global_model = start  # fedavg's server model; for modest the newest aggregate
        ordered = order(self.views[members[0]].candidates(0, self.inactivity), 0)
        first, self.skipped = first_responsive(ordered, self.s, lambda q: self.churn.answers(q, 0))
        self.holding = {i: base.vectors()[i].clone() for i in first}  # who trains next, from what
        self.last: dict[str, Any] = {}

    # -- a round

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        r = plan.round
        self.churn_events(r)
        if self.kind == "fedavg":
            return self.fedavg_round(r)
        trainers = sorted(i for i in self.holding if self.churn.answers(i, r))
        begin = time.perf_counter()
        trained, losses = self.base.train_nodes(r, trainers, torch.stack([self.holding[i] for i in trainers]))
        seconds = time.perf_counter() - begin
        skipped = len(self.holding) - len(trainers)
        inboxes: dict[int, list[tuple[int, torch.Tensor, View]]] = {}
        for p, vector in zip(trainers, trained):
            view = self.views[p]
            aggregators, passed = first_responsive(order(view.candidates(r + 1, self.inactivity), r + 1), self.a,
                                                   lambda q, p=p: self.ping(p, q, r))
            skipped += len(passed)
            for g in aggregators:
                inboxes.setdefault(g, []).append((p, vector, view.copy()))
                self.bytes[p] += self.model_bytes if g != p else 0
            view.flush()
        holding: dict[int, torch.Tensor] = {}
        aggregated = []
        for g in sorted(inboxes):
            aggregate, recipients, passed = self.aggregate(g, inboxes[g], r)
            skipped += len(passed)
            aggregated.append(g)
            self.global_model = aggregate
            for q in recipients:
                holding.setdefault(q, aggregate)  # a second aggregator's average of the same round is ignored
                if q != g:
                    self.bytes[g] += self.model_bytes
                    self.views[q].merge(self.views[g])
                    self.views[q].seen(g, r + 1)
            self.views[g].flush()
        if holding:  # what a recipient holds is its model until it trains
            self.base.set_vectors(sorted(holding), torch.stack([holding[q] for q in sorted(holding)]))
        self.holding = holding
        self.last = {"sample": trainers, "aggregators": aggregated, "skipped": skipped}
        return (float(np.mean(losses)) if len(losses) else float("nan")), seconds

    def aggregate(self, g: int, inbox: list[tuple[int, torch.Tensor, View]], r: int):
        """Aggregator g: merge the senders' views, wait for the quorum (or merge what came by the
        round's end), filter and average; then the next sample it sends the average to."""
        view, buffer = self.views[g], Aggregation(self.needed)
        for sender, vector, sent_view in inbox:
            view.merge(sent_view)
            view.seen(sender, r)
            buffer.offer(r + 1, sender, vector)
        senders = sorted(buffer.models)
        own = self.base.vectors()[g].view(1, -1)
        received = [buffer.models[j].view(1, -1) for j in senders]
        weights = torch.tensor([[0.0, *([1.0] * len(senders))]], dtype=torch.float64)
        if self.filters:
            out = self.filters(FilterInput(torch.tensor([g]), own, received, weights, r, 0, torch.tensor([g]),
                                           torch.tensor([senders])))
            received, weights = out.received, out.weights
            for j, s in zip(senders, out.suspicion[0].tolist()):
                messages, total = self.seen.get((g, j), (0, 0.0))
                self.seen[g, j] = (messages + 1, total + s)
                self.flagged += s > 0
        average = self.merger(own, received, weights, out=torch.empty_like(own))[0].clone()
        recipients, passed = first_responsive(order(view.candidates(r + 1, self.inactivity), r + 1), self.s,
                                              lambda q: self.ping(g, q, r))
        return average, recipients, passed

    def ping(self, pinger: int, target: int, r: int) -> bool:
        """A ping and its pong: both ends see each other active, if the target answers."""
        if not self.churn.answers(target, r) or target not in self.views:
            return False
        self.views[pinger].seen(target, r)
        self.views[target].seen(pinger, r)
        return True

    def fedavg_round(self, r: int) -> tuple[float, float]:
        """The reference: a server samples s answering nodes uniformly, they train from its model
        and send it back, it averages (2 x s models on the wire)."""
        up = [i for i in range(self.experiment.n) if self.churn.answers(i, r)]
        rng = np.random.default_rng(round_seed(self.seed, SAMPLE_STREAM, r))
        chosen = sorted(rng.choice(up, min(self.s, len(up)), replace=False).tolist())
        begin = time.perf_counter()
        trained, losses = self.base.train_nodes(r, chosen, self.global_model.expand(len(chosen), -1).clone())
        seconds = time.perf_counter() - begin
        self.global_model = trained.mean(dim=0)
        self.server_bytes += len(chosen) * self.model_bytes
        self.bytes[chosen] += self.model_bytes
        self.last = {"sample": chosen, "aggregators": [], "skipped": 0}
        return float(np.mean(losses)), seconds

    def churn_events(self, r: int) -> None:
        """Leaves and joins are announced to s random members that answer (seeded by the round)."""
        c = self.churn
        rng = np.random.default_rng(round_seed(self.seed, SAMPLE_STREAM, r, 1))
        announcing = []
        if r == c.leave_at:
            for i in sorted(c.leave & self.views.keys()):
                self.views[i].record(i, joined=False, round_index=r)
                announcing.append(i)
        if r == c.join_at:
            for i in sorted(c.join):
                first = min(j for j in self.views if c.answers(j, r))
                self.views[i] = self.views[first].copy()
                self.views[i].record(i, joined=True, round_index=r)
                announcing.append(i)
        for i in announcing:
            others = [j for j in sorted(self.views) if j != i and c.answers(j, r)]
            for j in rng.choice(others, min(self.s, len(others)), replace=False).tolist():
                self.views[j].merge(self.views[i])

    # -- what the loop reads

    def vectors(self) -> torch.Tensor:
        return self.base.vectors()

    def counters(self) -> dict[str, Any]:
        return {"bytes_sent": int(self.bytes.sum()) + self.server_bytes, "bytes_sent_max_node": int(self.bytes.max()),
                "rejected": {}, "flagged": self.flagged, "rolled_back": 0, **self.last}

    def observations(self) -> dict[tuple[int, int], tuple[int, float]]:
        return dict(self.seen)
