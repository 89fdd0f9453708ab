"""A hand-written ZMTP 3.1 client for what a libzmq socket cannot be made to send (a message that
never ends, a frame header announcing any size). Torch-free, so a flooding child starts fast."""

import socket
import struct


def zmtp_connect(endpoint: str) -> socket.socket:
    """A plain TCP socket that has sent a ZMTP 3.1 NULL greeting and READY as a DEALER: libzmq
    takes it for a peer, though it never reads and sends only what a test writes."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31))
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return sock


def zmtp_frame(payload: bytes, more: bool) -> bytes:
    """One ZMTP 3 message frame (long form when over 255 bytes)."""
    flags = (1 if more else 0) | (2 if len(payload) > 255 else 0)
    size = struct.pack(">Q", len(payload)) if len(payload) > 255 else bytes([len(payload)])
    return bytes([flags]) + size + payload
