"""ZeroMQ transport for node processes: one ROUTER receives everything addressed to this node,
one DEALER per neighbour sends to it. Request/reply between two peers (a pairwise exchange) is a
send of one kind followed by a `receive` of the reply kind from that peer, over the same sockets.

Sending never blocks: each DEALER queues at most `hwm` messages (also while its peer is not
connected yet, so nodes may start in any order), and a message it cannot queue is dropped and
counted in `send_drops`. Queued messages are zero-copy views, so a dead peer pins at most `hwm`
snapshots, which a node shares among all its neighbours.

Receiving treats every peer as possibly hostile (see docs/deployment.md, "Threat model"). Each
message passes, in order: a per-connection rate limit (before any decoding), `wire.decode`, the
kinds this runtime consumes, the sender checks, then the bounded buffer of `inbox.Inbox`.
Whatever fails is dropped and counted in `rejected` by reason, and logged once per peer and
reason with a bounded text; nothing a message does, not even a bug it triggers, escapes a
receive (`internal_error`). A `connections.ConnectionWatcher` bounds the connections
themselves: their number, idleness and the memory libzmq holds for each. Received vectors are
zero-copy views of the received frames.

With `curve`, the ROUTER is a CurveZMQ server whose ZAP handler admits only the listed public
keys, and a message is accepted only if its header's sender owns the key that authenticated the
connection. Not thread-safe: one thread per transport, as ZeroMQ sockets require.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import wire
from .base import Message, Transport
from .connections import ConnectionWatcher
from .inbox import Inbox
from .keys import CurveConfig
from .limits import Limits

log = logging.getLogger(__name__)

ZAP_DOMAIN = "gossipfl"
MAX_LOGGED = 1000  # distinct (peer, reason) pairs logged; a reconnecting attacker must not grow it forever
DRAIN_BUDGET_S = 0.5  # the longest `claimed_rounds` spends taking in what is queued, even under a flood
DRAIN_GAP_MS = 5  # how long a drain waits for libzmq to refill the ROUTER's queue from the kernel
KEEPALIVE_PROBES = 3  # unanswered TCP keepalive probes before the kernel drops a connection


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
                 context: zmq.Context | None = None, hwm: int = 4, kinds: Collection[str] = wire.VECTOR_KINDS,
                 limits: Limits = Limits()):
        """`peers` maps each neighbour id to the endpoint its ROUTER binds. `hwm` bounds the
        messages queued per neighbour in each direction. `kinds` are the message kinds this
        node's runtime receives; any other kind is dropped on arrival. `limits` bound what peers
        can make this node buffer, hold or decode (defaults derive from `hwm`, the message size
        and the number of peers). A given `context` is not terminated by `close`; with `curve`
        it must not host another ZAP authenticator (one per context)."""
        super().__init__()
        if node_id in peers:
            raise ValueError(f"node {node_id} lists itself as a peer")
        if not set(kinds) <= wire.KINDS:
            raise ValueError(f"unknown message kinds {sorted(set(kinds) - wire.KINDS)}; known: {sorted(wire.KINDS)}")
        self.node_id, self.peers, self.kinds = node_id, dict(peers), frozenset(kinds)
        self.layout_hash, self.vector_size, self.deadline_s, self.hwm = layout_hash, vector_size, deadline_s, hwm
        self.max_message_bytes = vector_size * 4 if max_message_bytes is None else max_message_bytes
        self.limits = limits.resolve(hwm, self.max_message_bytes + wire.MAX_HEADER_BYTES, len(self.peers))
        self._inbox = Inbox(self.limits.buffered_per_sender, self.limits.rounds_ahead, self.limits.buffer_ttl_s,
                            lambda reason, sender: self._reject(reason, f"node {sender}"))
        self._epoch = 0  # receive calls so far: what refills each connection's token bucket
        self._logged: set[tuple[str, str]] = set()
        self._last_sent: tuple[Message, list] | None = None
        self._owns_context = context is None
        self.context = zmq.Context(io_threads=1) if context is None else context
        self._auth, self._listed, self._node_of_key = None, None, {}
        self._router, self._dealers, self._connections = None, {}, None
        try:
            self._open_router(bind, curve)
            self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._connections = ConnectionWatcher(
                self._router, max_connections=self.limits.max_connections,
                max_per_address=self.limits.max_connections_per_address,
                max_pending_bytes=self.limits.max_pending_bytes, idle_timeout_s=self.limits.idle_timeout_s,
                burst=self.limits.burst, curve=curve is not None)
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
        self._set_keepalive(router)
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

    def _set_keepalive(self, sock: zmq.Socket) -> None:
        """TCP keepalive finds dead peers (a host that vanished without closing its connections).
        Not ZMTP heartbeats: libzmq stops reading a connection whose queue is full, misses the
        pongs and drops it, losing the messages in flight of a peer whose receiver is merely busy."""
        sock.tcp_keepalive = 1
        sock.tcp_keepalive_idle = sock.tcp_keepalive_intvl = self.limits.keepalive_s
        sock.tcp_keepalive_cnt = KEEPALIVE_PROBES

    def _open_dealer(self, peer: int, endpoint: str, curve: CurveConfig | None) -> None:
        dealer = self._dealers[peer] = self.context.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.sndhwm = self.hwm
        self._set_keepalive(dealer)
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
        """See `Transport.receive`. Waits for each expected sender's own message: a receive ends
        early for a missing sender only when that sender's pinned connection (see `inbox`)
        already carried a later message. `rejected` is brought up to date here."""
        if kind not in self.kinds:
            raise ValueError(f"this transport receives {sorted(self.kinds)}, not {kind!r}")
        self._epoch += 1
        self._inbox.begin(kind, round_index, step, senders)
        deadline = time.monotonic() + self.deadline_s
        while not self._inbox.complete():
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            if not self._router.poll(remaining_ms):
                self._connections.drained_at = time.monotonic()
                break
            self._take()
        got = self._inbox.end()
        self._update_counts()
        return got

    def claimed_rounds(self) -> dict[int, int]:
        """See `Transport.claimed_rounds`; first takes in what is already queued (for at most
        DRAIN_BUDGET_S), waiting only for the gaps while libzmq refills its queue."""
        give_up = time.monotonic() + DRAIN_BUDGET_S
        while self._router.poll(DRAIN_GAP_MS):
            self._take()
            if time.monotonic() > give_up:
                break
        else:
            self._connections.drained_at = time.monotonic()
        self._update_counts()
        return self._inbox.claimed_rounds()

    def _take(self) -> None:
        """Receive one message and admit or drop it; nothing it causes escapes."""
        routing_id, *frames = self._router.recv_multipart(copy=False)
        try:
            self._admit(routing_id, frames)
        except Exception as error:  # a bug reached by a message must cost that message only
            self._reject("internal_error", f"connection {routing_id.bytes.hex()}",
                         f"{type(error).__name__}: {wire.excerpt(str(error))}")

    def _admit(self, routing_id: zmq.Frame, frames: list[zmq.Frame]) -> None:
        connection = self._connections.delivered(routing_id, frames)
        if not connection.take_token(self._epoch, self.limits.burst):
            return self._reject("rate_limited", f"connection {routing_id.bytes.hex()}")
        try:
            message = wire.decode(frames, self.layout_hash, self.vector_size, self.max_message_bytes)
        except wire.WireError as error:
            return self._reject(error.reason, f"connection {routing_id.bytes.hex()}", str(error))
        peer = f"node {message.sender}"
        if message.kind not in self.kinds:
            return self._reject("unexpected_kind", peer, message.kind)
        if message.sender not in self.peers:
            return self._reject("unknown_sender", peer)
        if self._node_of_key and self._node_of_key.get(frames[0].get("User-Id")) != message.sender:
            return self._reject("spoofed_sender", peer)
        connection.valid_at = time.monotonic()
        self._inbox.offer(message, routing_id.bytes, authenticated=bool(self._node_of_key))

    def _update_counts(self) -> None:
        """Copy in the counts kept by other threads (under reasons only they use)."""
        for reason, count in self._connections.counts().items():
            self.rejected[reason] = count
        if self._listed is not None and self._listed.denied:
            self.rejected["unauthenticated"] = self._listed.denied

    def _reject(self, reason: str, peer: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        if (peer, reason) not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add((peer, reason))
            log.warning("node %d dropped a message from %s: %s", self.node_id, peer, (detail or reason)[:200])

    def close(self, linger_s: float = 1.0) -> None:
        """Close the sockets, giving queued sends up to `linger_s` to leave (a node's last message
        is often still queued when it finishes); stop the watcher and the authenticator; end an
        owned context."""
        if self._connections is not None:
            self._connections.close()
        for socket in self._dealers.values():
            socket.close(linger=int(linger_s * 1000))
        if self._router is not None:
            self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._owns_context:
            self.context.term()
