"""A Node: one participant's model, data and round loop, independent of how messages travel.

A round is: local training, then Q gossip steps of [send own vector, receive neighbours' vectors,
merge]. The phases are separate methods so that a single-process simulator can run each phase
for all nodes before the next, while a node process simply calls `run_round`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.merge import Merger
from ..params import FlatModel
from ..algorithms.train import LocalTrainer
from ..transport import Message, Transport

MODEL = "model"
PAIR_REQUEST, PAIR_REPLY = "pair_request", "pair_reply"


@dataclass
class RoundStats:
    round: int
    train_loss: float
    received: int    # neighbour vectors merged over all gossip steps
    missing: int     # neighbour vectors that did not arrive in time


class Node:
    def __init__(self, node_id: int, flat: FlatModel, trainer: LocalTrainer, self_weight: float,
                 neighbour_weights: dict[int, float], transport: Transport, merger: Merger, gossip_steps: int):
        self.id = node_id
        self.flat, self.trainer, self.transport, self.merger = flat, trainer, transport, merger
        self.self_weight = self_weight
        self.neighbour_weights = {j: w for j, w in neighbour_weights.items() if j != node_id}
        self.gossip_steps = gossip_steps
        self._received = self._missing = 0

    @property
    def vector(self) -> torch.Tensor:
        return self.flat.vector

    def train(self, round_index: int) -> float:
        self._received = self._missing = 0
        return self.trainer.run_round(round_index)

    def snapshot(self, kind: str, round_index: int, step: int) -> Message:
        """The current vector, copied once and shared read-only by every recipient."""
        return Message(kind, self.id, round_index, step, self.flat.vector.clone())

    def send(self, round_index: int, step: int) -> None:
        """Send a snapshot of the current vector to every neighbour."""
        message = self.snapshot(MODEL, round_index, step)
        for j in self.neighbour_weights:
            self.transport.send(j, message)

    def receive_and_merge(self, round_index: int, step: int) -> None:
        """Wait for this step's vectors, then merge whatever arrived (weights renormalised)."""
        got = self.transport.receive(MODEL, round_index, step, set(self.neighbour_weights))
        senders = sorted(got)
        self._received += len(senders)
        self._missing += len(self.neighbour_weights) - len(senders)
        self.merger(self.flat.vector, self.self_weight, [got[j].vector for j in senders],
                    [self.neighbour_weights[j] for j in senders])

    # Pairwise exchanges (Poisson-clock gossip): the edge's owner requests, the peer answers with
    # its own vector and merges, the owner merges the answer. Both ends weigh the pair 1/2 : 1/2.

    def request_pair(self, peer: int, round_index: int, seq: int) -> None:
        self.transport.send(peer, self.snapshot(PAIR_REQUEST, round_index, seq))

    def answer_pair(self, peer: int, round_index: int, seq: int) -> bool:
        got = self.transport.receive(PAIR_REQUEST, round_index, seq, {peer})
        if peer not in got:
            return self._pair_missing()
        self.transport.send(peer, self.snapshot(PAIR_REPLY, round_index, seq))
        return self._pair_merge(got[peer])

    def finish_pair(self, peer: int, round_index: int, seq: int) -> bool:
        got = self.transport.receive(PAIR_REPLY, round_index, seq, {peer})
        return self._pair_merge(got[peer]) if peer in got else self._pair_missing()

    def _pair_merge(self, message: Message) -> bool:
        self._received += 1
        self.merger(self.flat.vector, 0.5, [message.vector], [0.5])
        return True

    def _pair_missing(self) -> bool:
        self._missing += 1
        return False

    def run_round(self, round_index: int) -> RoundStats:
        loss = self.train(round_index)
        for step in range(self.gossip_steps):
            self.send(round_index, step)
            self.receive_and_merge(round_index, step)
        return self.stats(round_index, loss)

    def stats(self, round_index: int, loss: float) -> RoundStats:
        return RoundStats(round_index, loss, self._received, self._missing)
