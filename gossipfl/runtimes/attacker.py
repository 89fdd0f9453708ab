"""What an attacker process sends (evaluation runs with [byzantine] attackers among node processes).

An attacker process knows what every node knows (the graph, the mixing matrix W.json, who the
attackers are) and the vectors it has received; it sends through the same wire format as any
node. Its view of a receiver's honest neighbourhood is the vectors it holds of them (its own
neighbours'), with that receiver's mixing weights: the strongest attack a process can mount
without the global knowledge a simulation gives its attackers.
"""

from __future__ import annotations

import torch

from ..algorithms.attacks import pair_inputs
from ..experiment import Experiment
from ..transport import Message
from .node import Node


class AttackerView:
    def __init__(self, experiment: Experiment, node: Node):
        self.experiment, self.node = experiment, node
        self.attackers = set(experiment.attackers)
        self.honest_neighbours = sorted(j for j in node.neighbour_weights if j not in self.attackers)
        self.known: dict[int, torch.Tensor] = {}  # the newest vector seen of each node

    def learn(self, messages: dict[int, Message]) -> None:
        for sender, message in messages.items():
            self.known[sender] = message.vector

    def sent_to(self, receiver: int, round_index: int, step: int) -> torch.Tensor | None:
        """The vector to send `receiver` now, or None while this node knows nothing of it."""
        if receiver not in self.known:
            return None
        me = self.node
        row = self.experiment.neighbour_weights(receiver)
        senders = sorted(row)
        known = {**self.known, me.id: me.vector}
        weights = torch.tensor([[float(self.experiment.mixing[receiver, receiver]),
                                 *(row[j] if j in known else 0.0 for j in senders)]], dtype=torch.float64)
        received = [known.get(j, me.vector).view(1, -1) for j in senders]
        batch, slots = pair_inputs(round_index, step, self.experiment.cfg.seed, torch.tensor([receiver]),
                                   known[receiver].view(1, -1), received, weights, torch.tensor([senders]),
                                   torch.tensor([[j == me.id for j in senders]]), lambda a: me.round_start[0])
        return me.attack(batch)[0].clone() if len(slots) else None

    def broadcast(self, round_index: int, step: int) -> None:
        """A broadcast step: wait for the honest neighbours' vectors, send each of them its own
        attack vector, then merge what arrived (an attacker does not filter)."""
        me = self.node
        got = me.transport.receive("model", round_index, step, set(self.honest_neighbours))
        self.learn(got)
        me.send_vectors("model", round_index, step, {i: v for i in self.honest_neighbours
                                                     if (v := self.sent_to(i, round_index, step)) is not None})
        senders = sorted(got)
        me.merge([got[j] for j in senders], [me.neighbour_weights[j] for j in senders], round_index, step)
