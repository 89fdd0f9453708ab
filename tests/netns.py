"""Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge, and a run of
`gossipfl deploy init`'s files with one node process per namespace and one host behind an impaired
link (a `tc tbf` bandwidth cap both ways, and tests/tcp_proxy.py for delay, jitter and resets).

    hub namespace: bridge br0 (SUBNET.254), the proxy
    host I:        eth0 (SUBNET.I+1) -- veth -- pI on br0

The impaired host's neighbours reach it, and it reaches them, through the proxy on the hub: the
deployment files are rewritten as a port forward would have them (the others dial the proxy for
it, it dials the proxy for each neighbour). Needs root; `unavailable()` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from gossipfl.deploy.bundle import init_deployment, node_file
from gossipfl.graph.topology import read_graph
from gossipfl.runtimes import single_thread_env, stop_all
from gossipfl.runtimes.launch import free_loopback_addresses
from gossipfl.runtimes.process import node_dir
from process_helpers import node_command

PROXY = Path(__file__).resolve().parent / "tcp_proxy.py"
PORT, PROXY_PORT = 7000, 7100  # a node's port on its host; the proxy's ports start here
COMMAND_TIMEOUT_S = 10


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2's `ip` and `tc`"
    probe = f"gflprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {getattr(exc, 'stderr', exc)}"
    return None


class Lan:
    """`hosts` namespaces on a bridge; `spawn` runs a process in one; `close` ends them all and
    deletes the namespaces (their veths go with them), also after a failure half-way."""

    def __init__(self, hosts: int, subnet: str = "10.213.0"):
        tag = f"gfl{os.getpid() % 100000}"
        self.subnet, self.hub = subnet, f"{tag}-hub"
        self.hosts = [f"{tag}-h{i}" for i in range(hosts)]
        self.procs: list[subprocess.Popen] = []
        try:
            ip("netns", "add", self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "addr", "add", f"{self.hub_ip}/24", "dev", "br0")
            ip("-n", self.hub, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ip("netns", "add", host)
                ip("link", "add", f"{tag}v{i}", "netns", host, "type", "veth", "peer", "name", f"p{i}", "netns", self.hub)
                ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0", "up")
                ip("-n", host, "link", "set", f"{tag}v{i}", "name", "eth0")
                ip("-n", host, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                ip("-n", host, "link", "set", "eth0", "up")
                ip("-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def hub_ip(self) -> str:
        return f"{self.subnet}.254"

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host + 1}"

    def cap(self, host: int, mbit: float) -> None:
        """A tbf bandwidth cap on host's link, both ways (its eth0 out, its bridge port out)."""
        for namespace, device in ((self.hosts[host], "eth0"), (self.hub, f"p{host}")):
            subprocess.run(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{mbit}mbit",
                            "burst", "32kbit", "latency", "400ms"], check=True, timeout=COMMAND_TIMEOUT_S,
                           capture_output=True)

    def capped_bytes(self, host: int) -> int:
        """Bytes the host's cap let out of its eth0 (proof that the traffic crossed the cap)."""
        shown = subprocess.run(["tc", "-n", self.hosts[host], "-s", "-j", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT_S).stdout
        return sum(q.get("bytes", 0) for q in json.loads(shown) if q.get("kind") == "tbf")

    def spawn(self, namespace: str, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with log.open("wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", namespace, *argv], cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, env=single_thread_env())
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        stop_all(self.procs, grace=3.0)
        for namespace in [*self.hosts, self.hub]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=COMMAND_TIMEOUT_S)


@dataclass(frozen=True)
class Impairment:
    """What the impaired host's link does: one-way delay and jitter, a reset of its connections
    every reset_s seconds (0: never), a bandwidth cap in Mbit/s (0: none)."""
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reset_s: float = 0.0
    mbit: float = 0.0


@dataclass
class Run:
    wall_s: float
    accuracy: list[float]          # each node's last evaluated accuracy
    summaries: list[dict[str, Any]]
    missing: int                   # neighbour messages that did not arrive in time, over all nodes and steps
    proxy: dict[str, int]          # the proxy's counters (empty on loopback)
    capped_bytes: int = 0


def route_through_proxy(out: Path, n: int, host: int, neighbours: list[int], proxy_ip: str) -> list[str]:
    """Rewrite the node files so that every connection to and from `host` passes the proxy; returns
    the proxy's routes (LISTEN=TARGET). The proxy's port PROXY_PORT+J stands for node J."""
    routes, files = [], {i: out / node_file(i) for i in range(n)}
    for i, path in files.items():
        doc = tomllib.loads(path.read_text())
        real = list(doc["deploy"]["addresses"])
        for j in (neighbours if i == host else [host] if i in neighbours else []):
            doc["deploy"]["addresses"][j] = f"{proxy_ip}:{PROXY_PORT + j}"
            routes.append(f"{proxy_ip}:{PROXY_PORT + j}={real[j]}")
        path.write_text(tomli_w.dumps(doc))
    return sorted(set(routes))


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for proc, log in zip(procs, logs):
        try:
            code = proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a node ran past {timeout_s} s:\n{log.read_text()[-2000:]}") from None
        assert code == 0, log.read_text()[-3000:]


def results(out: Path, n: int, started: float) -> tuple[float, list[float], list[dict[str, Any]], int]:
    run_dir = out / tomllib.loads((out / node_file(0)).read_text())["deploy"]["run_dir"]
    rows = [[json.loads(line) for line in (node_dir(run_dir, i) / "metrics.jsonl").read_text().splitlines()]
            for i in range(n)]
    accuracy = [next(r["accuracy"] for r in reversed(node_rows) if "accuracy" in r) for node_rows in rows]
    summaries = [json.loads((node_dir(run_dir, i) / "summary.json").read_text()) for i in range(n)]
    missing = sum(r["missing"] for node_rows in rows for r in node_rows)
    return time.monotonic() - started, accuracy, summaries, missing


def run_on_loopback(raw: dict[str, Any], graph: Path, work: Path, n: int, timeout_s: float = 90) -> Run:
    """The reference: deploy init's files for loopback addresses, every node a process here."""
    out = init_deployment(json.loads(json.dumps(raw)), graph, hosts_file(work, free_loopback_addresses(n)),
                          work / "deploy")
    procs, logs = [], [out / f"node-{i}.log" for i in range(n)]
    started = time.monotonic()
    try:
        for i, log in enumerate(logs):
            with log.open("wb") as sink:
                procs.append(subprocess.Popen(node_command(i), cwd=out, stdout=sink, stderr=subprocess.STDOUT,
                                              env=single_thread_env()))
        wait_all(procs, logs, timeout_s)
    finally:
        stop_all(procs, grace=3.0)
    return Run(*results(out, n, started), proxy={})


def run_on_lan(raw: dict[str, Any], graph: Path, work: Path, n: int, impairment: Impairment, host: int = 0,
               timeout_s: float = 90) -> Run:
    """deploy init's files for hosts SUBNET.1.., one node per namespace, `host` behind the impaired link."""
    lan = Lan(n)
    try:
        addresses = [f"{lan.ip(i)}:{PORT}" for i in range(n)]
        out = init_deployment(json.loads(json.dumps(raw)), graph, hosts_file(work, addresses), work / "deploy")
        routes = route_through_proxy(out, n, host, sorted(read_graph(graph).neighbors(host)), lan.hub_ip)
        stats = work / "proxy.json"
        proxy = lan.spawn(lan.hub, [sys.executable, str(PROXY), "--delay-ms", str(impairment.delay_ms), "--jitter-ms",
                                    str(impairment.jitter_ms), "--reset-s", str(impairment.reset_s), "--stats",
                                    str(stats), *routes], work / "proxy.log")
        wait_ready(work / "proxy.log", proxy)
        if impairment.mbit:
            lan.cap(host, impairment.mbit)
        logs = [out / f"node-{i}.log" for i in range(n)]
        started = time.monotonic()
        procs = [lan.spawn(lan.hosts[i], node_command(i), logs[i], cwd=out) for i in range(n)]
        wait_all(procs, logs, timeout_s)
        done = results(out, n, started)
        capped = lan.capped_bytes(host) if impairment.mbit else 0
        stop_all([proxy], grace=3.0)
        return Run(*done, json.loads(stats.read_text()) if stats.exists() else {}, capped)
    finally:
        lan.close()


def wait_ready(log: Path, proc: subprocess.Popen, timeout_s: float = 10, word: str = "ready") -> None:
    """Until the proxy has printed `word` ("ready": it listens)."""
    end = time.monotonic() + timeout_s
    while word not in log.read_text().split():
        if proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"the proxy did not print {word!r}:\n{log.read_text()}")
        time.sleep(0.02)


def hosts_file(work: Path, addresses: list[str]) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "HOSTS.txt"
    path.write_text("".join(f"{a}\n" for a in addresses))
    return path
