"""The transport interface every runtime implements, and the message that travels over it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Message:
    """A flat parameter vector with the header fields a receiver needs to place it.

    `extra` carries optional, extensible header fields (peer views for sampling, for example);
    receivers ignore keys they do not know.
    """
    kind: str
    sender: int
    round: int
    step: int
    vector: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


class Transport(ABC):
    """Point-to-point delivery between node ids, plus a bounded wait for one gossip step."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.messages_sent = 0
        # Incoming messages and connections dropped, by reason (bad_checksum, late, connection_idle, ...).
        self.rejected: Counter[str] = Counter()
        self.send_drops: Counter[int] = Counter()  # outgoing messages dropped at a full queue, by destination
        self.resent: Counter[int] = Counter()  # messages sent again after a connection came back, by destination

    @abstractmethod
    def send(self, dst: int, message: Message) -> None:
        """Queue `message` for node `dst`; never blocks on a slow or dead peer."""

    @abstractmethod
    def receive(self, kind: str, round_index: int, step: int, senders: set[int]) -> dict[int, Message]:
        """Messages of this (kind, round, step) from `senders`; returns when all arrived or the
        step's deadline passed, so a missing sender is simply absent from the result."""

    @abstractmethod
    def claimed_rounds(self) -> dict[int, int]:
        """For each neighbour, the newest round it claimed in a message that passed validation
        and the sender checks (also one dropped as late or too far ahead), after taking in
        without waiting what is already queued: how a node that was down learns where its
        neighbours are. Claims, not facts: without authentication anyone can claim any round."""

    def drain(self, kind: str) -> dict[int, Message]:
        """Without waiting: everything of `kind` that arrived since the last drain, the newest
        message per sender (asynchronous gossip merges what is there and never blocks)."""
        raise NotImplementedError(f"{type(self).__name__} does not support asynchronous gossip")

    def _count(self, message: Message) -> None:
        self.bytes_sent += message.nbytes
        self.messages_sent += 1

    def close(self) -> None:
        """Release sockets or queues."""
