"""A Node: one participant's model, data and round, independent of how messages travel.

A round is local training, then the round plan's exchanges: broadcast steps of [send own vector,
receive neighbours' vectors, merge] or pairwise exchanges. The phases are separate methods so that
the Node engine can run each phase for all nodes before the next, while a node process runs its
own part of the plan. The maths is the algorithm core's, called with a batch of one node.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..algorithms.merge import Merger, keep_finite
from ..algorithms.attacks import Attack
from ..algorithms.robust import FilterChain, FilterInput
from ..algorithms.train import LocalTraining
from ..params import FlatModel
from ..transport import Message, Transport

MODEL = "model"
PAIR_REQUEST, PAIR_REPLY = "pair_request", "pair_reply"
SELF = torch.zeros(1, dtype=torch.long)  # a Node is row 0 of its own guard's population


@dataclass
class RoundStats:
    round: int
    train_loss: float
    received: int    # neighbour vectors merged over all exchanges
    missing: int     # neighbour vectors that did not arrive in time


@dataclass
class NodeCounters:
    """What a node did to protect itself: per neighbour, how many of its vectors it merged, how
    many its filters acted on (`flagged`) and their summed suspicion; and undone non-finite results."""
    messages: Counter[int] = field(default_factory=Counter)
    flagged: Counter[int] = field(default_factory=Counter)
    suspicion: Counter[int] = field(default_factory=Counter)
    rolled_back: int = 0  # merges or training rounds whose non-finite result was undone

    def record(self, senders: list[int], suspicion: torch.Tensor) -> None:
        for sender, s in zip(senders, suspicion.tolist()):
            self.messages[sender] += 1
            self.flagged[sender] += s > 0
            self.suspicion[sender] += s

    def as_dict(self) -> dict[str, object]:
        return {"flagged": {str(k): v for k, v in sorted(self.flagged.items())}, "rolled_back": self.rolled_back}

    def state(self) -> dict[str, object]:
        table = lambda c: {str(k): v for k, v in sorted(c.items())}  # noqa: E731
        return {"messages": table(self.messages), "flagged": table(self.flagged), "suspicion": table(self.suspicion),
                "rolled_back": self.rolled_back}

    def load_state(self, state: dict) -> None:
        self.messages, self.flagged, self.suspicion = (Counter({int(k): v for k, v in state[name].items()})
                                                       for name in ("messages", "flagged", "suspicion"))
        self.rolled_back = state["rolled_back"]


class Node:
    def __init__(self, node_id: int, flat: FlatModel, training: LocalTraining,
                 batches: Callable[[int], torch.Tensor], gradient: Callable[[torch.Tensor], torch.Tensor],
                 lr: Callable[[int], float], self_weight: float, neighbour_weights: dict[int, float],
                 transport: Transport, merger: Merger, filters: FilterChain, attack: Attack | None = None):
        """`filters` are what this node applies to what it receives; `attack`, for a Byzantine node
        (in an evaluation run), what it sends instead of its vector: a runtime asks it through
        `send_vectors`, and the node does not train when the attack says so."""
        self.id = node_id
        self.flat, self.training, self.transport, self.merger = flat, training, transport, merger
        self.filters, self.attack = filters, attack
        self.batches, self.gradient, self.lr = batches, gradient, lr
        self.self_weight = self_weight
        self.neighbour_weights = {j: w for j, w in neighbour_weights.items() if j != node_id}
        self.counters = NodeCounters()
        self._merged = torch.empty(1, flat.layout.size)
        self._before = torch.empty(1, flat.layout.size)
        self._received = self._missing = 0

    @property
    def vector(self) -> torch.Tensor:
        return self.flat.vector

    @property
    def round_start(self) -> torch.Tensor:
        """The vector before this round's local training, (1, d)."""
        return self._before

    def train(self, round_index: int) -> float:
        """One round of local training; a round that ends non-finite is undone."""
        self._received = self._missing = 0
        self._before.copy_(self.vector)
        if self.attack is not None and not self.attack.trains:
            return float("nan")
        loss = self.training.run(self.batches(round_index), self.gradient, self.lr(round_index))
        self.counters.rolled_back += keep_finite(self.vector.view(1, -1), self._before)
        return float(loss[0])

    def snapshot(self, kind: str, round_index: int, step: int) -> Message:
        """The current vector, copied once and shared read-only by every recipient."""
        return Message(kind, self.id, round_index, step, self.vector.clone())

    def send(self, round_index: int, step: int) -> None:
        """Send a snapshot of the current vector to every neighbour."""
        message = self.snapshot(MODEL, round_index, step)
        for j in self.neighbour_weights:
            self.transport.send(j, message)

    def send_vectors(self, kind: str, round_index: int, step: int, vectors: dict[int, torch.Tensor]) -> None:
        """An attacker's sends: the given vector to each listed receiver, its own to the others."""
        own = self.snapshot(kind, round_index, step)
        for j in self.neighbour_weights:
            vector = vectors.get(j)
            self.transport.send(j, own if vector is None else Message(kind, self.id, round_index, step, vector))

    def receive_and_merge(self, round_index: int, step: int) -> None:
        """Wait for this step's vectors, then merge whatever arrived (weights renormalised)."""
        got = self.transport.receive(MODEL, round_index, step, set(self.neighbour_weights))
        senders = sorted(got)
        self._missing += len(self.neighbour_weights) - len(senders)
        self.merge([got[j] for j in senders], [self.neighbour_weights[j] for j in senders], round_index, step)

    def merge(self, messages: list[Message], weights: list[float], round_index: int, step: int,
              self_weight: float | None = None) -> None:
        """Filter, merge and keep finite: the node's own vector is replaced by the merge."""
        self._received += len(messages)
        if not messages:
            return
        own = self.vector.view(1, -1)
        received = [m.vector.view(1, -1) for m in messages]
        w = torch.tensor([[self.self_weight if self_weight is None else self_weight, *weights]], dtype=torch.float64)
        if self.filters:
            senders = [m.sender for m in messages]
            out = self.filters(FilterInput(SELF, own, received, w, round_index, step, torch.tensor([self.id]),
                                           torch.tensor([senders])))
            received, w = out.received, out.weights
            self.counters.record(senders, out.suspicion[0])
        self.merger(own, received, w, out=self._merged)
        self.counters.rolled_back += keep_finite(self._merged, own)
        own.copy_(self._merged)

    def merge_arrived(self, messages: list[Message], round_index: int, decay: float) -> None:
        """Asynchronous gossip: merge the newest vector of each neighbour that sent one, weighted by
        its mixing weight times decay ** (rounds it lags behind this node's `round_index`)."""
        messages = [m for m in messages if m.sender in self.neighbour_weights]
        self.merge(messages, [self.neighbour_weights[m.sender] * decay ** max(0, round_index - m.round)
                              for m in messages], round_index, 0)

    # Pairwise exchanges (Poisson-clock gossip): the edge's owner requests, the peer answers with
    # its own vector and merges, the owner merges the answer. Both ends weigh the pair 1/2 : 1/2.

    def request_pair(self, peer: int, round_index: int, seq: int, vector: torch.Tensor | None = None) -> None:
        """Open exchange `seq` with `peer`; an attacker passes the `vector` it sends instead."""
        self.transport.send(peer, self.snapshot(PAIR_REQUEST, round_index, seq) if vector is None
                            else Message(PAIR_REQUEST, self.id, round_index, seq, vector))

    def answer_pair(self, peer: int, round_index: int, seq: int,
                    attack: Callable[[Message], torch.Tensor] | None = None) -> bool:
        """Answer `peer`'s request with this node's vector (an attacker: `attack(request)`), and merge."""
        got = self.transport.receive(PAIR_REQUEST, round_index, seq, {peer})
        if peer not in got:
            return self._pair_missing()
        reply = self.snapshot(PAIR_REPLY, round_index, seq) if attack is None else \
            Message(PAIR_REPLY, self.id, round_index, seq, attack(got[peer]))
        self.transport.send(peer, reply)
        self.merge([got[peer]], [0.5], round_index, seq, self_weight=0.5)
        return True

    def finish_pair(self, peer: int, round_index: int, seq: int) -> bool:
        got = self.transport.receive(PAIR_REPLY, round_index, seq, {peer})
        if peer not in got:
            return self._pair_missing()
        self.merge([got[peer]], [0.5], round_index, seq, self_weight=0.5)
        return True

    def _pair_missing(self) -> bool:
        self._missing += 1
        return False

    def state(self) -> dict[str, object]:
        """What a checkpoint of a simulated network keeps of this node besides its vector."""
        return {"counters": self.counters.state(), "filters": self.filters.state(),
                "bytes_sent": self.transport.bytes_sent, "messages_sent": self.transport.messages_sent}

    def load_state(self, state: dict) -> None:
        self.counters.load_state(state["counters"])
        self.filters.load_state(state["filters"])
        self.transport.bytes_sent, self.transport.messages_sent = state["bytes_sent"], state["messages_sent"]

    def stats(self, round_index: int, loss: float) -> RoundStats:
        return RoundStats(round_index, loss, self._received, self._missing)
