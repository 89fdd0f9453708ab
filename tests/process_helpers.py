"""Shared pieces of the tests that run real node processes: their metrics lines, waiting for a
condition, and writing the deployment file the nodes read."""

import json
import time

from gossipfl.config import ExperimentConfig
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
