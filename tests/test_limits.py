"""The transport's limits: derived defaults, the deploy fields that set them, and the open-file
limit a node raises at start."""

import os
import subprocess
import sys
import textwrap

import pytest

from gossipfl import config
from gossipfl.transport.limits import FD_HEADROOM, FDS_PER_CONNECTION, Limits, open_file_limit, raise_open_file_limit


def test_defaults_derive_from_the_queue_message_size_and_peers():
    limits = Limits().resolve(hwm=4, frame_bytes=1_000_000, peers=3)
    assert (limits.buffered_per_sender, limits.burst) == (4, 16)
    assert limits.max_connections_per_address == 10  # all neighbours of a one-machine launch, twice
    assert limits.max_pending_bytes == 5 * 1_000_000 + (1 << 20)
    assert limits.max_connections == min(4 * 3 + 64, (open_file_limit() - FD_HEADROOM) // FDS_PER_CONNECTION)


def test_given_values_are_kept_but_connections_stay_within_the_open_file_limit():
    limits = Limits(buffered_per_sender=1, burst=2, max_connections=10**9, max_connections_per_address=3,
                    max_pending_bytes=5).resolve(hwm=4, frame_bytes=100, peers=2)
    assert (limits.buffered_per_sender, limits.burst, limits.max_connections_per_address,
            limits.max_pending_bytes) == (1, 2, 3, 5)
    assert limits.max_connections * FDS_PER_CONNECTION <= open_file_limit() - FD_HEADROOM


@pytest.mark.parametrize("field, value", [("rounds_ahead", -1), ("buffer_ttl_s", 0.0), ("max_connections", -5),
                                          ("max_connections_per_address", -1), ("idle_timeout_s", -1.0),
                                          ("keepalive_s", 0)])
def test_deploy_limits_are_validated(field, value):
    with pytest.raises(config.ConfigError, match=f"deploy.{field}"):
        config.from_dict({"deploy": {field: value}})


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    script = textwrap.dedent("""
        import resource
        from gossipfl.transport.limits import raise_open_file_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": os.getcwd()}, check=True).stdout.split()
    soft, hard = map(int, out)
    assert soft == hard > 256
    assert raise_open_file_limit() >= 256  # in this process: never lowered


def test_a_connection_whose_peer_is_gone_before_the_watcher_looks_is_forgotten_not_fatal():
    """A peer that resets its connection between libzmq's accept and the watcher's look made
    getpeername raise ENOTCONN, which ended the watcher thread."""
    import socket
    import struct

    import zmq

    from gossipfl.transport.connections import ConnectionWatcher

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("tcp://127.0.0.1:*")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    watcher = ConnectionWatcher(router, max_connections=8, max_per_address=8, max_pending_bytes=1 << 20,
                                idle_timeout_s=5.0, burst=4, curve=False)
    try:
        watcher._local = f"tcp://127.0.0.1:{server.getsockname()[1]}"  # the reset socket counts as the router's
        client = socket.socket()
        client.connect(server.getsockname())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset: the accepted end is no longer connected
        accepted, _ = server.accept()
        watcher._accepted(accepted.fileno())
        assert accepted.fileno() not in watcher._by_fd
        accepted.close()
    finally:
        watcher.close()
        server.close()
        router.close()
        context.term()
