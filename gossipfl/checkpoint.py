"""Checkpoints in a format that cannot execute code: a raw float32 .npy array (loaded with
allow_pickle=False) beside a small JSON record. A node process saves its flat vector; a simulation
saves every node's vector as one (N, d) array, with the rest of its state (counters, guard
histories) in the JSON record. Written to a temporary name and renamed, so a process killed
mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

KEEP = 2


@dataclass(frozen=True)
class Checkpoint:
    round: int          # last completed round
    vector: torch.Tensor  # a flat vector (d,), or a network's vectors (N, d)
    layout: str         # Layout.digest() of the model that wrote it
    state: dict[str, Any] = field(default_factory=dict)  # JSON-safe state beside the vectors


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> Path:
    """One .npy file, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return path


def save(directory: str | Path, round_index: int, vector: torch.Tensor, layout: str,
         state: dict[str, Any] | None = None) -> Path:
    """Save after `round_index` completed; keeps the newest KEEP checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"checkpoint-{round_index:06d}"
    save_array(stem.with_suffix(".npy"), vector.detach().cpu().numpy())
    record = {"round": round_index, "layout": layout, "shape": list(vector.shape), "state": state or {}}
    _atomic_write(stem.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
    for old in sorted(directory.glob("checkpoint-*.json"))[:-KEEP]:
        old.unlink()
        old.with_suffix(".npy").unlink(missing_ok=True)
    return stem.with_suffix(".json")


def load_latest(directory: str | Path, layout: str) -> Checkpoint | None:
    """The newest readable checkpoint of this model layout, or None when there is none."""
    for record_path in sorted(Path(directory).glob("checkpoint-*.json"), reverse=True):
        try:
            record = json.loads(record_path.read_text())
            array = np.load(record_path.with_suffix(".npy"), allow_pickle=False)
        except (OSError, ValueError):
            continue  # half-written or damaged: fall back to the one before
        if record.get("layout") != layout:
            raise ValueError(f"{record_path}: checkpoint of another model layout ({record.get('layout')} != {layout})")
        if array.dtype != np.float32 or list(array.shape) != record.get("shape"):
            continue
        return Checkpoint(int(record["round"]), torch.from_numpy(array), layout, record.get("state", {}))
    return None
