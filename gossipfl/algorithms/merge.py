"""Merge rules over stacked vectors: B nodes at once, each with its own vector and K received ones.

Shapes: own (B, d); received, K tensors of (B, d) (a Node's received vectors as they came, or the
columns of a gathered (B, K, d) block, `block.unbind(1)`: no copy either way); weights (B, K + 1)
with column 0 for the node itself and 0 for a sender that did not arrive. A Node merges with B = 1; the vectorized engine merges chunks of
nodes, or computes the plain mean as the sparse product W @ X and reuses the correction below.

`weighted_mean` is plain gossip averaging. `VarianceCorrection` (Tian et al. 2024) then rescales
each weight tensor of the mixed vector about its mean so that its element variance matches a
target: averaging k uncorrelated models otherwise shrinks that variance about k-fold, undoing
Xavier/Kaiming initialisation and stalling learning.

Variance targets: follow_others = the weighted mean of the contributors' variances (the node
included); follow_self = the node's own variance; conservative = close only a share c of the gap
between the plain mean's variance and follow_others (c = 1 is follow_others, c = 0 the plain mean).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..params import Layout

MERGES = ("mean", "variance_corrected")
VARIANCE_TARGETS = ("follow_others", "follow_self", "conservative")


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to one, so a missing sender's share goes to those that arrived."""
    total = weights.sum(dim=1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError("merge weights must have a positive sum in every row")
    return weights / total


def weighted_mean(own: torch.Tensor, received: Sequence[torch.Tensor], weights: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_k w[b, k] x[b, k] / sum_k w[b, k] over the node itself (k = 0) and its K senders."""
    w = normalised(weights).to(own.dtype)
    torch.mul(own, w[:, :1], out=out)
    for k, rows in enumerate(received):
        out.addcmul_(rows, w[:, k + 1:k + 2])
    return out


def correctable(layout: Layout) -> list[slice]:
    """Where the corrected tensors lie: trainable, non-normalisation tensors with > 1 element."""
    return [slice(e.offset, e.offset + e.numel) for e in layout.entries if e.kind == "param" and e.numel > 1]


class VarianceCorrection:
    """Rescale each correctable tensor of mixed vectors to a target element variance, in place.

    Statistics are per row and per tensor, (B, T) for T tensors: a loop over the few tensors of a
    layout, each step a batched reduction over all B rows (no loop over nodes)."""

    def __init__(self, layout: Layout, target: str = "follow_others", c: float = 0.5, eps: float = 1e-4):
        if target not in VARIANCE_TARGETS:
            raise ValueError(f"variance target {target!r}; choose one of {', '.join(VARIANCE_TARGETS)}")
        self.target, self.c, self.eps = target, c, eps
        self.slices = correctable(layout)

    def moments(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row, per-tensor mean and population variance of (B, d) vectors, as (B, T) float64."""
        if not self.slices:
            empty = vectors.new_zeros((vectors.shape[0], 0), dtype=torch.float64)
            return empty, empty
        pairs = [torch.var_mean(vectors[:, s], dim=1, correction=0) for s in self.slices]
        var = torch.stack([v for v, _ in pairs], dim=1).double()
        mean = torch.stack([m for _, m in pairs], dim=1).double()
        return mean, var

    def target_variance(self, own_var: torch.Tensor, contributors_var: torch.Tensor,
                        mixed_var: torch.Tensor) -> torch.Tensor:
        """(B, T) targets from the node's own variance, the weighted mean of all contributors'
        variances (node included) and the variance of the plain mean."""
        if self.target == "follow_self":
            return own_var
        if self.target == "conservative":
            return mixed_var + self.c * (contributors_var - mixed_var)
        return contributors_var

    def apply(self, mixed: torch.Tensor, target: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Rescale each tensor of `mixed` (B, d) about its mean to the target variance, in place."""
        mean, var = moments
        scale = torch.sqrt((target + self.eps) / (var + self.eps))
        for t, s in enumerate(self.slices):
            m = mean[:, t:t + 1].to(mixed.dtype)
            mixed[:, s].sub_(m).mul_(scale[:, t:t + 1].to(mixed.dtype)).add_(m)

    def correct(self, mixed: torch.Tensor, own: torch.Tensor, received: Sequence[torch.Tensor],
                weights: torch.Tensor) -> None:
        """Correct `mixed`, the weighted mean of `own` and `received`, in place (the gather path)."""
        if not self.slices:
            return
        w = normalised(weights).double()
        own_var = self.moments(own)[1]
        received_var = torch.stack([self.moments(rows)[1] for rows in received], dim=1)
        contributors = w[:, :1] * own_var + (w[:, 1:, None] * received_var).sum(dim=1)
        moments = self.moments(mixed)
        self.apply(mixed, self.target_variance(own_var, contributors, moments[1]), moments)


class Merger:
    """The merge step: weighted mean, then variance correction when configured."""

    def __init__(self, layout: Layout, rule: str = "mean", target: str = "follow_others", c: float = 0.5,
                 eps: float = 1e-4):
        if rule not in MERGES:
            raise ValueError(f"merge rule {rule!r}; choose one of {', '.join(MERGES)}")
        self.correction = VarianceCorrection(layout, target, c, eps) if rule == "variance_corrected" else None

    def __call__(self, own: torch.Tensor, received: Sequence[torch.Tensor], weights: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        """The merge of each row of `own` with its received rows, written to `out` (B, d)."""
        weighted_mean(own, received, weights, out)
        if self.correction is not None and len(received):
            self.correction.correct(out, own, received, weights)
        return out


def finite_rows(vectors: torch.Tensor) -> torch.Tensor:
    """(B,) True where a row holds no NaN or infinity: one summing pass in the usual case (NaN and
    infinities propagate through a sum), the exact check only for rows whose sum is not finite."""
    ok = torch.isfinite(vectors.sum(dim=1))
    if not bool(ok.all()):
        suspects = (~ok).nonzero().flatten()
        ok[suspects] = torch.isfinite(vectors[suspects]).all(dim=1)
    return ok


def keep_finite(new: torch.Tensor, old: torch.Tensor) -> int:
    """Copy `old` back into the rows of `new` that are not finite; returns how many were rolled back.
    A node's own vector must never become non-finite, whatever it merged or trained."""
    ok = finite_rows(new)
    bad = (~ok).nonzero().flatten()
    if len(bad):
        new[bad] = old[bad]
    return len(bad)
