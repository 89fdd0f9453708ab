"""In-process transport: per-node mailboxes in one shared dict. Delivery is instant, so a
simulator that sends for every node before any node receives never waits.

Every message is checked as the wire checks it (wire.check_message: kind, indices, length,
finiteness): one that a node process would drop is dropped here too, and counted in the
receiver's `rejected` under the same reason, so simulations and node processes agree."""

from __future__ import annotations

from collections import defaultdict

from . import wire
from .base import Message, Transport

Key = tuple[str, int, int]  # (kind, round, step)


class MemoryNetwork:
    """The mailboxes of all nodes of one simulation, carrying vectors of `vector_size` elements."""

    def __init__(self, vector_size: int) -> None:
        self.vector_size = vector_size
        self.mailboxes: dict[int, dict[Key, dict[int, Message]]] = defaultdict(lambda: defaultdict(dict))
        self.endpoints: dict[int, MemoryTransport] = {}
        self._checked: tuple[Message | None, str | None] = (None, None)  # a message goes to every neighbour

    def endpoint(self, node: int) -> "MemoryTransport":
        self.endpoints[node] = MemoryTransport(self, node)
        return self.endpoints[node]

    def post(self, dst: int, message: Message) -> None:
        """Check `message` as the wire would, then deliver it, or count its drop at `dst`."""
        if self._checked[0] is not message:
            try:
                wire.check_message(message, self.vector_size)
                self._checked = (message, None)
            except wire.WireError as error:
                self._checked = (message, error.reason)
        reason = self._checked[1]
        if reason is None:
            self.deliver(dst, message)
        elif dst in self.endpoints:
            self.endpoints[dst].rejected[reason] += 1

    def deliver(self, dst: int, message: Message) -> None:
        """Put `message` in `dst`'s mailbox (a timed network delays this)."""
        self.mailboxes[dst][(message.kind, message.round, message.step)][message.sender] = message


class MemoryTransport(Transport):
    def __init__(self, network: MemoryNetwork, node: int):
        super().__init__()
        self.network, self.node = network, node

    def send(self, dst: int, message: Message) -> None:
        self.network.post(dst, message)
        self._count(message)

    def receive(self, kind: str, round_index: int, step: int, senders: set[int]) -> dict[int, Message]:
        box = self.network.mailboxes[self.node].pop((kind, round_index, step), {})
        return {s: m for s, m in box.items() if s in senders}

    def claimed_rounds(self) -> dict[int, int]:
        claims: dict[int, int] = {}
        for (_, round_index, _), box in self.network.mailboxes[self.node].items():
            for sender in box:
                claims[sender] = max(claims.get(sender, -1), round_index)
        return claims

    def drain(self, kind: str) -> dict[int, Message]:
        """See `Transport.drain`."""
        box = self.network.mailboxes[self.node]
        newest: dict[int, Message] = {}
        for key in [k for k in box if k[0] == kind]:
            for sender, message in box.pop(key).items():
                if sender not in newest or (message.round, message.step) > (newest[sender].round, newest[sender].step):
                    newest[sender] = message
        return newest
