"""Start one OS process per node on this machine, follow them, and gather one run folder.

The run folder has the layout of `gossipfl simulate` (config.toml, which doubles as the
deployment file the nodes read; metrics.jsonl; summary.json; plots) plus nodes/node-ID/ with each
node's own metrics, logs, checkpoints and final vector. Each node process runs torch with one
thread: several trainers sharing a machine lose most of their throughput otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ExperimentConfig
from ..errors import UserError
from ..experiment import Experiment, write_weights
from ..metrics import Evaluator, consensus_distance
from ..rundir import RunWriter, new_run_dir
from . import RESTART_POLICIES, single_thread_env, stop_all
from .process import evaluated_vector, node_dir


class LaunchError(UserError, RuntimeError):
    """A node process failed; the message carries the tail of its log."""


def free_loopback_addresses(n: int) -> list[str]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def deployment(experiment: Experiment, run_dir: Path) -> ExperimentConfig:
    """The config the nodes read: addresses filled in, results pointed at the run folder, and the
    mixing matrix stored once in the run folder (never solved again, or differently, by a node)."""
    cfg = experiment.resolved_config()
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = cfg.gossip.weights_file or str(write_weights(run_dir, experiment))
    addresses = cfg.deploy.addresses or free_loopback_addresses(experiment.n)
    return dataclasses.replace(cfg, gossip=dataclasses.replace(cfg.gossip, weights_file=weights),
                               deploy=dataclasses.replace(cfg.deploy, addresses=addresses, run_dir=str(run_dir)))


def node_command(config_path: Path, node_id: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "gossipfl", "node", "--config", str(config_path), "--id", str(node_id),
            *(["--resume"] if resume else [])]


def start_node(config_path: Path, run_dir: Path, node_id: int, resume: bool = False) -> subprocess.Popen:
    out = node_dir(run_dir, node_id)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "node.log").open("ab")
    return subprocess.Popen(node_command(config_path, node_id, resume), stdout=log, stderr=subprocess.STDOUT,
                            env=single_thread_env(), start_new_session=True)


def log_tail(run_dir: Path, node_id: int, lines: int = 15) -> str:
    path = node_dir(run_dir, node_id) / "node.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


class MetricsFollower:
    """Reads the nodes' metrics.jsonl files as they grow and yields, in order, the rounds no live
    node can still report: round r is done when every node has reported it or a later round
    (a node that rejoined skipped it), or is gone for good (finished, or dead and not restarted)."""

    def __init__(self, run_dir: Path, n: int):
        self.paths = [node_dir(run_dir, i) / "metrics.jsonl" for i in range(n)]
        self.offsets = [0] * n
        self.rows: list[dict[int, dict[Any, dict[str, Any]]]] = [{} for _ in range(n)]  # round -> role -> line
        self.newest = [-1] * n  # newest round each node reported
        self.next_round = 0

    def poll(self, gone: set[int], rounds: int) -> list[list[dict[str, Any]]]:
        for i, path in enumerate(self.paths):
            if not path.exists():
                continue
            with path.open() as f:
                f.seek(self.offsets[i])
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line still being written
                    self.offsets[i] += len(line)
                    row = json.loads(line)
                    if row["round"] >= self.next_round:  # a resumed node may repeat rounds already gathered
                        self.rows[i].setdefault(row["round"], {})[row.get("role")] = row
                        self.took(i, row)
        done = []
        while self.next_round < rounds and self.complete(self.next_round, gone, rounds):
            present = [row for rows in self.rows for row in rows.pop(self.next_round, {}).values()]
            if present:
                done.append(present)
            self.next_round += 1
        return done

    def took(self, node: int, row: dict[str, Any]) -> None:
        self.newest[node] = max(self.newest[node], row["round"])

    def complete(self, r: int, gone: set[int], rounds: int) -> bool:
        return all(self.newest[i] >= r or i in gone for i in range(len(self.rows)))

    def started(self, node: int) -> bool:
        """Whether `node` got past its start-up (so that its death is a fault, not a start-up problem)."""
        return self.newest[node] >= 0


class SampledFollower(MetricsFollower):
    """The same for MoDeST, where only a round's sample and aggregators report it. Round r is done
    once its aggregator reported it and a later round's did (whose trainers started from round
    r's aggregate, so round r's trainers have written their lines), or LAG rounds later without
    its own aggregator's line (that aggregator died before it could hand its aggregate on to
    all), or every node is gone; the last round once its aggregator reported it. A node has got
    past its start-up once the run has done a round."""

    LAG = 3

    def __init__(self, run_dir: Path, n: int):
        super().__init__(run_dir, n)
        self.aggregated: set[int] = set()  # the rounds an aggregator reported
        self.bytes_sent = [0] * n  # each node's newest cumulative bytes_sent

    def took(self, node: int, row: dict[str, Any]) -> None:
        super().took(node, row)
        if row["role"] == "aggregated":
            self.aggregated.add(row["round"])
        self.bytes_sent[node] = max(self.bytes_sent[node], row["bytes_sent"])

    def complete(self, r: int, gone: set[int], rounds: int) -> bool:
        newest = max(self.aggregated, default=-1)
        return ((r in self.aggregated and (newest > r or r == rounds - 1)) or newest >= r + self.LAG
                or len(gone) == len(self.rows))

    def started(self, node: int) -> bool:
        return self.next_round > 0 or super().started(node)


def summed_rejected(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The nodes' drop counts by reason, summed."""
    rejected: Counter[str] = Counter()
    for r in rows:
        rejected.update(r["rejected"])
    return dict(rejected)


def aggregate(rows: list[dict[str, Any]], started: float, attackers: set[int] = frozenset()) -> dict[str, Any]:
    """One line of the run's metrics.jsonl from the nodes' lines of the same round; accuracy and
    loss are the honest nodes' (attackers, in an evaluation run, are left out)."""
    everyone, rows = rows, [r for r in rows if r["node"] not in attackers]
    record = {"round": everyone[0]["round"], "nodes_reporting": len(everyone),
              "train_loss": float(np.mean([r["train_loss"] for r in rows])) if rows else None,
              "bytes_sent": sum(r["bytes_sent"] for r in everyone), "missing": sum(r["missing"] for r in rows),
              "rejected": summed_rejected(rows), "flagged": sum(sum(r["flagged"].values()) for r in rows),
              "rolled_back": sum(r["rolled_back"] for r in rows),
              "round_seconds": max(r["round_seconds"] for r in everyone),
              "train_seconds": max(r["train_seconds"] for r in everyone), "wall_seconds": time.perf_counter() - started}
    if rows and all("accuracy" in r for r in rows):
        acc = [r["accuracy"] for r in rows]
        record.update(accuracy_mean=float(np.mean(acc)), accuracy_min=float(np.min(acc)),
                      accuracy_max=float(np.max(acc)),
                      accuracy_local_mean=float(np.nanmean([r["accuracy_local"] for r in rows])))
    return record


def sampled_record(rows: list[dict[str, Any]], bytes_sent: list[int], started: float) -> dict[str, Any]:
    """One line of a MoDeST run's metrics.jsonl from the lines of its sample (role "trained") and
    aggregators ("aggregated"); `bytes_sent` is every node's newest total. accuracy_global_model
    is the aggregators' evaluation of their aggregate (their mean, with several aggregators)."""
    trainers = [r for r in rows if r["role"] == "trained"]
    aggregators = [r for r in rows if r["role"] == "aggregated"]
    record = {"round": rows[0]["round"], "nodes_reporting": len({r["node"] for r in rows}),
              "sample": sorted(r["node"] for r in trainers), "aggregators": sorted(r["node"] for r in aggregators),
              "skipped": sum(r["skipped"] for r in rows),
              "train_loss": float(np.mean([r["train_loss"] for r in trainers])) if trainers else None,
              "bytes_sent": sum(bytes_sent), "bytes_sent_max_node": max(bytes_sent), "rejected": summed_rejected(rows),
              "flagged": sum(r["flagged"] for r in aggregators), "rolled_back": sum(r["rolled_back"] for r in aggregators),
              "train_seconds": max([r["train_seconds"] for r in trainers], default=0.0),
              "wall_seconds": time.perf_counter() - started}
    evaluated = [r["accuracy"] for r in aggregators if "accuracy" in r]
    if evaluated:
        record["accuracy_global_model"] = float(np.mean(evaluated))
    return record


def observations(run_dir: Path, honest: list[int]) -> dict[tuple[int, int], tuple[int, float]]:
    """(observer, sender) -> (messages merged, summed suspicion), from the honest nodes' summaries."""
    seen = {}
    for i in honest:
        path = node_dir(run_dir, i) / "summary.json"
        if path.is_file():
            observed = json.loads(path.read_text())["observed"]
            for sender, messages in observed["messages"].items():
                seen[i, int(sender)] = (messages, observed["suspicion"][sender])
    return seen


def network_metrics(run_dir: Path, nodes: list[int], round_index: int, evaluator: Evaluator) -> dict[str, float]:
    """Consensus distance and the average model's accuracy of an evaluated round, from the vectors
    the reporting nodes left for it (then removed: the launcher is their only reader)."""
    paths = [evaluated_vector(node_dir(run_dir, i), round_index) for i in nodes]
    vectors = [torch.from_numpy(np.load(path, allow_pickle=False)) for path in paths]
    for path in paths:
        path.unlink()
    average = torch.stack(vectors).mean(dim=0, keepdim=True)
    return {"consensus_distance": consensus_distance(vectors), "accuracy_average_model": float(evaluator.accuracy(average)[0])}


def final_merge_report(run_dir: Path, n: int) -> dict[str, Any]:
    """deploy.final_merge, from the nodes' summaries: the accuracy of the largest average (a network
    cut in parts averages each part apart), how many models it holds, and how many nodes got it."""
    summaries = [json.loads(path.read_text()) for i in range(n)
                 if (path := node_dir(run_dir, i) / "summary.json").exists()]
    merged = [s for s in summaries if s.get("final_merge_nodes")]
    best = max(merged, key=lambda s: s["final_merge_nodes"], default=None)
    return {"final_merge_accuracy": best and best["final_merge_accuracy"],
            "final_merge_nodes": best["final_merge_nodes"] if best else 0,
            "final_merge_reached": sum(s["final_merge_nodes"] == best["final_merge_nodes"] for s in merged) if best else 0}


@dataclass
class NodeSlot:
    """One node of a launch: its current process and how it has fared."""
    id: int
    proc: subprocess.Popen
    state: str = "live"  # live, finished, dead
    restarts: int = 0


def launch(cfg: ExperimentConfig, run_dir: str | Path | None = None, progress: bool = True, poll_s: float = 0.2,
           restart: str = "never", max_restarts: int = 3) -> dict[str, Any]:
    """Run every node of `cfg` as a local process and gather one run folder; returns the summary.

    The run goes on when node processes die: the rounds of the live nodes are gathered, and the
    summary records who died and when. With restart = "on-failure" a dead node is started again
    with --resume (up to `max_restarts` times each). A node that fails before finishing any round
    is a start-up problem (address taken, data missing), and it fails the launch at once. Ctrl-C
    stops every node cleanly and returns the summary of the rounds done."""
    if restart not in RESTART_POLICIES:
        raise LaunchError(f"--restart {restart!r}: choose one of {', '.join(RESTART_POLICIES)}")
    experiment = Experiment(cfg)
    n = experiment.n
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output, cfg.name)
    deployed = deployment(experiment, run_dir)
    writer = RunWriter(run_dir, deployed)
    config_path = run_dir / "config.toml"
    started = time.perf_counter()
    slots = [NodeSlot(i, start_node(config_path, run_dir, i)) for i in range(n)]
    sampled = cfg.sampling.kind == "modest"
    follower = (SampledFollower if sampled else MetricsFollower)(run_dir, n)
    bar = tqdm(total=cfg.rounds, desc=f"{cfg.name} ({n} processes)", unit="round", disable=not progress)
    evaluator = experiment.evaluator()
    attackers = set(experiment.attackers)
    events: list[dict[str, Any]] = []
    newest: dict[str, float] = {}  # a MoDeST run's newest evaluated aggregate

    def collect() -> None:
        gone = {s.id for s in slots if s.state != "live"}
        for rows in follower.poll(gone, cfg.rounds):
            record = sampled_record(rows, follower.bytes_sent, started) if sampled else aggregate(rows, started, attackers)
            if "accuracy_global_model" in record:
                newest["accuracy_global_model"] = record["accuracy_global_model"]
            if "accuracy_mean" in record:
                record.update(network_metrics(run_dir, [r["node"] for r in rows if r["node"] not in attackers],
                                              record["round"], evaluator))
            writer.log(record)
            bar.update(1)
        live = sum(s.state == "live" for s in slots)
        bar.set_postfix_str(f"live {live}/{n}, dead {sum(s.state == 'dead' for s in slots)}"
                            + (f", acc {writer.last['accuracy_mean']:.3f}" if "accuracy_mean" in writer.last else ""))

    def settle(slot: NodeSlot, code: int) -> None:
        if code == 0:
            slot.state = "finished"
            return
        if not follower.started(slot.id) and slot.restarts == 0:
            raise LaunchError(f"node {slot.id} exited with code {code} before finishing a round; its log "
                              f"({node_dir(run_dir, slot.id) / 'node.log'}) ends with:\n{log_tail(run_dir, slot.id)}")
        events.append({"event": "died", "node": slot.id, "exit_code": code, "after_round": follower.newest[slot.id],
                       "wall_seconds": time.perf_counter() - started})
        if restart == "on-failure" and slot.restarts < max_restarts:
            slot.proc, slot.restarts = start_node(config_path, run_dir, slot.id, resume=True), slot.restarts + 1
            events.append({"event": "restarted", "node": slot.id, "wall_seconds": time.perf_counter() - started})
        else:
            slot.state = "dead"

    status = "complete"
    try:
        try:
            while any(s.state == "live" for s in slots):
                collect()
                for slot in slots:
                    code = slot.proc.poll() if slot.state == "live" else None
                    if code is not None:
                        settle(slot, code)
                time.sleep(poll_s)
        except KeyboardInterrupt:
            status = "interrupted"
            stop_all([s.proc for s in slots])  # SIGTERM: each node ends after its current step, with a summary
        collect()
        dead = sorted(s.id for s in slots if s.state == "dead")
        merged = final_merge_report(run_dir, n) if cfg.deploy.final_merge else {}
        return writer.write_summary(status, nodes=n, dataset=experiment.dataset.name, run_dir=str(run_dir),
                                    runtime="launch", dead_nodes=dead, node_events=events,
                                    restarts=sum(s.restarts for s in slots), **merged,
                                    **({"final_accuracy_global_model": newest.get("accuracy_global_model")}
                                       if sampled else {}),
                                    **experiment.misbehaviour(observations(run_dir, experiment.honest)))
    finally:  # also when a node failed to start: no process outlives the launch
        bar.close()
        stop_all([s.proc for s in slots])
        writer.close()
