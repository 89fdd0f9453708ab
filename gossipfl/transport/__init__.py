"""How nodes exchange messages. A Node sees only the `Transport` interface; the memory transport
serves the in-process simulator and `zmq.ZmqTransport` serves node processes.

The names below load on first use (PEP 562), so `gossipfl keys` can import `transport.keys`
without importing torch (which `base` needs for its vectors).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"Message": ".base", "Transport": ".base", "MemoryNetwork": ".memory", "MemoryTransport": ".memory"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
