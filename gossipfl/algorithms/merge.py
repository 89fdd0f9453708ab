"""Merge rules: combine a node's own flat vector with those its neighbours sent.

`weighted_mean` is plain gossip averaging. `VarianceCorrection` (Tian et al. 2024) then rescales
each weight tensor of the mixed vector about its mean so that its element variance matches a
target: averaging k uncorrelated models otherwise shrinks that variance about k-fold, undoing
Xavier/Kaiming initialisation and stalling learning. Per-tensor statistics are computed with
segment reductions over the flat vector, not a Python loop over tensors.

Variance targets: follow_others = the weighted mean of the contributors' variances; follow_self =
the node's own variance; conservative = close only a share c of the gap between the plain mean's
variance and follow_others (c = 1 is follow_others, c = 0 is the plain mean).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..params import Layout


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """out = sum_k w_k v_k / sum_k w_k (renormalised, so missing neighbours are simply left out)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("merge weights must have a positive sum")
    torch.mul(vectors[0], weights[0] / total, out=out)
    for v, w in zip(vectors[1:], weights[1:]):
        out.add_(v, alpha=w / total)
    return out


def correctable(layout: Layout) -> list[int]:
    """Entries whose variance is corrected: trainable, non-normalisation tensors with > 1 element."""
    return [i for i, e in enumerate(layout.entries) if e.kind == "param" and e.numel > 1]


class VarianceCorrection:
    """Rescale each correctable tensor of a mixed vector to a target element variance, in place."""

    TARGETS = ("follow_others", "follow_self", "conservative")

    def __init__(self, layout: Layout, target: str = "follow_others", c: float = 0.5, eps: float = 1e-4):
        if target not in self.TARGETS:
            raise ValueError(f"variance target {target!r}; choose one of {', '.join(self.TARGETS)}")
        self.target, self.c, self.eps = target, c, eps
        entries = [layout.entries[i] for i in correctable(layout)]
        sizes = torch.tensor([e.numel for e in entries], dtype=torch.long)
        self.index = torch.cat([torch.arange(e.offset, e.offset + e.numel) for e in entries]
                               or [torch.empty(0, dtype=torch.long)])
        self.segment = torch.repeat_interleave(torch.arange(len(entries)), sizes)
        self.counts = sizes.double()

    def stats(self, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor mean and (population) variance, accumulated in float64."""
        v = vector[self.index].double()
        mean = torch.zeros_like(self.counts).index_add_(0, self.segment, v) / self.counts
        dev = v - mean[self.segment]
        var = torch.zeros_like(self.counts).index_add_(0, self.segment, dev * dev) / self.counts
        return mean, var

    def target_variance(self, contributors: Sequence[torch.Tensor], weights: Sequence[float],
                        own: torch.Tensor, mixed_var: torch.Tensor) -> torch.Tensor:
        if self.target == "follow_self":
            return self.stats(own)[1]
        total = float(sum(weights))
        others = sum(w / total * self.stats(v)[1] for v, w in zip(contributors, weights))
        if self.target == "conservative":
            return mixed_var + self.c * (others - mixed_var)
        return others  # type: ignore[return-value]

    def __call__(self, mixed: torch.Tensor, contributors: Sequence[torch.Tensor], weights: Sequence[float],
                 own: torch.Tensor) -> torch.Tensor:
        if not len(self.index):
            return mixed
        mean, var = self.stats(mixed)
        target = self.target_variance(contributors, weights, own, var)
        scale = torch.sqrt((target + self.eps) / (var + self.eps))
        seg = self.segment
        values = mixed[self.index].double()
        mixed[self.index] = ((values - mean[seg]) * scale[seg] + mean[seg]).to(mixed.dtype)
        return mixed


class Merger:
    """The merge step of a node: weighted mean, optionally followed by variance correction."""

    def __init__(self, layout: Layout, rule: str = "mean", target: str = "follow_others", c: float = 0.5,
                 eps: float = 1e-4):
        if rule not in ("mean", "variance_corrected"):
            raise ValueError(f"merge rule {rule!r}; choose mean or variance_corrected")
        self.correction = VarianceCorrection(layout, target, c, eps) if rule == "variance_corrected" else None
        self.buffer = torch.empty(layout.size, dtype=torch.float32)

    def __call__(self, own: torch.Tensor, self_weight: float, others: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> None:
        """Replace `own` (in place) by the merge of itself and `others`."""
        contributors, all_weights = [own, *others], [self_weight, *weights]
        mixed = weighted_mean(contributors, all_weights, self.buffer)
        if self.correction is not None and others:
            self.correction(mixed, contributors, all_weights, own)
        own.copy_(mixed)
