"""ZeroMQ transport for node processes: one ROUTER receives everything addressed to this node,
one DEALER per neighbour sends to it. Request/reply between two peers (a pairwise exchange) is a
send of one kind followed by a `receive` of the reply kind from that peer, over the same sockets.

The ROUTER has one reader at a time. The node's thread reads it while it receives (lock-step
gossip: it waits for each neighbour as long as its usual delay justifies, see `liveness`, and
for a suspected one not at all) and while `claimed_rounds` takes in what is queued. Once the
node's thread has left it for HANDOVER_S (it trains, or it gossips asynchronously and only
`drain`s), an I/O thread reads it until the node's thread asks for it back. So messages are
admitted, stamped for the failure detector and status queries answered while the node trains,
and a receive reads the socket itself, with no hand-off between threads per message (measured:
the hand-off cost 50 to 100 us of CPU per message, more than the whole validation of a 0.3 MB
model). Whoever reads admits or drops the message and answers a status query at once.

Sending never blocks: each DEALER queues at most `hwm` messages (also while its peer is not
connected yet, so nodes may start in any order), and a message it cannot queue is dropped and
counted in `send_drops`. Queued messages are zero-copy views, so a dead peer pins at most `hwm`
snapshots (twice that with the copies kept for resending, see below), which a node shares among
all its neighbours.

A connection that drops loses what was in flight on it: in kernel buffers, a NAT, a proxy.
ZeroMQ reconnects but does not resend, so in lock-step gossip the neighbour would wait for those
messages until its deadline. Instead, each DEALER's monitor reports the drop, and this node
resends what that neighbour may still wait for (counted in `resent`): of the last `hwm` messages
sent to it, those sent within `deadline_s` (no receive waits longer) and not before the newest
position it was heard at (a lock-step node that sent its message for a step has finished the
steps before). A copy that had arrived is dropped there as a duplicate or late. The resend is
queued before anything newer, at the first send after the drop or at the new handshake,
whichever comes first: a newer message ahead of it would tell the receiver that the older ones
are not coming (see `inbox`). Monitors are read at every send, by the I/O thread when they
report, and every RECONNECT_CHECK_MS while a receive waits with nothing arriving. Asynchronous
gossip resends nothing: its next message supersedes a lost one, and an old one resent after a
newer one would replace it (`inbox.Latest` keeps the last to arrive).

Receiving treats every peer as possibly hostile (see docs/deployment.md, "Threat model"). Each
message passes, in order: a per-connection rate limit (before any decoding), `wire.decode`, then
either the status query (answered, kept nowhere) or the kinds this runtime consumes, the sender
checks, and the bounded buffer of `inbox.Inbox` (`inbox.Latest` for asynchronous gossip).
Whatever fails is dropped and counted in `rejected` by reason, and logged once per peer and
reason with a bounded text; nothing a message does, not even a bug it triggers, escapes a
receive (`internal_error`). A `connections.ConnectionWatcher` bounds the connections
themselves: their number, idleness and the memory libzmq holds for each. Received vectors are
zero-copy views of the received frames.

With `curve`, the ROUTER is a CurveZMQ server whose ZAP handler admits only the listed public
keys (the nodes' and the operator's status keys), and a message is accepted only if its header's
sender owns the key that authenticated the connection; any admitted key may ask for status. The
public methods are for one thread, the node's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import wire
from .base import Message, Transport
from .connections import ConnectionWatcher
from .inbox import Inbox, Latest
from .keys import CurveConfig
from .limits import Limits
from .liveness import Detection, Liveness, as_document

log = logging.getLogger(__name__)

ZAP_DOMAIN = "gossipfl"
MAX_LOGGED = 1000  # distinct (peer, reason) pairs logged; a reconnecting attacker must not grow it forever
KEEPALIVE_PROBES = 3  # unanswered TCP keepalive probes before the kernel drops a connection
BATCH = 64  # messages a reader takes before it looks at the clock or its stop signal again
MAX_ERRORS_LOGGED = 10  # failures of the I/O thread itself (not of a message) that are logged
RECONNECT_CHECK_MS = 50  # while a receive waits with nothing arriving, how often it looks for reconnections
HANDOVER_S = 0.02  # how long the node's thread leaves the ROUTER alone before the I/O thread reads it
DRAIN_BUDGET_S = 0.5  # the longest `claimed_rounds` spends taking in what is queued, even under a flood
DRAIN_GAP_MS = 5  # how long that waits for libzmq to refill the ROUTER's queue from the kernel
NODE, IO = "node", "io"  # who reads the ROUTER
STATUS = "status"
UP, OWED, RESENT = "up", "owed", "resent"  # a DEALER's link: connected; dropped, resend owed; dropped, resent
EMPTY = torch.empty(0)


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
                 limits: Limits = Limits(), detection: Detection = Detection(), asynchronous: bool = False):
        """`peers` maps each neighbour id to the endpoint its ROUTER binds. `deadline_s` is the
        longest a receive waits (`detection` decides how much of it each neighbour gets).
        `asynchronous`: the node gossips at its own pace and takes messages with `drain`, never
        `receive`. `hwm` bounds the messages queued per neighbour in each direction. `kinds`
        are the message kinds this node's runtime receives; any other kind is dropped on arrival
        (status queries are the transport's own). `limits` bound what peers can make this node
        buffer, hold or decode (defaults derive from `hwm`, the message size and the number of
        peers). A given `context` is not terminated by `close`; with `curve` it must not host
        another ZAP authenticator (one per context)."""
        super().__init__()
        if node_id in peers:
            raise ValueError(f"node {node_id} lists itself as a peer")
        if not set(kinds) <= wire.KINDS:
            raise ValueError(f"unknown message kinds {sorted(set(kinds) - wire.KINDS)}; known: {sorted(wire.KINDS)}")
        self.node_id, self.peers, self.kinds = node_id, dict(peers), frozenset(kinds)
        self.layout_hash, self.vector_size, self.deadline_s, self.hwm = layout_hash, vector_size, deadline_s, hwm
        self.asynchronous = asynchronous
        self.max_message_bytes = vector_size * 4 if max_message_bytes is None else max_message_bytes
        self.limits = limits.resolve(hwm, self.max_message_bytes + wire.MAX_HEADER_BYTES, len(self.peers))
        # Everything below is shared with the I/O thread and guarded by this (reentrant) lock.
        self._lock = threading.Condition()
        self._inbox: Inbox | Latest = Latest() if asynchronous else Inbox(
            self.limits.buffered_per_sender, self.limits.rounds_ahead, self.limits.buffer_ttl_s,
            lambda reason, sender: self._reject(reason, f"node {sender}"))
        self._liveness = Liveness(self.peers, detection, asynchronous)
        self._dropped: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._status: Callable[[], dict[str, Any]] | None = None
        # Receive or drain calls so far: what refills each connection's token bucket, by one
        # (a lock-step neighbour sends one message per step) or, asynchronously, to the brim (a
        # faster neighbour sends several per round of this node's).
        self._epoch = 0
        self._refill = self.limits.burst if asynchronous else 1
        self._last_sent: tuple[Message, list] | None = None
        # The DEALERs, their monitors and what was last sent to each, guarded by `_send_lock`: the
        # node's thread sends, whichever thread reads the ROUTER resends after a reconnection.
        self._send_lock = threading.Lock()
        self._monitors: dict[int, zmq.Socket] = {}  # peer -> its DEALER's monitor
        self._sent_to: dict[int, deque[tuple[float, Message, list]]] = {}  # peer -> its newest sends: when, what, frames
        self._heard_at: dict[tuple[int, str], tuple[int, int]] = {}  # (peer, kind) -> the newest position it sent
        self._links: dict[int, str] = {}  # peer -> UP, OWED or RESENT; absent while it never connected
        self._owns_context = context is None
        self.context = zmq.Context(io_threads=1) if context is None else context
        self._auth, self._listed, self._node_of_key = None, None, {}
        self._router, self._dealers, self._connections = None, {}, None
        self._wake = self._wake_end = self._io = None
        self._reader: str | None = None      # NODE, IO, or None (nobody reads now)
        self._left_at = -math.inf            # when the node's thread last stopped reading
        self._counted: tuple[int, ...] = ()  # the drop counts `rejected` was last brought up to date with
        self._stopping = False
        self._io_errors = 0
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
            self._start_io()
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
            self._listed = _ListedKeys(set(curve.allowed_public_keys.values()) | curve.status_keys)
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
        if not self.asynchronous:
            monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self._monitors[peer] = monitor
        dealer.connect(endpoint)

    def _start_io(self) -> None:
        """The I/O thread, and the pair of sockets by which the node's thread asks for the ROUTER
        back (or stops it). The ROUTER moves between the threads under the lock, the memory
        barrier ZeroMQ asks for when a socket changes threads."""
        address = f"inproc://gossipfl-stop-{id(self)}"
        self._wake_end = self.context.socket(zmq.PAIR)
        self._wake_end.bind(address)
        self._wake = self.context.socket(zmq.PAIR)
        self._wake.connect(address)
        self._io = threading.Thread(target=self._serve, name=f"gossipfl-io-{self.node_id}", daemon=True)
        self._io.start()

    # --- the node's thread ---

    def send(self, dst: int, message: Message) -> None:
        if dst not in self._dealers:
            raise ValueError(f"node {dst} is not a peer of node {self.node_id}")
        frames = self._encoded(message)
        with self._send_lock:
            self._catch_up(dst)
            if self._queue(dst, frames):
                self._sent_to.setdefault(dst, deque(maxlen=self.hwm)).append((time.monotonic(), message, frames))
            else:
                self.send_drops[dst] += 1
                return
        self._count(message)

    def _queue(self, dst: int, frames: list) -> bool:
        """Queue `frames` on `dst`'s DEALER without blocking; False when its queue is full."""
        dealer = self._dealers[dst]
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # libzmq learns lazily that its I/O thread has drained the queue; reading EVENTS
            # applies those updates, so a queue that only looked full accepts the retry.
            dealer.getsockopt(zmq.EVENTS)
            try:
                dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
        return True

    def _encoded(self, message: Message) -> list:
        """Encode once per message: a node sends the same snapshot to every neighbour, and the
        checksum over a large vector is the main cost of encoding."""
        if self._last_sent is None or self._last_sent[0] is not message:
            self._last_sent = (message, wire.encode(message, self.layout_hash))
        return self._last_sent[1]

    def receive(self, kind: str, round_index: int, step: int, senders: set[int]) -> dict[int, Message]:
        """See `Transport.receive`. Waits for each expected neighbour that is not suspected, as
        long as `liveness` gives it (at most `deadline_s`); a receive also ends early for a
        neighbour whose pinned connection (see `inbox`) already carried a later message.
        `rejected` is brought up to date here."""
        if self.asynchronous:
            raise ValueError("an asynchronous transport takes messages with drain(), not receive()")
        self._check_kind(kind)
        key = (kind, round_index, step)
        with self._reading():
            with self._lock:
                self._epoch += 1
                self._inbox.begin(kind, round_index, step, senders)
                start = self._liveness.begin(key, self.deadline_s)
                until = self._waits_until(start)
            while until is not None:
                remaining_ms = math.ceil((until - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    break
                if not self._take_one(min(remaining_ms, RECONNECT_CHECK_MS)):
                    self._resend_after_reconnections()  # maybe what this node waits for waits for it
                with self._lock:
                    until = self._waits_until(start)
            with self._lock:
                got = self._inbox.end()
                self._liveness.end(got, senders)
                self._update_counts()
        return got

    def _waits_until(self, start: float) -> float | None:
        """When the receive that started at `start` stops waiting for the neighbours it still
        waits for; None when it waits for none. Under the lock."""
        waits = [self._liveness.timeout(s, self.deadline_s) for s in self._inbox.waiting
                 if s in self.peers and self._liveness.waits_for(s)]
        return start + max(waits) if waits else None

    def drain(self, kind: str) -> dict[int, Message]:
        """See `Transport.drain`: takes what the I/O thread admitted, without waiting. `rejected`
        is brought up to date here."""
        if not self.asynchronous:
            raise ValueError("drain() is for asynchronous gossip: make the transport with asynchronous=True")
        self._check_kind(kind)
        with self._lock:
            self._epoch += 1
            got = self._inbox.take(kind)
            self._liveness.drained(self.deadline_s)
            self._update_counts()
        return got

    def claimed_rounds(self) -> dict[int, int]:
        """See `Transport.claimed_rounds`; first takes in what is already queued (for at most
        DRAIN_BUDGET_S), waiting only for the gaps while libzmq refills its queue."""
        with self._reading():
            give_up = time.monotonic() + DRAIN_BUDGET_S
            while self._router.poll(DRAIN_GAP_MS):
                self._take_queued()
                if time.monotonic() > give_up:
                    break
            else:
                self._connections.drained_at = math.inf
        with self._lock:
            self._update_counts()
            return self._inbox.claimed_rounds()

    def liveness(self) -> dict[int, dict[str, Any]]:
        """Per neighbour: state ("alive" or "suspected"), delay_s, wait_s, misses, heard_s_ago
        (see `liveness.Liveness.snapshot`)."""
        with self._lock:
            return self._liveness.snapshot(self.deadline_s)

    def set_status(self, status: Callable[[], dict[str, Any]]) -> None:
        """What this node answers a status query with, besides its id, liveness table and
        `rejected` counts. Called by whichever thread reads the ROUTER (the I/O thread while the node
        trains), so it should only read; it returns a dict of msgpack
        values (str keys; ints, floats, strs, bools, None, lists, maps)."""
        self._status = status

    def _check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(f"this transport receives {sorted(self.kinds)}, not {kind!r}")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """The node's thread reads the ROUTER for the duration, taking it back from the I/O
        thread if that one reads it."""
        with self._lock:
            if self._reader == IO:
                self._wake.send(b"")
                while self._reader == IO:
                    self._lock.wait()
            self._reader = NODE
        try:
            yield
        finally:
            with self._lock:
                self._reader, self._left_at = None, time.monotonic()

    # --- the I/O thread ---

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self._router, self._wake_end, *self._monitors.values()):
            poller.register(sock, zmq.POLLIN)
        try:
            while self._await_turn():
                while self._wake_end not in (ready := dict(poller.poll())):
                    try:
                        if self._router in ready:
                            self._take_queued()
                        if ready.keys() - {self._router}:  # the rest are the DEALERs' monitors
                            self._resend_after_reconnections()
                    except Exception:  # the thread must outlive any failure; a message's own are caught below
                        self._io_errors += 1
                        if self._io_errors <= MAX_ERRORS_LOGGED:
                            log.exception("node %d: I/O thread", self.node_id)
                self._wake_end.recv()
                with self._lock:  # straight to the node's thread, which asked for it
                    self._reader = NODE
                    self._lock.notify_all()
        finally:
            self._wake_end.close(linger=0)

    def _await_turn(self) -> bool:
        """Until the node's thread has left the ROUTER alone for HANDOVER_S; then the I/O thread
        reads it (True), unless the transport closes (False)."""
        with self._lock:
            while not self._stopping:
                if self._reader is None and time.monotonic() - self._left_at >= HANDOVER_S:
                    self._reader = IO
                    return True
                self._lock.wait(HANDOVER_S)
            return False

    # --- whichever thread reads the ROUTER ---

    def _take_one(self, timeout_ms: int) -> bool:
        """Wait at most `timeout_ms` for one message and admit it: a blocking receive, cheaper
        than a poll and a receive (the node's thread only). False when none came."""
        self._router.setsockopt(zmq.RCVTIMEO, timeout_ms)  # a quarter of the cost of `rcvtimeo =`
        try:
            frames = self._recv_frames(0)
        except zmq.Again:
            self._connections.drained_at = math.inf  # nothing came
            return False
        if self._connections.drained_at == math.inf:
            self._connections.drained_at = time.monotonic()
        self._admit_safely(frames)
        return True

    def _take_queued(self) -> None:
        """Admit what is queued, at most BATCH messages (then the reader looks at its clock or
        stop signal again)."""
        if self._connections.drained_at == math.inf:
            self._connections.drained_at = time.monotonic()
        for _ in range(BATCH):
            try:
                frames = self._recv_frames(zmq.NOBLOCK)
            except zmq.Again:
                self._connections.drained_at = math.inf  # nothing queued, until the next message
                return
            self._admit_safely(frames)
            if not self._router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._connections.drained_at = math.inf
                return

    def _recv_frames(self, flags: int) -> list[zmq.Frame]:
        """One message's frames, the routing id first. (A frame says whether more follow, which
        spares `recv_multipart`'s socket-option call per frame.)"""
        frames = [self._router.recv(flags, copy=False)]
        while frames[-1].more:
            frames.append(self._router.recv(flags, copy=False))
        return frames

    def _admit_safely(self, frames: list[zmq.Frame]) -> None:
        routing_id, *rest = frames
        try:
            self._admit(routing_id, rest)
        except Exception as error:  # a bug reached by a message must cost that message only
            self._reject("internal_error", f"connection {routing_id.bytes.hex()}",
                         f"{type(error).__name__}: {wire.excerpt(str(error))}")

    def _admit(self, routing_id: zmq.Frame, frames: list[zmq.Frame]) -> None:
        connection = self._connections.delivered(routing_id, frames)
        if not connection.take_token(self._epoch, self.limits.burst, self._refill):
            return self._reject("rate_limited", f"connection {routing_id.bytes.hex()}")
        try:
            message = wire.decode(frames, self.layout_hash, self.vector_size, self.max_message_bytes)
        except wire.WireError as error:
            return self._reject(error.reason, f"connection {routing_id.bytes.hex()}", str(error))
        if message.kind == STATUS:  # from any connection the handshake admitted; it earns no protection
            return self._answer_status(routing_id, message)
        peer = f"node {message.sender}"
        if message.kind not in self.kinds:
            return self._reject("unexpected_kind", peer, message.kind)
        if message.sender not in self.peers:
            return self._reject("unknown_sender", peer)
        if self._node_of_key and self._node_of_key.get(frames[0].get("User-Id")) != message.sender:
            return self._reject("spoofed_sender", peer)
        connection.valid_at = now = time.monotonic()
        with self._lock:
            position, heard = (message.round, message.step), (message.sender, message.kind)
            self._heard_at[heard] = max(self._heard_at.get(heard, position), position)
            self._inbox.offer(message, routing_id.bytes, authenticated=bool(self._node_of_key))
            self._liveness.heard(message.sender, (message.kind, message.round, message.step), now)

    def _resend_after_reconnections(self) -> None:
        """Read every DEALER's monitor, resending to each neighbour whose connection came back."""
        with self._send_lock:
            for peer in self._monitors:
                self._follow_link(peer)

    def _catch_up(self, peer: int) -> None:
        """Before anything newer is queued for `peer` (under `_send_lock`): take in what its
        monitor reported, and queue a resend owed since a drop."""
        self._follow_link(peer)
        if self._links.get(peer) == OWED:
            self._resend(peer, RESENT)

    def _follow_link(self, peer: int) -> None:
        """Take in what `peer`'s DEALER monitor reported (under `_send_lock`). A drop of a
        connection that never completed its handshake (the peer was not listening) lost nothing."""
        monitor = self._monitors.get(peer)
        while monitor is not None and monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = int.from_bytes(monitor.recv()[:2], "little")  # frames: event and value, endpoint
            monitor.recv()
            state = self._links.get(peer)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if state == OWED:
                    self._resend(peer, UP)
                self._links[peer] = UP
            elif state == UP:  # EVENT_DISCONNECTED of a connection that worked
                self._links[peer] = OWED

    def _resend(self, peer: int, state: str) -> None:
        """Queue again what `peer` may still wait for (see the module's docstring); its link is
        `state` after."""
        since = time.monotonic() - self.deadline_s
        for sent_at, message, frames in list(self._sent_to.get(peer, ())):
            if sent_at >= since and (message.round, message.step) >= self._heard_at.get((peer, message.kind), (-1, -1)):
                self.resent[peer] += self._queue(peer, frames)
        self._links[peer] = state

    def _answer_status(self, routing_id: zmq.Frame, request: Message) -> None:
        """Reply over the query's own connection: the status callback's document, this node's
        id, liveness table and drop counts, echoing the request's round and step."""
        document: dict[str, Any] = {}
        try:
            document.update(self._status() if self._status else {})
        except Exception as error:
            document = {"error": f"the status callback failed: {type(error).__name__}"}
            log.warning("node %d: status callback failed: %s", self.node_id, wire.excerpt(str(error)))
        with self._lock:
            document.update(node=self.node_id, liveness=as_document(self._liveness.snapshot(self.deadline_s)),
                            rejected=dict(sorted(self._counts().items())))
        reply = Message(STATUS, self.node_id, request.round, request.step, EMPTY, document)
        try:
            wire.check_message(reply, 0)  # what the querier's decode will check
        except wire.WireError as error:
            reply = Message(STATUS, self.node_id, request.round, request.step, EMPTY,
                            {"node": self.node_id, "error": f"the status document cannot be sent ({error})"})
        try:
            self._router.send_multipart([routing_id, *wire.encode(reply, self.layout_hash)], flags=zmq.NOBLOCK)
        except zmq.Again:  # the querier does not read: its reply is dropped like any unreadable send
            pass

    # --- counts (either thread) ---

    def _counts(self) -> Counter[str]:
        """Drops by reason: this transport's own and those other threads keep (under reasons only they use)."""
        counts = Counter(self._dropped)
        counts.update(self._connections.counts())
        if self._listed is not None and self._listed.denied:
            counts["unauthenticated"] = self._listed.denied
        return counts

    def _update_counts(self) -> None:
        stamp = (self._dropped.total(), self._connections.changes, self._listed.denied if self._listed else 0)
        if stamp != self._counted:  # a receive per message must not copy every count each time
            self._counted = stamp
            for reason, count in self._counts().items():
                self.rejected[reason] = count

    def _reject(self, reason: str, peer: str, detail: str = "") -> None:
        with self._lock:
            self._dropped[reason] += 1
            if (peer, reason) in self._logged or len(self._logged) >= MAX_LOGGED:
                return
            self._logged.add((peer, reason))
        log.warning("node %d dropped a message from %s: %s", self.node_id, peer, (detail or reason)[:200])

    def close(self, linger_s: float = 1.0) -> None:
        """Stop the I/O thread; close the sockets, giving queued sends up to `linger_s` to leave (a
        node's last message is often still queued when it finishes); stop the watcher and the
        authenticator; end an owned context."""
        if self._io is not None:
            with self._lock:
                self._stopping = True
                if self._reader == IO:
                    self._wake.send(b"")
                self._lock.notify_all()
            self._io.join()
        elif self._wake_end is not None:
            self._wake_end.close(linger=0)
        if self._wake is not None:
            self._wake.close(linger=0)
        self._io = self._wake = self._wake_end = None  # a second close only closes closed sockets
        if self._connections is not None:
            self._connections.close()
        for monitor in self._monitors.values():  # no resend here: a finished neighbour's closing also drops links
            monitor.close(linger=0)
        self._monitors.clear()
        for socket in self._dealers.values():
            socket.close(linger=int(linger_s * 1000))
        if self._router is not None:
            self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._owns_context:
            self.context.term()
