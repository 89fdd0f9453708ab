"""One node as one OS process: the Node round loop over ZeroMQ, with checkpoints, resume and a
clean stop on SIGTERM/SIGINT.

Results go to RUN_DIR/nodes/node-ID/: metrics.jsonl (a line per completed round), summary.json,
checkpoints, and final.npy (the final flat vector, for the launcher's global metrics).
"""

from __future__ import annotations

import json
import logging
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import checkpoint
from ..config import ConfigError, ExperimentConfig
from ..experiment import Experiment
from ..transport.keys import load_keys
from ..metrics import accuracy
from .node import MODEL, PAIR_REPLY, PAIR_REQUEST, Node
from ..transport.limits import Limits, raise_open_file_limit
from ..transport.zmq import ZmqTransport, reuse_large_allocations

log = logging.getLogger("gossipfl.node")


def node_dir(run_dir: str | Path, node_id: int) -> Path:
    return Path(run_dir) / "nodes" / f"node-{node_id}"


def tcp(address: str) -> str:
    return f"tcp://{address}"


def make_transport(cfg: ExperimentConfig, experiment: Experiment, node_id: int, layout: str,
                   size: int) -> ZmqTransport:
    d = cfg.deploy
    if len(d.addresses) != experiment.n:
        raise ConfigError(f"deploy.addresses lists {len(d.addresses)} addresses for {experiment.n} nodes")
    peers = {int(j): tcp(d.addresses[j]) for j in experiment.graph.neighbors(node_id)}
    max_bytes = int(d.max_message_mb * 1e6) if d.max_message_mb else size * 4 + (1 << 20)
    curve = load_keys(d.keys, node_id) if d.keys else None
    kinds = {MODEL} if cfg.gossip.schedule == "sync" else {PAIR_REQUEST, PAIR_REPLY}
    limits = Limits(rounds_ahead=d.rounds_ahead, buffer_ttl_s=d.buffer_ttl_s,
                    max_connections=d.max_connections or None,
                    max_connections_per_address=d.max_connections_per_address or None,
                    idle_timeout_s=d.idle_timeout_s, keepalive_s=d.keepalive_s)
    return ZmqTransport(node_id, tcp(d.addresses[node_id]), peers, layout, size, deadline_s=d.deadline_s,
                        max_message_bytes=max_bytes, curve=curve, kinds=kinds, limits=limits)


class NodeProcess:
    """Runs one node's rounds; `stop()` (or a signal) ends it after the current gossip step."""

    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: str | Path, resume: bool = False):
        self.cfg, self.id = cfg, node_id
        self.dir = node_dir(run_dir, node_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.experiment = Experiment(cfg)
        self.stopping = threading.Event()
        probe = self.experiment.build_model(node_id)
        self.layout = probe.layout.digest()
        self.transport = make_transport(cfg, self.experiment, node_id, self.layout, probe.layout.size)
        self.node: Node = self.experiment.make_node(node_id, self.transport)
        self.start_round = 0
        saved = checkpoint.load_latest(self.dir, self.layout) if resume else None
        if saved is not None:
            self.node.flat.load(saved.vector)
            self.start_round = saved.round + 1
            log.info("node %d resumes after round %d", node_id, saved.round)

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def evaluate(self) -> dict[str, float]:
        ds, batch = self.experiment.dataset, self.cfg.eval.batch_size
        local = torch.from_numpy(self.experiment.local_test_parts[self.id])
        module = self.node.flat.module
        return {"accuracy": accuracy(module, ds.x_test, ds.y_test, batch),
                "accuracy_local": accuracy(module, ds.x_test[local], ds.y_test[local], batch)}

    def exchanges(self, round_index: int) -> list[Callable[[], Any]]:
        """This node's part of the round's gossip, in order. Sync: Q x [send, receive and merge].
        Poisson: the round's seeded firings that involve this node, in the global firing order that
        every process draws alike, so disjoint pairs run concurrently and no pair waits in a cycle."""
        node, r = self.node, round_index
        if self.cfg.gossip.schedule == "sync":
            return [lambda q=q: (node.send(r, q), node.receive_and_merge(r, q)) for q in range(self.cfg.gossip.steps)]
        mine = [(seq, min(u, v), max(u, v)) for seq, (u, v) in enumerate(self.experiment.firings(r))
                if self.id in (u, v)]
        return [(lambda s=seq, p=peer: (node.request_pair(p, r, s), node.finish_pair(p, r, s))) if owner == self.id
                else (lambda s=seq, o=owner: node.answer_pair(o, r, s)) for seq, owner, peer in mine]

    def gossip(self, round_index: int) -> bool:
        """Run this round's exchanges; False if a stop request cut the round short. The very first
        exchange waits up to startup_s, while peers may still be starting."""
        exchanges = self.exchanges(round_index)
        for i, exchange in enumerate(exchanges):
            first = round_index == self.start_round and i == 0
            self.transport.deadline_s = self.cfg.deploy.startup_s if first else self.cfg.deploy.deadline_s
            exchange()
            if self.stopping.is_set() and i < len(exchanges) - 1:
                return False
        return True

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        completed = self.start_round - 1
        with (self.dir / "metrics.jsonl").open("a") as metrics:
            r = self.start_round
            while r < cfg.rounds and not self.stopping.is_set():
                ahead = max(self.transport.claimed_rounds().values(), default=-1)  # interim; the lead's policy replaces it
                if ahead > r:  # neighbours moved on while this node was down: rejoin at their round
                    log.info("node %d skips rounds %d..%d to rejoin", self.id, r, ahead - 1)
                    r = ahead
                round_start = time.perf_counter()
                loss = self.node.train(r)
                train_seconds = time.perf_counter() - round_start
                if not self.gossip(r):
                    break
                stats = self.node.stats(r, loss)
                evaluate = (r + 1) % cfg.eval.every == 0 or r == cfg.rounds - 1
                record = {"round": r, "train_loss": loss, **(self.evaluate() if evaluate else {}),
                          "bytes_sent": self.transport.bytes_sent, "received": stats.received,
                          "missing": stats.missing, "rejected": dict(self.transport.rejected),
                          "round_seconds": time.perf_counter() - round_start, "train_seconds": train_seconds,
                          "wall_seconds": time.perf_counter() - started}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                completed = r
                every = cfg.deploy.checkpoint_every
                if every and ((r + 1) % every == 0 or r == cfg.rounds - 1):
                    checkpoint.save(self.dir, r, self.node.vector, self.layout)
                r += 1
        np.save(self.dir / "final.npy", self.node.vector.numpy(), allow_pickle=False)
        summary = {"node": self.id, "rounds_completed": completed + 1, "stopped_early": completed < cfg.rounds - 1,
                   "bytes_sent": self.transport.bytes_sent, "rejected": dict(self.transport.rejected),
                   "wall_seconds": time.perf_counter() - started,
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.transport.close()


def run_node(cfg: ExperimentConfig, node_id: int, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Entry point of `gossipfl node`: run until done or signalled, always closing the sockets."""
    raise_open_file_limit()  # a connection flood must not exhaust the usual soft limit of 1,024 files
    reuse_large_allocations()  # large received frames reuse mapped pages instead of faulting in fresh ones
    process = NodeProcess(cfg, node_id, run_dir, resume)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, process.stop)
    try:
        return process.run()
    finally:
        process.close()
