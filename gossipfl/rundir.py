"""The run folder: config.toml (the config as resolved), metrics.jsonl (a line per round) and
summary.json. Torch-free, so listing and plotting runs stays fast."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import ExperimentConfig


def new_run_dir(parent: str | Path, name: str) -> Path:
    """runs/NAME-YYYYmmdd-HHMMSS, with a numeric suffix if that exists already."""
    stem = Path(parent) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = stem, 1
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return path


class RunWriter:
    """Writes one run folder; metrics lines are flushed as they come, so a crash keeps them."""

    def __init__(self, run_dir: str | Path, cfg: ExperimentConfig):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(cfg.to_toml())
        self._metrics = (self.dir / "metrics.jsonl").open("w")
        self.last: dict[str, Any] = {}

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self.last = record

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        summary = {
            "final_accuracy_mean": self.last.get("accuracy_mean"),
            "final_accuracy_min": self.last.get("accuracy_min"),
            "final_accuracy_max": self.last.get("accuracy_max"),
            "final_accuracy_average_model": self.last.get("accuracy_average_model"),
            "final_consensus_distance": self.last.get("consensus_distance"),
            "rounds": self.last.get("round", -1) + 1,
            "bytes_sent_total": self.last.get("bytes_sent"),
            "wall_seconds": self.last.get("wall_seconds"),
            **extra,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self._metrics.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
