"""The querying side of the status protocol: ask running nodes how they fare.

A query is a `status` control message sent by a DEALER to a node's ROUTER (the port its
neighbours use); the node's I/O thread answers over the same connection with a `status` message
whose `extra` holds its document (`ZmqTransport.set_status` plus its liveness table and drop
counts). With keys, the querier connects with the operator's key pair (see `keys`), which every
node admits for this and nothing else. A node that does not answer within the timeout (dead,
unreachable, or refusing the key) is reported as None.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
import zmq

from . import wire
from .base import Message
from .keys import CurveConfig

STATUS = "status"
QUERIER = 0  # the sender id a query carries; a node ignores it (a querier is not a node)


def query_status(endpoints: Mapping[int, str], timeout_s: float,
                 curve: CurveConfig | None = None) -> dict[int, dict[str, Any] | None]:
    """Each node's status document, by node id, or None for a node that did not answer within
    `timeout_s` (all nodes are asked at once). With `curve`: the operator's key pair, and each
    node's public key as the server key to expect."""
    context = zmq.Context()
    sockets: dict[zmq.Socket, int] = {}
    answers: dict[int, dict[str, Any] | None] = dict.fromkeys(endpoints)
    try:
        poller = zmq.Poller()
        for node, endpoint in endpoints.items():
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            if curve is not None:
                sock.curve_secretkey, sock.curve_publickey = curve.secret_key, curve.public_key
                sock.curve_serverkey = curve.allowed_public_keys[node]
            sock.connect(endpoint)
            sock.send_multipart(wire.encode(Message(STATUS, QUERIER, 0, 0, torch.empty(0)), wire.NO_LAYOUT),
                                flags=zmq.NOBLOCK)
            sockets[sock] = node
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while any(answer is None for answer in answers.values()):
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            for sock, _ in poller.poll(remaining_ms):
                node = sockets[sock]
                try:
                    reply = wire.decode(sock.recv_multipart(copy=False), wire.NO_LAYOUT, 0, 0)
                except wire.WireError:
                    continue  # not an answer; the node may still send one
                if reply.kind == STATUS and reply.sender == node:
                    answers[node] = reply.extra
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    return answers
