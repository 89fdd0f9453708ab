"""Checkpoints of a node's flat vector in a format that cannot execute code: a raw .npy array
(loaded with allow_pickle=False) beside a small JSON record. Written to a temporary name and
renamed, so a node killed mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

KEEP = 2


@dataclass(frozen=True)
class Checkpoint:
    round: int          # last completed round
    vector: torch.Tensor
    layout: str         # Layout.digest() of the model that wrote it


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: str | Path, round_index: int, vector: torch.Tensor, layout: str) -> Path:
    """Save after `round_index` completed; keeps the newest KEEP checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"checkpoint-{round_index:06d}"
    _atomic_write(stem.with_suffix(".npy"), lambda f: np.save(f, vector.numpy(), allow_pickle=False))
    record = {"round": round_index, "layout": layout, "size": vector.numel()}
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
        if array.dtype != np.float32 or array.shape != (record["size"],):
            continue
        return Checkpoint(int(record["round"]), torch.from_numpy(array), layout)
    return None
