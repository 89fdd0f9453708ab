"""The multi-host test: `gossipfl deploy init`'s files run with one node process per network
namespace, CurveZMQ on, one host behind an impaired link (tbf cap, delay, jitter, resets); the run
finishes, and since the nodes resend what a reset lost, it loses no step and ends with the
loopback run's accuracies. Needs root (CI runs as root).

The loopback run's accuracies are taken from the in-process engine: test_deploy.py checks that a
loopback run of deploy init's files ends with the engine's vectors (to 1e-6), and four fewer
processes to start keeps this test at about half a minute."""

import socket
import subprocess
import sys
import time

import pytest

import netns
from gossipfl import config
from gossipfl.runtimes.sim import Simulation

N = 4
BAND = 0.1  # beyond the loopback run's range of per-node accuracies, should a step be lost after all (a
# node too slow for its neighbours' wait): that moves a 16-unit model on digits by up to 0.08 after 8
# rounds (seen before nodes resent: 0.621 against a range of 0.686 to 0.788; once, on a loaded machine, 0.463)
ROUNDS = 8
IMPAIRED = netns.Impairment(delay_ms=50, jitter_ms=10, reset_s=1.0, mbit=2)


def tiny(tmp_path):
    return {"name": "lan", "seed": 1, "rounds": ROUNDS, "output": str(tmp_path / "runs"),
            "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"local_steps": 8, "batch_size": 16, "lr": 0.05, "rho": 0.05},
            "gossip": {"steps": 2}, "deploy": {"deadline_s": 2.0, "startup_s": 30.0}}


@pytest.fixture
def ring(tmp_path):
    path = tmp_path / "ring.edgelist"
    path.write_text("".join(f"{i} {(i + 1) % N}\n" for i in range(N)))
    return path


def test_a_deployment_across_namespaces_with_an_impaired_link_matches_loopback(tmp_path, ring):
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    raw = tiny(tmp_path)
    lan = netns.run_on_lan(raw, ring, tmp_path / "lan", N, IMPAIRED)
    reference = Simulation(config.from_dict({**raw, "topology": {"file": str(ring)}, "eval": {"batch_size": 256}}),
                           run_dir=tmp_path / "loopback", progress=False).run()
    assert [s["rounds_completed"] for s in lan.summaries] == [ROUNDS] * N
    assert all(s["rejected"].get("unauthenticated", 0) == 0 for s in lan.summaries)
    resent = [s["resent"] for s in lan.summaries]
    if lan.missing == 0:  # the synchronous schedule is deterministic: loopback's accuracies to the last digit
        assert (min(lan.accuracy), max(lan.accuracy)) == pytest.approx(
            (reference["final_accuracy_min"], reference["final_accuracy_max"]), abs=1e-9), (lan.accuracy, resent)
    low, high = reference["final_accuracy_min"] - BAND, reference["final_accuracy_max"] + BAND
    assert all(low <= a <= high for a in lan.accuracy), (lan.accuracy, low, high, lan.missing, resent)
    # node 0's connections went through the proxy, were reset and came back; its traffic crossed the cap
    assert lan.proxy["resets"] >= 1 and lan.proxy["connections"] > 4 and lan.proxy["bytes"] > 0, lan.proxy
    assert lan.capped_bytes > 0


def test_the_proxy_delays_in_order_and_resets_connections(tmp_path):
    """tests/tcp_proxy.py on loopback (no root needed): an echo through it takes two delays, bytes
    keep their order under jitter, and a reset ends the connection."""
    echo = socket.create_server(("127.0.0.1", 0))
    listen = socket.create_server(("127.0.0.1", 0))
    target, proxy_port = echo.getsockname()[1], listen.getsockname()[1]
    listen.close()
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen([sys.executable, str(netns.PROXY), "--delay-ms", "100", "--jitter-ms", "20",
                                  "--reset-s", "1.5", f"127.0.0.1:{proxy_port}=127.0.0.1:{target}"],
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        netns.wait_ready(log, proxy)
        client = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)  # the reset is due in 1.5 s
        server, _ = echo.accept()
        server.settimeout(5)
        started = time.monotonic()
        for i in range(50):
            client.sendall(bytes([i]) * 100)
            time.sleep(0.002)
        received = b""
        while len(received) < 5000:
            received += server.recv(65536)
        assert received == b"".join(bytes([i]) * 100 for i in range(50))  # in order despite the jitter
        server.sendall(b"x")
        assert client.recv(1) == b"x"
        assert time.monotonic() - started >= 0.16  # >= 2 x (100 - 20) ms: there and back
        with pytest.raises(ConnectionResetError):  # an RST, not a FIN: recv would return b""
            client.recv(1)  # blocks until the reset, 1.5 s after the connection opened
    finally:
        netns.stop_all([proxy], grace=2.0)
        echo.close()
