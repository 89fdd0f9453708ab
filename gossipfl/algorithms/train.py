"""Local training on flat vectors: SGD with momentum and weight decay, and SAM as DFedSAM uses it.

One step on a minibatch: g = grad F(x); with rho > 0, e = rho * g / ||g|| (one L2 norm over all
trainable tensors), g = grad F(x + e) on the same minibatch, and x is restored. The update
then follows torch.optim.SGD (no dampening, no Nesterov): d = g + wd * x, m = mu * m + d,
x -= lr * m. With rho = 0 the second pass is skipped, so the step is exactly DFedAvg's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..params import FlatModel
from ..seeding import round_seed


def sam_perturbation(grad: torch.Tensor, rho: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """e = rho * g / ||g||_2, the ascent step of SAM (zero when the gradient is zero)."""
    norm = float(grad.norm())
    scale = rho / norm if norm > 0 else 0.0
    return torch.mul(grad, scale, out=out) if out is not None else grad * scale


class LocalTrainer:
    """K minibatch steps per round on one node's data, updating a FlatModel in place."""

    def __init__(self, flat: FlatModel, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int, node: int):
        if len(y) == 0:
            raise ValueError(f"node {node} has no training data")
        self.flat, self.x, self.y, self.cfg = flat, x, y, cfg
        self.seed, self.node = seed, node
        self.momentum = torch.zeros_like(flat.grad)
        self.perturbation = torch.zeros_like(flat.grad)
        self.anchor = torch.zeros_like(flat.grad)

    def lr(self, round_index: int) -> float:
        return self.cfg.lr * self.cfg.lr_decay ** round_index

    def batches(self, round_index: int) -> torch.Tensor:
        """K x B sample indices for this round: whole shuffles of the local data, back to back."""
        k, b, n = self.cfg.local_steps, self.cfg.batch_size, len(self.y)
        b = min(b, n)
        g = torch.Generator().manual_seed(round_seed(self.seed, self.node, round_index))
        shuffles = [torch.randperm(n, generator=g) for _ in range(-(-k * b // n))]
        return torch.cat(shuffles or [torch.empty(0, dtype=torch.long)])[:k * b].view(k, b)

    def _gradient(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        self.flat.grad.zero_()
        loss = F.cross_entropy(self.flat.module(xb), yb)
        loss.backward()
        return float(loss.detach())

    def run_round(self, round_index: int) -> float:
        """Train for one round; returns the mean minibatch loss (at x, before any perturbation)."""
        cfg, params, grad = self.cfg, self.flat.params, self.flat.grad
        lr = self.lr(round_index)
        self.flat.module.train()
        self.momentum.zero_()  # each round starts a fresh local optimiser, as DFedSAM's clients do
        losses = []
        for step, idx in enumerate(self.batches(round_index)):
            xb, yb = self.x[idx], self.y[idx]
            losses.append(self._gradient(xb, yb))
            if cfg.rho > 0:
                self.anchor.copy_(params)
                params.add_(sam_perturbation(grad, cfg.rho, out=self.perturbation))
                self._gradient(xb, yb)
                params.copy_(self.anchor)  # exact restore; x + e - e would drift in float32
            if cfg.weight_decay:
                grad.add_(params, alpha=cfg.weight_decay)
            if step == 0 or cfg.momentum == 0:
                self.momentum.copy_(grad)
            else:
                self.momentum.mul_(cfg.momentum).add_(grad)
            params.add_(self.momentum, alpha=-lr)
        return float(np.mean(losses)) if losses else float("nan")
