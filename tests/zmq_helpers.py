"""Shared pieces of the ZeroMQ transport tests: endpoints, messages, and fixtures that build
fully connected transports and bare attacker sockets."""

import pytest
import torch
import zmq

from gossipfl.runtimes.launch import free_loopback_addresses
from gossipfl.transport.base import Message
from gossipfl.transport.zmq import ZmqTransport

LAYOUT = "0123456789abcdef"
SIZE = 1000
DEADLINE = 0.3


def free_endpoints(n):
    return [f"tcp://{address}" for address in free_loopback_addresses(n)]


def vector(value, size=SIZE):
    return torch.full((size,), float(value))


def model(sender, round_index, step, value=None, kind="model", size=SIZE):
    return Message(kind, sender, round_index, step, vector(sender if value is None else value, size))


@pytest.fixture
def network():
    """`build(n)` makes n fully connected transports; all are closed after the test, pass or fail."""
    opened = []

    def build(n, curve=None, size=SIZE, **kwargs):
        endpoints = free_endpoints(n)
        for i in range(n):
            peers = {j: endpoints[j] for j in range(n) if j != i}
            opened.append(ZmqTransport(i, endpoints[i], peers, LAYOUT, size, deadline_s=DEADLINE,
                                       curve=curve and curve[i], **kwargs))
        return opened[-n:]

    yield build
    for transport in opened:
        transport.close()


@pytest.fixture
def raw():
    """`raw(endpoint, curve_keys=None)` makes a bare DEALER, as an attacker or buggy peer would.
    The sockets are kept until the test ends: a collected socket would discard its queue."""
    context = zmq.Context()
    sockets = []

    def dealer(endpoint, curve_keys=None, server_key=None):
        sock = context.socket(zmq.DEALER)
        sockets.append(sock)
        sock.linger = 0
        if curve_keys:
            sock.curve_publickey, sock.curve_secretkey = curve_keys
            sock.curve_serverkey = server_key
        sock.connect(endpoint)
        return sock

    yield dealer
    for sock in sockets:
        sock.close(linger=0)
    context.term()
