"""Issue 7's attacks against real node processes on loopback, from a rogue ZeroMQ socket and a raw
ZMTP client: every node runs to the configured last round, its rounds keep their usual length
after the attack, its final model is finite and within the clean run's accuracy band, and each
drop is counted under its own reason."""

import json
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from gossipfl.experiment import Experiment
from gossipfl.runtimes.launch import start_node
from gossipfl.runtimes.process import node_dir
from gossipfl.transport import wire
from gossipfl.transport.base import Message
from process_helpers import deployed, read_rows, wait_for
from zmtp import zmtp_connect, zmtp_frame

ROUNDS = 10
DEADLINE = 4.0  # a node that waited out a deadline shows as a round that much over the clean run's


def run(cfg, run_dir, procs, attack=None):
    """Start the nodes, mount `attack(cfg)` once node 0 has finished two rounds, wait for the end."""
    deployment_cfg, path = deployed(cfg, run_dir)
    procs += [start_node(path, run_dir, i) for i in range(cfg.topology.nodes)]
    if attack is not None:
        wait_for(lambda: len(read_rows(run_dir, 0)) >= 2, 90, "node 0 to finish two rounds")
        attack(deployment_cfg)
    for i, proc in enumerate(procs):
        assert proc.wait(120) == 0, (node_dir(run_dir, i) / "node.log").read_text()[-3000:]
    return deployment_cfg


def summaries(run_dir, n):
    return [json.loads((node_dir(run_dir, i) / "summary.json").read_text()) for i in range(n)]


@pytest.fixture
def small(small_config):
    return lambda **kw: small_config(topology__nodes=4, rounds=ROUNDS, train__local_steps=20, gossip__steps=2,
                                     deploy__deadline_s=DEADLINE, **kw)


def test_every_attack_leaves_every_node_running_to_the_end(small, tmp_path, processes):
    clean = run(small(), tmp_path / "clean", processes)
    clean_acc = [s["rounds_completed"] for s in summaries(tmp_path / "clean", 4)]
    assert clean_acc == [ROUNDS] * 4
    clean_rows = [read_rows(tmp_path / "clean", i)[-1] for i in range(4)]
    usual = max(r["round_seconds"] for i in range(4) for r in read_rows(tmp_path / "clean", i))
    processes.clear()

    def attack(deployed):
        target = f"tcp://{deployed.deploy.addresses[0]}"
        layout = Experiment(deployed).layout
        context = zmq.Context()
        rogue = context.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.connect(target)
        ahead = len(read_rows(tmp_path / "attacked", 0)) + 1  # a round node 0 has not reached
        idle, endless = [], None
        try:
            nested = b"\x81" + msgpack.packb("version") + b"\x91" * 1000 + b"\x01"  # a list 1,000 deep
            rogue.send_multipart([nested, b""])  # once a RecursionError that ended the node
            rogue.send_multipart([b"\x85" * 60_000, b""])  # a 60 KB bad header
            for step in range(8):  # pings nothing consumes, for future steps
                rogue.send_multipart(wire.encode(Message("ping", 1, ahead, step, torch.empty(0)), layout.digest()))
            rogue.send_multipart(wire.encode(Message("model", 1, 2**31 - 1, 0, torch.zeros(layout.size)),
                                             layout.digest()))  # the round that once ended the run
            rogue.send_multipart(wire.encode(Message("model", 3, ahead, 1, torch.zeros(layout.size)),
                                             layout.digest()))  # a later step "from" node 3
            rogue.send_multipart(wire.encode(Message("model", 1, ahead, 0, torch.full((layout.size,), 1e30)),
                                             layout.digest()))  # finite, and poison after a merge
            # before the floods below, which may evict this connection with what is unread on it:
            # node 0 has counted the far-ahead round and merged (guarded) the 1e30 vector
            wait_for(lambda: (lambda row: row.get("rejected", {}).get("too_far_ahead", 0) >= 1
                              and row.get("flagged", {}).get("1", 0) >= 1)(
                (read_rows(tmp_path / "attacked", 0) or [{}])[-1]), 60, "node 0 to take in the rogue's models")
            endless = zmtp_connect(target)  # a multipart message that never ends
            try:
                for _ in range(64):
                    endless.sendall(zmtp_frame(bytes(1 << 20), more=True))
            except OSError:
                pass
            for _ in range(300):  # connections that never speak (a full accept backlog refuses some)
                try:
                    idle.append(zmtp_connect(target))
                except OSError:
                    time.sleep(0.01)
            time.sleep(1.0)
        finally:
            for sock in idle:
                sock.close()
            if endless is not None:
                endless.close()
            rogue.close()
            context.term()

    attacked_dir = tmp_path / "attacked"
    run(small(), attacked_dir, processes, attack)
    done = summaries(attacked_dir, 4)
    assert [s["rounds_completed"] for s in done] == [ROUNDS] * 4 and not any(s["stopped_early"] for s in done)
    rows = read_rows(attacked_dir, 0)
    assert [r["round"] for r in rows] == list(range(ROUNDS))  # no round skipped to 2**31 - 1
    slowest = max(r["round_seconds"] for r in rows[4:])
    assert slowest < usual + DEADLINE / 2, (slowest, usual)  # no step waited out a deadline
    rejected = done[0]["rejected"]
    for reason in ("wrong_version", "bad_header", "unexpected_kind", "too_far_ahead", "connection_memory",
                   "connection_evicted"):
        assert rejected.get(reason, 0) >= 1, (reason, rejected)
    assert done[0]["flagged"].get("1", 0) >= 1  # the 1e30 vector was pulled in by the guard
    for i in range(4):
        final = np.load(node_dir(attacked_dir, i) / "final.npy", allow_pickle=False)
        assert np.isfinite(final).all()
        assert read_rows(attacked_dir, i)[-1]["accuracy"] == pytest.approx(clean_rows[i]["accuracy"], abs=0.05)
