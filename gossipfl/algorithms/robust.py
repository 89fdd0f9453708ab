"""Filters: what an honest node does with the vectors it received before it merges them.

A filter sees B nodes at once (a FilterInput) and says what the merge should use instead (a
FilterOutput): changed received rows, changed weights, or one aggregate row that replaces them,
never writing into its inputs (a received vector may be shared by every recipient). It also says
how suspicious each sender looked, in [0, 1], which runtimes add up per neighbour to report who
misbehaved. Filters chain: each one's output is the next one's input.

`DistanceGuard` is the floor every runtime applies to untrusted input: a vector from a neighbour
may move a node at most a bounded distance, learned from that node's recent honest traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

GUARD_MODES = ("auto", "on", "off")
WARMUP = 4  # accepted distances a node must have seen before its learned bound is used


@dataclass(frozen=True)
class FilterInput:
    """B nodes' view of one exchange. `rows` are the nodes' indices in the filter's population (the
    node ids in the vectorized engine, [0] for a Node); `received` holds K tensors of (B, d), one per
    sender slot, as the merge rules take them; `weights` (B, K + 1) are the mixing weights of the
    node itself (column 0) and each sender, 0 for a sender that did not arrive (its row is finite
    but meaningless)."""
    rows: torch.Tensor
    own: torch.Tensor
    received: Sequence[torch.Tensor]
    weights: torch.Tensor
    round: int = 0
    step: int = 0


@dataclass(frozen=True)
class FilterOutput:
    """What to merge instead: `received` (K' tensors of (B, d)) with `weights` (B, K' + 1), and a
    (B, K) suspicion per original sender slot: 0 = taken as sent, 1 = discarded entirely."""
    received: Sequence[torch.Tensor]
    weights: torch.Tensor
    suspicion: torch.Tensor


class DistanceGuard:
    """Clip each received vector to within `bound` of the node's own: x_j <- x_i + (x_j - x_i) *
    min(1, bound / ||x_j - x_i||), as ClippedGossip does, with bound = min(factor * median of the
    node's last `window` accepted distances, max_relative * ||x_i||) (only the second until WARMUP
    distances are known). A finite 1e30 vector, which would otherwise turn a node's model into
    NaN after the merge, is pulled to the node's own vector. Distances are recorded clipped, so a
    minority of attackers sending at the bound cannot ratchet it up: the median ignores them."""

    def __init__(self, population: int, factor: float = 10.0, max_relative: float = 10.0, window: int = 32):
        self.factor, self.max_relative = factor, max_relative
        self.history = torch.full((population, window), float("nan"), dtype=torch.float64)
        self.position = torch.zeros(population, dtype=torch.long)
        self.seen = torch.zeros(population, dtype=torch.long)

    def bound(self, rows: torch.Tensor, own_norm: torch.Tensor) -> torch.Tensor:
        """(B,) the largest distance each node accepts now."""
        cap = self.max_relative * own_norm
        learned = self.factor * self.history[rows].nanmedian(dim=1).values
        ready = self.seen[rows] >= WARMUP
        floor = 1e-6 * own_norm  # a node whose neighbours were once identical must not lock at 0
        return torch.where(ready, torch.minimum(learned, cap), cap).clamp_min(floor)

    def __call__(self, batch: FilterInput) -> FilterOutput:
        rows, own, received, weights = batch.rows, batch.own, batch.received, batch.weights
        distance = torch.empty(own.shape[0], len(received), dtype=torch.float64)
        for j, x in enumerate(received):
            distance[:, j] = torch.linalg.vector_norm(x - own, dim=1).double()
        bound = self.bound(rows, torch.linalg.vector_norm(own, dim=1).double())
        present = weights[:, 1:] > 0
        clipped = present & ~(distance <= bound[:, None])  # an overflowed (inf) distance is clipped too
        suspicion = torch.where(clipped, 1.0 - (bound[:, None] / distance).nan_to_num(0.0), 0.0)
        out = list(received)
        for j in clipped.any(dim=0).nonzero().flatten().tolist():
            out[j] = out[j].clone()  # copy on write
            for r in clipped[:, j].nonzero().flatten().tolist():
                x = out[j][r]
                scale = float(bound[r] / distance[r, j])
                x.copy_(own[r] + (x - own[r]) * scale if scale > 0 else own[r])
                if not bool(torch.isfinite(x).all()):
                    x.copy_(own[r])
        self._record(rows, torch.minimum(distance, bound[:, None]), present)
        return FilterOutput(out, weights, suspicion)

    def state(self) -> dict[str, list]:
        """What a checkpoint keeps, JSON-safe (NaN marks an empty slot of the history)."""
        return {"history": self.history.tolist(), "position": self.position.tolist(), "seen": self.seen.tolist()}

    def load_state(self, state: dict[str, list]) -> None:
        self.history.copy_(torch.tensor(state["history"], dtype=torch.float64))
        self.position.copy_(torch.tensor(state["position"]))
        self.seen.copy_(torch.tensor(state["seen"]))

    def _record(self, rows: torch.Tensor, distance: torch.Tensor, present: torch.Tensor) -> None:
        window = self.history.shape[1]
        for j in range(distance.shape[1]):
            take = rows[present[:, j]]
            if len(take):
                self.history[take, self.position[take] % window] = distance[present[:, j], j]
                self.position[take] += 1
                self.seen[take] += 1
