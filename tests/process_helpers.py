"""Shared pieces of the tests that run real node processes: their metrics lines, waiting for a
condition, and writing the deployment file the nodes read."""

import json
import os
import signal
import sys
import time
from pathlib import Path

from gossipfl.config import ExperimentConfig
from gossipfl.deploy.bundle import node_file
from gossipfl.experiment import Experiment
from gossipfl.runtimes.launch import deployment
from gossipfl.runtimes.process import node_dir


def read_rows(run_dir, node):
    path = node_dir(run_dir, node) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def deployed(cfg: ExperimentConfig, run_dir):
    """The deployment `launch` would make of `cfg` in `run_dir`, written as the nodes' config.toml."""
    cfg = deployment(Experiment(cfg), run_dir)
    path = run_dir / "config.toml"
    path.write_text(cfg.to_toml())
    return cfg, path


def node_pids(run_dir, node=None):
    """Process ids of the node processes (or of node `node`) that read this run folder's config,
    found in /proc: what a launch started, or what a leak would leave."""
    config = str(run_dir / "config.toml").encode() + b"\0"
    wanted = None if node is None else b"\0--id\0%d\0" % node
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if config in cmdline and (wanted is None or wanted in cmdline + b"\0"):
            found.append(int(proc.name))
    return found


def kill_nodes_of(run_dir):
    """SIGKILL every node process of this run folder (a test's cleanup, pass or fail)."""
    for pid in node_pids(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_command(node: int, python_flags: tuple[str, ...] = ()) -> list[str]:
    """How deploy init's systemd unit starts a node, from the deployment folder (a first start with
    --resume and no checkpoint starts fresh)."""
    return [sys.executable, *python_flags, "-m", "gossipfl", "node", "--config", node_file(node), "--resume"]
