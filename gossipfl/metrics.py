"""Evaluation: what every runtime measures about its models, in one place."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


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
