"""Accounting of the connections a ROUTER accepts, kept by a watcher thread.

libzmq bounds complete messages per connection (the high-water mark) and single frames
(MAXMSGSIZE), but not a multipart message that never ends (its frames pile up in memory), nor
the number of connections, nor how long an idle one is held. The watcher learns every accepted
connection from the ROUTER's socket monitor (EVENT_ACCEPTED gives its file descriptor), keeps a
duplicate of that descriptor and, every CHECK_INTERVAL_S while bytes arrive (IDLE_INTERVAL_S
while none do), while the node trains as much as while it receives:

- memory: bytes the kernel delivered to libzmq on the connection (TCP_INFO's tcpi_bytes_received
  less what is still queued in the kernel) minus the bytes of complete messages the transport
  took from it (a received frame's ZMQ_SRCFD names its descriptor) is what libzmq holds for it:
  up to a high-water mark of complete messages plus the one in progress. Above
  `max_pending_bytes` the connection is shut down (`connection_memory`): libzmq sees the end of
  the stream, drops the connection and frees the unfinished message. The estimate is exact
  (ZMTP framing included) but for the handshake's few hundred bytes.
- idleness: a connection that delivered no valid message within `idle_timeout_s` of its
  accept, judged at the last moment the transport found nothing queued, is shut down
  (`connection_idle`); a peer that is merely busy is not, since its queued messages count.
- numbers: on each accept beyond `max_connections` in all or `max_per_address` from one remote
  address, connections are shut down (`connection_evicted`): first those that never delivered a
  valid message, then the longest idle by the kernel's clock; never one that delivered a valid
  message from a peer within `idle_timeout_s`.

A connection that ends without a clean close by its peer, other than by a refused handshake or
by the watcher, is counted as `connection_broken`: libzmq dropped it (a frame over MAXMSGSIZE, a
protocol error), TCP keepalive found the peer dead, or the peer reset it. Counts are read with
`counts()`. A connection's token bucket limits how many messages the transport decodes from it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
import struct
import termios
import threading
import time
from collections import Counter
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.02     # while bytes arrive: at loopback speed a message grows ~20 MB meanwhile
IDLE_INTERVAL_S = 0.05      # while none do: each wake-up costs 60 to 160 us of CPU on a small VM
TCP_CLOSE_WAIT = 8          # the peer closed its end cleanly
MAX_ERRORS_LOGGED = 10      # a failure that repeats every check must not flood the log
_TCP_INFO_LEN = 136         # through tcpi_bytes_received (Linux 4.1+)
_LAST_DATA_RECV, _BYTES_RECEIVED = 52, 128  # offsets in struct tcp_info
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED


@dataclass(eq=False)
class Connection:
    """One accepted connection. The transport's I/O thread writes `consumed`, `valid_at` and the
    token bucket; the watcher writes the rest."""
    fd: int
    accepted: float
    tokens: float
    epoch: int = 0                           # the receive call that last refilled `tokens`
    consumed: int = 0                        # wire bytes of complete messages taken from it
    delivered: int = 0                       # bytes libzmq had read from it at the last check
    valid_at: float | None = None            # last valid message from a peer
    sock: socket.socket | None = None        # the watcher's duplicate of libzmq's descriptor
    inode: int = 0
    address: str = ""
    closing: str = ""                        # why the watcher shut it down

    def take_token(self, epoch: int, burst: int, refill: int = 1) -> bool:
        """A message's admission: the bucket holds `burst` and gains `refill` per receive (or
        drain) call; `epoch` counts those calls."""
        if epoch != self.epoch:
            self.tokens, self.epoch = min(burst, self.tokens + (epoch - self.epoch) * refill), epoch
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class _Caps:
    max_connections: int
    max_per_address: int
    max_pending_bytes: int
    idle_timeout_s: float
    burst: int


class ConnectionWatcher:
    def __init__(self, router: zmq.Socket, *, max_connections: int, max_per_address: int,
                 max_pending_bytes: int, idle_timeout_s: float, burst: int, curve: bool):
        """Watch `router`'s accepted connections from a thread of its own; `curve` says how many
        bytes the wire adds to each frame."""
        self.caps = _Caps(max_connections, max_per_address, max_pending_bytes, idle_timeout_s, burst)
        self._frame_overhead = _curve_overhead if curve else _null_overhead
        self._local = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._by_fd: dict[int, Connection] = {}
        self._by_address: dict[str, set[Connection]] = {}
        self._counts: Counter[str] = Counter()
        self.changes = 0  # counts so far, so that a reader can tell whether `counts()` changed
        self._lock = threading.Lock()  # guards _counts against a copy while the watcher counts
        self._handshake_failures = 0
        self.drained_at = math.inf  # when the transport last found nothing queued; inf: it finds nothing now
        self._monitor = router.get_monitor_socket(_EVENTS)  # from here on used by the watcher only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gossipfl-connections", daemon=True)
        self._thread.start()

    # --- called by the transport's thread ---

    def delivered(self, routing_id: zmq.Frame, frames: list[zmq.Frame]) -> Connection:
        """The connection a just received message came over, with its bytes accounted. (A
        transport without descriptors, inproc, has one record for all.)"""
        try:
            fd = routing_id.get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = -1
        record = self._by_fd.get(fd)
        if record is None:  # the watcher has not seen its accept yet, or it just closed
            record = self._by_fd.setdefault(fd, Connection(fd, time.monotonic(), self.caps.burst))
        for frame in frames:
            size = len(frame)
            record.consumed += size + self._frame_overhead(size)
        return record

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for record in list(self._by_fd.values()):
            if record.sock is not None:
                record.sock.close()

    # --- the watcher's thread ---

    def _run(self) -> None:
        next_check, errors = 0.0, 0
        try:
            while not self._stop.is_set():
                wait_ms = max(0, math.ceil((next_check - time.monotonic()) * 1000))  # never a spin
                try:
                    if self._monitor.poll(wait_ms):
                        self._events()
                    if time.monotonic() >= next_check:
                        busy = self._check(time.monotonic())
                        next_check = time.monotonic() + (CHECK_INTERVAL_S if busy else IDLE_INTERVAL_S)
                except Exception:  # the watcher must outlive any one bad event
                    errors += 1
                    if errors <= MAX_ERRORS_LOGGED:
                        log.exception("connection watcher")
        finally:
            self._monitor.close(linger=0)

    def _events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                self._closed(fd)
            elif kind & _HANDSHAKE_FAILED:
                self._handshake_failures += 1  # the disconnect that follows is not "broken"

    def _accepted(self, fd: int) -> None:
        now = time.monotonic()
        record = self._by_fd.setdefault(fd, Connection(fd, now, self.caps.burst))
        if record.sock is not None:  # its disconnect event was lost: the old record is stale
            self._forget(record)
            record = self._by_fd.setdefault(fd, Connection(fd, now, self.caps.burst))
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # already closed by libzmq
            self._by_fd.pop(fd, None)
            return
        if not self._is_ours(sock):  # the descriptor was closed and reused before we looked
            sock.close()
            self._by_fd.pop(fd, None)
            return
        try:
            address = sock.getpeername()[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else ""
        except OSError:  # the peer is gone already (ENOTCONN): nothing left to watch
            sock.close()
            self._by_fd.pop(fd, None)
            return
        record.sock, record.inode, record.accepted = sock, os.fstat(sock.fileno()).st_ino, now
        record.address = address
        self._by_address.setdefault(record.address, set()).add(record)
        self._enforce_caps(record, now)

    def _is_ours(self, sock: socket.socket) -> bool:
        try:
            local = sock.getsockname()
        except OSError:
            return False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return self._local.endswith(f":{local[1]}")
        return sock.family == socket.AF_UNIX and self._local == f"ipc://{local}"

    def _closed(self, fd: int) -> None:
        record = self._by_fd.get(fd)
        if record is None or record.sock is None:
            return
        info = _tcp_info(record.sock)
        if not record.closing and info and info[0] != TCP_CLOSE_WAIT:
            if self._handshake_failures:
                self._handshake_failures -= 1
            else:
                self._count("connection_broken")
        self._forget(record)

    def _forget(self, record: Connection) -> None:
        if self._by_fd.get(record.fd) is record:
            del self._by_fd[record.fd]
        peers = self._by_address.get(record.address, set())
        peers.discard(record)
        if not peers:
            self._by_address.pop(record.address, None)
        if record.sock is not None:
            record.sock.close()

    def _check(self, now: float) -> bool:
        """Apply the memory and idleness rules to every connection; True if any received bytes
        since the last check."""
        caps, busy = self.caps, False
        for record in list(self._by_fd.values()):
            if record.sock is None or record.closing:
                continue
            if not self._still_open(record):  # libzmq closed it and its event was lost
                self._forget(record)
                continue
            delivered = self._delivered(record)
            busy |= delivered is not None and delivered != record.delivered
            record.delivered = delivered or 0
            if delivered is not None and delivered - record.consumed > caps.max_pending_bytes:
                self._shut(record, "connection_memory")
            elif record.valid_at is None and min(self.drained_at, now) - record.accepted > caps.idle_timeout_s:
                self._shut(record, "connection_idle")
        return busy

    def _still_open(self, record: Connection) -> bool:
        try:
            return os.fstat(record.fd).st_ino == record.inode
        except OSError:
            return False

    def _delivered(self, record: Connection) -> int | None:
        """Bytes libzmq has read from the connection: what the kernel received, less what is
        still queued in the kernel (None where the socket is not TCP)."""
        info = _tcp_info(record.sock)
        if info is None:
            return None
        try:
            queued = struct.unpack("i", fcntl.ioctl(record.sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return None
        return struct.unpack_from("<Q", info, _BYTES_RECEIVED)[0] - queued

    def _enforce_caps(self, new: Connection, now: float) -> None:
        caps = self.caps
        for pool, limit in ((list(self._by_address[new.address]), caps.max_per_address),
                            (list(self._by_fd.values()), caps.max_connections)):  # copies: the transport adds records
            live = [r for r in pool if r.sock is not None and not r.closing]
            evictable = sorted((r for r in live if not self._protected(r, now)), key=lambda r: self._rank(r, now))
            for victim in evictable[:max(0, len(live) - limit)]:
                self._shut(victim, "connection_evicted")

    def _protected(self, record: Connection, now: float) -> bool:
        return record.valid_at is not None and now - record.valid_at < self.caps.idle_timeout_s

    def _rank(self, record: Connection, now: float) -> tuple[bool, float]:
        """Eviction order: never valid before once valid, then the longest idle first."""
        info = _tcp_info(record.sock)
        idle_ms = struct.unpack_from("<I", info, _LAST_DATA_RECV)[0] if info else (now - record.accepted) * 1000
        return record.valid_at is not None, -idle_ms

    def _shut(self, record: Connection, reason: str) -> None:
        """End a connection: libzmq reads the end of the stream and drops it; the last close
        then resets it, so the peer learns at once (not at its next zero-window probe)."""
        record.closing = reason
        self._count(reason)
        try:
            record.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            record.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1
            self.changes += 1


def _tcp_info(sock: socket.socket) -> bytes | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    return info if len(info) >= _TCP_INFO_LEN else None


def _null_overhead(size: int) -> int:
    """ZMTP 3 frame header: a flags byte and a 1- or 8-byte size."""
    return 2 if size < 256 else 9


def _curve_overhead(size: int) -> int:
    """A CurveZMQ MESSAGE command around the frame: name, nonce, MAC and flags, then its header."""
    body = size + 33
    return 33 + _null_overhead(body)
