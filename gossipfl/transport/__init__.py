"""How nodes exchange messages. A Node sees only the `Transport` interface; the memory transport
serves the in-process simulator and `zmq.ZmqTransport` serves node processes."""

from .base import Message, Transport
from .memory import MemoryNetwork, MemoryTransport

__all__ = ["Message", "Transport", "MemoryNetwork", "MemoryTransport"]
