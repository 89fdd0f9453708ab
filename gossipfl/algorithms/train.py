"""Local training over stacked parameters: SGD with momentum and weight decay, and SAM as DFedSAM
uses it, for B nodes at once (B = 1 for a Node, all nodes for the vectorized engine).

One step on a minibatch: g = grad F(x); with rho > 0, e = rho * g / ||g|| (one L2 norm over all
trainable tensors of each node), g = grad F(x + e) on the same minibatch, and x is restored. The
update then follows torch.optim.SGD (no dampening, no Nesterov): d = g + wd * x, m = mu * m + d,
x -= lr * m, through PyTorch's fused SGD kernel (one pass over memory). With rho = 0 the second
pass is skipped, so the step is exactly DFedAvg's.

How gradients are computed is the runtime's choice: `module_gradient` runs one module's forward
and backward, `StackedGradient` all nodes' models in one batched call (torch.func.vmap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.optim.sgd import sgd

from ..config import TrainConfig
from ..params import FlatModel, Layout, StackedModule
from ..seeding import round_seed


def learning_rate(cfg: TrainConfig, round_index: int) -> float:
    return cfg.lr * cfg.lr_decay ** round_index


def local_batches(seed: int, node: int, round_index: int, samples: int, steps: int, batch_size: int) -> torch.Tensor:
    """steps x min(batch_size, samples) indices into a node's local data for one round: whole
    shuffles back to back, drawn from the node's own seed, so every runtime draws the same."""
    b = min(batch_size, samples)
    g = torch.Generator().manual_seed(round_seed(seed, node, round_index))
    shuffles = [torch.randperm(samples, generator=g) for _ in range(-(-steps * b // samples))]
    return torch.cat(shuffles or [torch.empty(0, dtype=torch.long)])[:steps * b].view(steps, b)


def sam_perturbation(grad: torch.Tensor, rho: float) -> torch.Tensor:
    """Per-row factor rho / ||g|| (0 for a zero gradient): e = factor * g is SAM's ascent step."""
    norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
    return torch.where(norm > 0, rho / norm, torch.zeros_like(norm))


@dataclass
class LocalTraining:
    """The optimiser state of B nodes: views of their parameters and preallocated buffers, updated
    in place. `params` and `grad` are (B, n_trainable)."""

    params: torch.Tensor
    grad: torch.Tensor
    cfg: TrainConfig

    def __post_init__(self) -> None:
        self.momentum = torch.zeros_like(self.grad) if self.cfg.momentum else None
        self.anchor = torch.zeros_like(self.params) if self.cfg.rho > 0 else None

    def run(self, batches: Iterable[object], gradient: Callable[[object], torch.Tensor], lr: float) -> torch.Tensor:
        """Train on each batch in turn; `gradient(batch)` fills `grad` at the current parameters and
        returns the (B,) minibatch losses. Returns each row's mean loss (at x, before perturbation);
        NaN for a round without steps."""
        cfg = self.cfg
        if self.momentum is not None:
            self.momentum.zero_()  # each round starts a fresh local optimiser, as DFedSAM's clients do
        total, steps = torch.zeros(self.params.shape[0], dtype=torch.float64), 0
        for batch in batches:
            total += gradient(batch).double()
            steps += 1
            if self.anchor is not None:
                self.anchor.copy_(self.params)
                self.params.addcmul_(self.grad, sam_perturbation(self.grad, cfg.rho))
                gradient(batch)
                self.params.copy_(self.anchor)  # exact restore; x + e - e would drift in float32
            # m = mu m + d equals the first step's m = d exactly, because m starts at zero
            sgd([self.params], [self.grad], [self.momentum], fused=True, weight_decay=cfg.weight_decay,
                momentum=cfg.momentum, lr=lr, dampening=0.0, nesterov=False, maximize=False)
        return total / steps if steps else torch.full_like(total, float("nan"))


def module_gradient(flat: FlatModel, x: torch.Tensor, y: torch.Tensor,
                    inputs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gradients of one FlatModel by its own forward and backward: `gradient(indices)` trains on
    (x[indices], y[indices]) and leaves the gradient in `flat.grad`. With `inputs`, `x` is stored
    data (uint8 images) and each minibatch is turned into model inputs on its own, so a node holds
    a quarter of the memory a float copy of its data would take."""
    def gradient(indices: torch.Tensor) -> torch.Tensor:
        flat.grad.zero_()
        batch = x[indices] if inputs is None else inputs(x[indices])
        loss = F.cross_entropy(flat.module(batch), y[indices])
        loss.backward()
        return loss.detach().view(1)
    return gradient


@dataclass(frozen=True)
class StackedBatch:
    """One minibatch per node: inputs (B, b, ...), labels (B, b) and a 0/1 mask (B, b) marking the
    real samples of nodes that hold fewer than b."""
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None


class StackedGradient:
    """Gradients of B models, the rows of a (B, size) matrix, in one batched forward and backward,
    written into a (B, n_trainable) gradient matrix."""

    def __init__(self, stacked: StackedModule, layout: Layout, matrix: torch.Tensor, grad: torch.Tensor):
        self.stacked, self.layout, self.matrix, self.grad = stacked, layout, matrix, grad
        self.trainable = [e for e in layout.entries if e.offset < layout.n_trainable]
        self.grad_views = layout.rows(grad, self.trainable)

    def __call__(self, batch: StackedBatch) -> torch.Tensor:
        leaf = self.matrix.detach().requires_grad_(True)
        views = self.layout.rows(leaf)
        logits = self.stacked.forward_views(views, batch.x)
        losses = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten(), reduction="none").view(batch.y.shape)
        if batch.mask is None:
            per_row = losses.mean(dim=1)
        else:
            per_row = (losses * batch.mask).sum(dim=1) / batch.mask.sum(dim=1)
        grads = torch.autograd.grad(per_row.sum(), [views[e.name] for e in self.trainable])
        for entry, g in zip(self.trainable, grads):
            self.grad_views[entry.name].copy_(g)
        return per_row.detach()
