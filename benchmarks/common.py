"""Helpers shared by the benchmark scripts: run one config in this process, write JSON.

Variants of a config come from gossipfl.config.derive, loops over variants from gossipfl.sweep and
tables from gossipfl.report.markdown_table."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from gossipfl import config
from gossipfl.rundir import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def simulate(cfg: config.ExperimentConfig, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from gossipfl.runtimes.sim import Simulation
    summary = Simulation(cfg, run_dir=run_dir, progress=False).run()
    return summary, read_metrics(run_dir)


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def machine() -> dict[str, Any]:
    import os
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "processor": platform.machine()}
