"""ZeroMQ transport for node processes: one ROUTER receives everything addressed to this node,
one DEALER per neighbour sends to it. Request/reply between two peers (a pairwise exchange) is a
send of one kind followed by a `receive` of the reply kind from that peer, over the same sockets.

Sending never blocks: each DEALER queues at most `hwm` messages (also while its peer is not
connected yet, so nodes may start in any order), and a message it cannot queue is dropped and
counted in `send_drops`. Queued messages are zero-copy views, so a dead peer pins at most `hwm`
snapshots, which a node shares among all its neighbours.

Receiving validates every message (`wire.decode`), waits at most `deadline_s` per call,
keeps messages of future steps for later calls (bounded), and drops and counts in `rejected`
whatever is invalid, late, duplicated, unexpected, from an unknown or impostor sender, or beyond
the buffer. Received vectors are zero-copy views of the received frames.

With `curve`, the ROUTER is a CurveZMQ server whose ZAP handler admits only the listed public
keys, and a message is accepted only if its header's sender owns the key that authenticated the
connection. Not thread-safe: one thread per transport, as ZeroMQ sockets require.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import wire
from .keys import CurveConfig
from .base import Message, Transport

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (kind, round, step)
ZAP_DOMAIN = "gossipfl"
MAX_LOGGED = 1000  # distinct (peer, reason) pairs logged; a reconnecting attacker must not grow it forever


class _ListedKeys:
    """ZAP credentials provider that admits exactly the listed Z85 public keys. It runs in the
    authenticator's thread, so it only counts; the transport copies the count into `rejected`."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if self.denied == 0:
            log.warning("refused a CURVE handshake from an unlisted key %s", key.decode("ascii", "replace"))
        self.denied += 1
        return False


class ZmqTransport(Transport):
    def __init__(self, node_id: int, bind: str, peers: Mapping[int, str], layout_hash: str, vector_size: int, *,
                 deadline_s: float = 5.0, max_message_bytes: int | None = None, curve: CurveConfig | None = None,
                 context: zmq.Context | None = None, hwm: int = 4, max_buffered: int | None = None):
        """`peers` maps each neighbour id to the endpoint its ROUTER binds. `hwm` bounds the
        messages queued per neighbour in each direction; `max_buffered` (default `hwm` per peer)
        bounds messages kept for future steps. A given `context` is not terminated by `close`;
        with `curve` it must not host another ZAP authenticator (one per context)."""
        super().__init__()
        if node_id in peers:
            raise ValueError(f"node {node_id} lists itself as a peer")
        self.node_id, self.peers = node_id, dict(peers)
        self.layout_hash, self.vector_size, self.deadline_s, self.hwm = layout_hash, vector_size, deadline_s, hwm
        self.max_message_bytes = vector_size * 4 if max_message_bytes is None else max_message_bytes
        self.max_buffered = hwm * len(self.peers) if max_buffered is None else max_buffered
        self.send_drops: Counter[int] = Counter()  # messages dropped at a full send queue, by destination
        self._inbox: dict[Key, dict[int, Message]] = {}
        self._done: dict[str, tuple[int, int]] = {}  # per kind, the last (round, step) received
        self._logged: set[tuple[str, str]] = set()
        self._last_sent: tuple[Message, list] | None = None
        self._owns_context = context is None
        self.context = zmq.Context(io_threads=1) if context is None else context
        self._auth, self._listed, self._node_of_key = None, None, {}
        self._router, self._dealers = None, {}
        try:
            self._open_router(bind, curve)
            self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            for peer, endpoint in self.peers.items():
                self._open_dealer(peer, endpoint, curve)
        except BaseException:  # e.g. the address is taken: leave no thread or socket behind
            self.close()
            raise

    def _open_router(self, bind: str, curve: CurveConfig | None) -> None:
        router = self._router = self.context.socket(zmq.ROUTER)
        router.linger = 0
        router.rcvhwm = self.hwm
        # libzmq drops a connection that sends a frame above this size before it is buffered.
        router.maxmsgsize = self.max_message_bytes + wire.MAX_HEADER_BYTES
        if curve is not None:
            self._listed = _ListedKeys(set(curve.allowed_public_keys.values()))
            self._node_of_key = {key.decode("ascii"): node for node, key in curve.allowed_public_keys.items()}
            self._auth = ThreadAuthenticator(self.context, log=log.getChild("zap"))
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._listed)
            router.zap_domain = ZAP_DOMAIN.encode()
            router.curve_server = True
            router.curve_secretkey = curve.secret_key
        router.bind(bind)

    def _open_dealer(self, peer: int, endpoint: str, curve: CurveConfig | None) -> None:
        dealer = self._dealers[peer] = self.context.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.sndhwm = self.hwm
        if curve is not None:
            if peer not in curve.allowed_public_keys:
                raise ValueError(f"no public key listed for peer {peer}")
            dealer.curve_secretkey = curve.secret_key
            dealer.curve_publickey = curve.public_key
            dealer.curve_serverkey = curve.allowed_public_keys[peer]
        dealer.connect(endpoint)

    def send(self, dst: int, message: Message) -> None:
        if dst not in self._dealers:
            raise ValueError(f"node {dst} is not a peer of node {self.node_id}")
        dealer, frames = self._dealers[dst], self._encoded(message)
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # libzmq learns lazily that its I/O thread has drained the queue; reading EVENTS
            # applies those updates, so a queue that only looked full accepts the retry.
            dealer.getsockopt(zmq.EVENTS)
            try:
                dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.send_drops[dst] += 1
                return
        self._count(message)

    def _encoded(self, message: Message) -> list:
        """Encode once per message: a node sends the same snapshot to every neighbour, and the
        checksum over a large vector is the main cost of encoding."""
        if self._last_sent is None or self._last_sent[0] is not message:
            self._last_sent = (message, wire.encode(message, self.layout_hash))
        return self._last_sent[1]

    def receive(self, kind: str, round_index: int, step: int, senders: set[int]) -> dict[int, Message]:
        """See `Transport.receive`. Afterwards, messages of this kind for this or an earlier
        (round, step) count as late; `rejected["unauthenticated"]` is brought up to date here."""
        current = (kind, round_index, step)
        self._drop_late(current)
        box = self._inbox.setdefault(current, {})
        deadline = time.monotonic() + self.deadline_s
        while not senders <= box.keys() and not self._moved_on(current, senders - box.keys()):
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._router.poll(remaining_ms):
                break
            connection, *frames = self._router.recv_multipart(copy=False)
            self._admit(connection.bytes, frames, current)
        del self._inbox[current]
        self._done[kind] = max(self._done.get(kind, (round_index, step)), (round_index, step))
        for sender in box.keys() - senders:
            self._reject("unexpected_sender", f"node {sender}")
        if self._listed is not None and self._listed.denied:
            self.rejected["unauthenticated"] = self._listed.denied
        return {sender: message for sender, message in box.items() if sender in senders}

    def _moved_on(self, current: Key, missing: set[int]) -> bool:
        """True when every missing sender already sent a later message of this kind: ZeroMQ keeps
        each connection in order, so what they sent for `current` would have arrived first."""
        kind, position = current[0], current[1:]
        later = {s for (k, *pos), box in self._inbox.items() if k == kind and tuple(pos) > position for s in box}
        return missing <= later

    def newest_round(self, kind: str) -> int:
        """See `Transport.newest_round`; first takes in, without waiting, what is already queued."""
        while self._router.poll(0):
            connection, *frames = self._router.recv_multipart(copy=False)
            self._admit(connection.bytes, frames, None)
        return max((r for k, r, _ in self._inbox if k == kind), default=-1)

    def _admit(self, connection: bytes, frames: list[zmq.Frame], current: Key | None) -> None:
        """Decode and check one incoming message, then hand it to the current receive, keep it for
        a later one, or drop it with a reason. `current` is None outside a receive."""
        try:
            message = wire.decode(frames, self.layout_hash, self.vector_size, self.max_message_bytes)
        except wire.WireError as error:
            return self._reject(error.reason, f"connection {connection.hex()}", str(error))
        peer = f"node {message.sender}"
        if message.sender not in self.peers:
            return self._reject("unknown_sender", peer)
        if self._node_of_key and self._node_of_key.get(frames[0].get("User-Id")) != message.sender:
            return self._reject("spoofed_sender", peer)
        key = (message.kind, message.round, message.step)
        if key != current and self._is_late(key, current):
            return self._reject("late", peer)
        if message.sender in self._inbox.get(key, {}):
            return self._reject("duplicate", peer)
        if key != current and sum(len(b) for k, b in self._inbox.items() if k != current) >= self.max_buffered:
            return self._reject("buffer_full", peer)
        self._inbox.setdefault(key, {})[message.sender] = message

    def _is_late(self, key: Key, current: Key | None) -> bool:
        kind, position = key[0], key[1:]
        done = self._done.get(kind)
        return ((current is not None and kind == current[0] and position < current[1:])
                or (done is not None and position <= done))

    def _drop_late(self, current: Key) -> None:
        for key in [k for k in self._inbox if k != current and self._is_late(k, current)]:
            for sender in self._inbox.pop(key):
                self._reject("late", f"node {sender}")

    def _reject(self, reason: str, peer: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        if (peer, reason) not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add((peer, reason))
            log.warning("node %d dropped a message from %s: %s", self.node_id, peer, detail or reason)

    def close(self, linger_s: float = 1.0) -> None:
        """Close the sockets, giving queued sends up to `linger_s` to leave (a node's last message
        is often still queued when it finishes); stop the authenticator; end an owned context."""
        for socket in self._dealers.values():
            socket.close(linger=int(linger_s * 1000))
        if self._router is not None:
            self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._owns_context:
            self.context.term()
