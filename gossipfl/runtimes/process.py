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
from collections.abc import Mapping
from typing import IO, Any, Callable

import zmq

from .. import checkpoint
from ..checkpoint import save_array
from ..config import ConfigError, ExperimentConfig
from ..experiment import Experiment
from ..transport.keys import load_keys
from ..algorithms.schedule import Broadcast
from ..allocation import reuse_large_allocations
from ..transport.limits import Limits, raise_open_file_limit
from ..transport.liveness import Detection, as_document
from ..transport.zmq import ZmqTransport
from .attacker import AttackerView
from .final_merge import KINDS as FINAL_MERGE_KINDS, final_merge
from .node import MODEL, PAIR_REPLY, PAIR_REQUEST, Node
from .sampled_process import KINDS as MODEST_KINDS, ModestLoop

log = logging.getLogger("gossipfl.node")


def node_dir(run_dir: str | Path, node_id: int) -> Path:
    return Path(run_dir) / "nodes" / f"node-{node_id}"


def evaluated_vector(directory: Path, round_index: int) -> Path:
    """Where a node leaves its vector of an evaluated round for the launcher's network-wide metrics."""
    return directory / "evaluated" / f"round-{round_index:06d}.npy"


def tcp(address: str) -> str:
    return f"tcp://{address}"


def make_transport(cfg: ExperimentConfig, experiment: Experiment, node_id: int, layout: str,
                   size: int) -> ZmqTransport:
    d = cfg.deploy
    if len(d.addresses) != experiment.n:
        raise ConfigError(f"deploy.addresses lists {len(d.addresses)} addresses for {experiment.n} nodes")
    modest = cfg.sampling.kind == "modest"  # a complete overlay: any node may be sampled or aggregate
    peers = {int(j): tcp(d.addresses[j]) for j in (set(range(experiment.n)) - {node_id} if modest
                                                   else experiment.graph.neighbors(node_id))}
    max_bytes = int(d.max_message_mb * 1e6) if d.max_message_mb else size * 4 + (1 << 20)
    curve = load_keys(d.keys, node_id) if d.keys else None
    kinds = (MODEST_KINDS if modest else {MODEL} if cfg.gossip.schedule in ("sync", "async")
             else {PAIR_REQUEST, PAIR_REPLY})
    kinds |= FINAL_MERGE_KINDS if d.final_merge else set()
    limits = Limits(rounds_ahead=d.rounds_ahead, buffer_ttl_s=d.buffer_ttl_s,
                    max_connections=d.max_connections or None,
                    max_connections_per_address=d.max_connections_per_address or None,
                    idle_timeout_s=d.idle_timeout_s, keepalive_s=d.keepalive_s)
    detection = Detection(d.failure_detection, d.deadline_floor_s, d.suspect_after)
    try:
        return ZmqTransport(node_id, tcp(d.addresses[node_id]), peers, layout, size, deadline_s=d.deadline_s,
                            max_message_bytes=max_bytes, curve=curve, kinds=kinds, limits=limits,
                            detection=detection, asynchronous=modest or cfg.gossip.schedule == "async")
    except zmq.ZMQError as exc:  # connect never fails up front: this is the bind of our own address
        raise ConfigError(f"deploy.addresses[{node_id}] = {d.addresses[node_id]!r}: "
                          f"cannot listen there ({exc})") from None


def peak_rss_mb() -> float:
    """This process's peak resident memory since its program started: VmHWM where /proc has it.
    Not getrusage's ru_maxrss, which also holds the parent's memory at fork: a node started by a
    launcher that had loaded the data set reported the launcher's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_supported(cfg: ExperimentConfig) -> None:
    """What node processes do not run is refused before anything starts, not run as something else."""
    s = cfg.sampling
    if s.kind == "fedavg":
        raise ConfigError("sampling.kind = 'fedavg' needs a server and runs in `gossipfl simulate` only; "
                          "node processes (launch, node) run 'modest' or 'none'")
    if s.kind == "modest" and (s.crash_at >= 0 or s.leave_at >= 0 or s.join_at >= 0):
        raise ConfigError("sampling.crash_at, leave_at and join_at schedule churn in `gossipfl simulate` only; "
                          "in node processes a crash is a real kill: leave them at -1")


def backed_round(claims: Mapping[int, int], current: int, rounds: int) -> int:
    """The round a node moves to when its neighbours are ahead: the one after the newest round that
    a majority of the neighbours heard from have reached, never past the run's last round and never
    behind its own. The one after: the neighbours sent that round's messages before this node got
    there (they are gone, dropped as too far ahead), and a rejoiner that waited for them lost a
    deadline a round and never caught up. A round number from the network is a claim, not an
    order: one spoofed message for round 2**31 - 1 once made a node skip to it, and its own
    messages then ended the run for everyone."""
    if not claims:
        return current
    majority = len(claims) // 2 + 1
    backed = sorted(claims.values(), reverse=True)[majority - 1]
    return current if backed <= current else min(backed + 1, rounds - 1)


class NodeProcess:
    """Runs one node's rounds; `stop()` (or a signal) ends it after the current gossip step."""

    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: str | Path, resume: bool = False):
        check_supported(cfg)
        self.cfg, self.id = cfg, node_id
        self.dir = node_dir(run_dir, node_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.experiment = Experiment(cfg)
        self.stopping = threading.Event()
        probe = self.experiment.build_model(node_id)
        self.layout = probe.layout.digest()
        self.transport = make_transport(cfg, self.experiment, node_id, self.layout, probe.layout.size)
        self.node: Node = self.experiment.make_node(node_id, self.transport, network=True)
        self.attacker = AttackerView(self.experiment, self.node) if self.node.attack else None
        self.evaluator = self.experiment.evaluator()
        self.start_round, self.io_errors = 0, 0
        self.lock_step = cfg.gossip.schedule != "async"  # the rounds of lock-step schedules are rejoined
        self.round, self.completed, self.accuracy = 0, -1, None  # what a status query reports
        self.transport.set_status(self.status)
        saved = checkpoint.load_latest(self.dir, self.layout) if resume else None
        self.resumed = saved is not None  # --resume without a checkpoint is a first start (a service always passes it)
        if saved is not None:
            self.node.flat.load(saved.vector)
            self.start_round = saved.round + 1
            log.info("node %d resumes after round %d", node_id, saved.round)

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def status(self) -> dict[str, Any]:
        """This node's answer to `gossipfl status` (the transport adds liveness and drop counts).
        It runs in the transport's I/O thread, so it only reads."""
        return {"round": self.round, "rounds": self.cfg.rounds, "rounds_completed": self.completed + 1,
                "accuracy": self.accuracy}

    def evaluate(self) -> dict[str, float]:
        row = self.node.vector.view(1, -1)
        return {"accuracy": float(self.evaluator.accuracy(row)[0]),
                "accuracy_local": float(self.evaluator.local_accuracy(row, [self.id])[0])}

    def exchanges(self, round_index: int) -> list[Callable[[], Any]]:
        """This node's part of the round plan, in the plan's order: every broadcast step, and the
        pairs that involve it (in the global firing order that every process draws alike, so
        disjoint pairs run concurrently and no pair waits in a cycle)."""
        node, r, attacker = self.node, round_index, self.attacker
        steps: list[Callable[[], Any]] = []
        for e in self.experiment.plan(r).involving(self.id):
            if isinstance(e, Broadcast):
                steps.append((lambda q=e.step: attacker.broadcast(r, q)) if attacker else
                             (lambda q=e.step: (node.send(r, q), node.receive_and_merge(r, q))))
            elif e.owner == self.id:
                steps.append(lambda s=e.seq, p=e.peer: (
                    node.request_pair(p, r, s, vector=attacker and attacker.sent_to(p, r, s)), node.finish_pair(p, r, s)))
            else:
                steps.append(lambda s=e.seq, o=e.owner: node.answer_pair(o, r, s, attack=attacker and (
                    lambda request: (attacker.learn({o: request}), attacker.sent_to(o, r, s))[1])))
        return steps

    def gossip(self, round_index: int) -> bool:
        """Run this round's exchanges; False if a stop request cut the round short. The very first
        exchange of a fresh start waits up to startup_s, while peers may still be starting (a
        resumed node's peers are running already: it waits the usual deadline). Asynchronous
        gossip waits for nobody: merge what arrived since the last merge, send, go on."""
        if self.cfg.gossip.schedule == "async":
            node = self.node
            node.merge_arrived(list(self.transport.drain(MODEL).values()), round_index, self.cfg.gossip.staleness_decay)
            node.send(round_index, 0)
            return True
        exchanges = self.exchanges(round_index)
        for i, exchange in enumerate(exchanges):
            first = round_index == self.start_round and i == 0 and not self.resumed
            self.transport.deadline_s = self.cfg.deploy.startup_s if first else self.cfg.deploy.deadline_s
            exchange()
            if self.stopping.is_set() and i < len(exchanges) - 1:
                return False
        return True

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        with (self.dir / "metrics.jsonl").open("a") as metrics:
            if cfg.sampling.kind == "modest":
                completed = ModestLoop(self, metrics, started).run()
            else:
                completed = self.gossip_rounds(metrics, started)
        self.best_effort("final.npy", lambda: save_array(self.dir / "final.npy", self.node.vector.numpy()), attempts=5)
        merged = self.final_merge() if cfg.deploy.final_merge and completed == cfg.rounds - 1 else {}
        summary = {"node": self.id, "rounds_completed": completed + 1, "stopped_early": completed < cfg.rounds - 1,
                   **merged, "bytes_sent": self.transport.bytes_sent, "resent": self.transport.resent.total(),
                   "rejected": dict(self.transport.rejected),
                   **self.node.counters.as_dict(), "observed": self.node.counters.state(), "io_errors": self.io_errors,
                   "wall_seconds": time.perf_counter() - started,
                   "max_rss_mb": peak_rss_mb()}
        self.best_effort("summary.json", lambda: (self.dir / "summary.json").write_text(json.dumps(summary, indent=2)
                                                                                        + "\n"), attempts=5)
        return summary

    def gossip_rounds(self, metrics: IO[str], started: float) -> int:
        """The rounds of decentralized gossip; returns the last round completed."""
        cfg = self.cfg
        completed = self.start_round - 1
        if self.resumed and self.lock_step:
            self.hear_from_neighbours()
        r = self.start_round
        slowdown = cfg.timing.slow_factor - 1 if self.id in self.experiment.slow_nodes else 0.0
        while r < cfg.rounds and not self.stopping.is_set():
            ahead = backed_round(self.transport.claimed_rounds(), r, cfg.rounds) if self.lock_step else r
            if ahead > r:  # neighbours moved on while this node was down: rejoin at their round
                log.info("node %d skips rounds %d..%d to rejoin", self.id, r, ahead - 1)
                r = ahead
            self.round = r
            round_start = time.perf_counter()
            loss = self.node.train(r)
            train_seconds = time.perf_counter() - round_start
            if slowdown:  # timing.slow: this node emulates a slower host
                self.stopping.wait(slowdown * train_seconds)
            if not self.gossip(r):
                break
            stats = self.node.stats(r, loss)
            evaluate = (r + 1) % cfg.eval.every == 0 or r == cfg.rounds - 1
            record = {"node": self.id, "round": r, "train_loss": loss, **(self.evaluate() if evaluate else {}),
                      "bytes_sent": self.transport.bytes_sent, "received": stats.received,
                      "missing": stats.missing, "resent": self.transport.resent.total(),
                      "rejected": dict(self.transport.rejected),
                      **self.node.counters.as_dict(), "io_errors": self.io_errors,
                      "liveness": as_document(self.transport.liveness()),
                      "round_seconds": time.perf_counter() - round_start, "train_seconds": train_seconds,
                      "wall_seconds": time.perf_counter() - started}
            if evaluate:  # before the metrics line: the launcher reads the line, then the vector
                self.best_effort(f"the vector of round {r}", lambda: save_array(
                    evaluated_vector(self.dir, r), self.node.vector.numpy()))
            self.best_effort(f"the metrics line of round {r}", lambda: (metrics.write(json.dumps(record) + "\n"),
                                                                        metrics.flush()))
            log.info("round %d done: loss %.4f, %d received, %d missing%s", r, loss, stats.received, stats.missing,
                     f", accuracy {record['accuracy']:.4f}" if "accuracy" in record else "")
            completed = self.completed = r
            self.accuracy = record.get("accuracy", self.accuracy)
            every = cfg.deploy.checkpoint_every
            if every and ((r + 1) % every == 0 or r == cfg.rounds - 1):
                self.best_effort(f"the checkpoint of round {r}",
                                 lambda: checkpoint.save(self.dir, r, self.node.vector, self.layout))
            r += 1
        return completed

    def final_merge(self) -> dict[str, Any]:
        """deploy.final_merge: the exact average of the live nodes' final models (runtimes/final_merge),
        kept as merged.npy beside final.npy, and its accuracy for the summary."""
        result = final_merge(self.transport, self.id, self.experiment.graph, self.node.vector, self.cfg.rounds - 1,
                             self.cfg.deploy.deadline_s)
        if result.vector is None:
            log.warning("node %d: the final merge did not reach it (%d nodes taken as live)", self.id, result.live)
            return {"final_merge_nodes": 0, "final_merge_live": result.live, "final_merge_accuracy": None}
        self.best_effort("merged.npy", lambda: save_array(self.dir / "merged.npy", result.vector.numpy()), attempts=5)
        accuracy = float(self.evaluator.accuracy(result.vector.view(1, -1))[0])
        log.info("final merge of %d models: accuracy %.4f", result.nodes, accuracy)
        return {"final_merge_nodes": result.nodes, "final_merge_live": result.live, "final_merge_accuracy": accuracy}

    def hear_from_neighbours(self, poll_s: float = 0.05) -> None:
        """A resumed node first waits (up to startup_s) until most neighbours have claimed a round,
        so that it rejoins at theirs instead of replaying rounds they left behind."""
        deadline = time.monotonic() + self.cfg.deploy.startup_s
        majority = len(self.node.neighbour_weights) // 2 + 1
        while len(self.transport.claimed_rounds()) < majority and time.monotonic() < deadline \
                and not self.stopping.is_set():
            time.sleep(poll_s)

    def best_effort(self, what: str, write: Callable[[], object], attempts: int = 1) -> bool:
        """Write something a run can live without (a checkpoint, a metrics line) without letting an
        I/O error end the node: out of file descriptors or disk, it says so, counts it and goes on;
        `attempts` > 1 retries, for what matters at the end."""
        for attempt in range(attempts):
            try:
                write()
                return True
            except OSError as error:
                self.io_errors += 1
                log.warning("node %d could not write %s (%s)%s", self.id, what, error,
                            "; retrying" if attempt < attempts - 1 else "; skipped")
                if attempt < attempts - 1:
                    time.sleep(0.2 * (attempt + 1))
        return False

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
