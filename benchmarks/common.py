"""Helpers shared by the benchmark scripts: run a config variant, print a table, write JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from gossipfl import config
from gossipfl.rundir import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"


def variant(base: config.ExperimentConfig, overrides: dict[str, Any]) -> config.ExperimentConfig:
    """`base` with dotted-key overrides, validated."""
    data = base.to_dict()
    for key, value in overrides.items():
        *sections, field = key.split(".")
        table = data
        for s in sections:
            table = table[s]
        table[field] = value
    return config.from_dict(data)


def simulate(cfg: config.ExperimentConfig, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from gossipfl.runtimes.sim import Simulation
    summary = Simulation(cfg, run_dir=run_dir, progress=False).run()
    return summary, read_metrics(run_dir)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


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
