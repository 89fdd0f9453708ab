"""Evaluation and the run folder: config.toml, metrics.jsonl (a line per round), summary.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import ExperimentConfig


@torch.inference_mode()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Top-1 accuracy of `module` on (x, y), in eval mode."""
    if len(y) == 0:
        return float("nan")
    module.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = module(x[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start:start + batch_size]).sum())
    return correct / len(y)


def consensus_distance(vectors: Sequence[torch.Tensor]) -> float:
    """(1/n) sum_i ||x_i - mean x||^2, accumulated in float64."""
    stack = torch.stack(list(vectors)).double()
    return float(((stack - stack.mean(dim=0)) ** 2).sum(dim=1).mean())


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
