"""One contiguous float32 vector per model, with a layout table for per-tensor rules.

`FlatModel` rebinds a module's parameters (and their gradients) and its float buffers as views into
one vector. Training then updates the vector in place, gossip sends it as one raw frame, and merge
rules work on it with a few vector operations instead of a Python loop over tensors. Trainable
parameters come first, so `params` is one slice that the optimiser can step in one go.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in the flat vector. `kind` is "param", "norm" (affine parameters of a
    normalisation layer) or "buffer" (running statistics and other float state)."""
    name: str
    offset: int
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    n_trainable: int  # elements [0, n_trainable) are trainable parameters

    @property
    def size(self) -> int:
        last = self.entries[-1]
        return last.offset + last.numel

    def digest(self) -> str:
        """Short hash of names, shapes and kinds: peers with different models must not mix vectors."""
        text = ";".join(f"{e.name}:{'x'.join(map(str, e.shape))}:{e.kind}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def rows(self, matrix: torch.Tensor, entries: Sequence[Entry] | None = None) -> dict[str, torch.Tensor]:
        """Each entry (or each of `entries`) as a (B, *shape) view of a (B, size) matrix of flat
        vectors: B models' tensors without a copy."""
        b = matrix.shape[0]
        return {e.name: matrix[:, e.offset:e.offset + e.numel].view(b, *e.shape) for e in entries or self.entries}


def _owner_kinds(model: nn.Module) -> dict[str, str]:
    kinds = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            kinds[full] = "norm" if isinstance(module, NORM_TYPES) else "param"
    return kinds


class FlatModel:
    """A module whose trainable parameters, gradients and float buffers are views of flat vectors."""

    def __init__(self, model: nn.Module):
        self.module = model
        kinds = _owner_kinds(model)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        entries, offset = [], 0
        for name, tensor in params:
            entries.append(Entry(name, offset, tuple(tensor.shape), kinds[name]))
            offset += tensor.numel()
        n_trainable = offset
        for name, tensor in buffers:
            entries.append(Entry(name, offset, tuple(tensor.shape), "buffer"))
            offset += tensor.numel()
        self.layout = Layout(tuple(entries), n_trainable)
        self.vector = torch.zeros(offset, dtype=torch.float32)
        self.grad = torch.zeros(n_trainable, dtype=torch.float32)
        for entry, (_, p) in zip(entries, params):
            view = self._view(self.vector, entry)
            view.copy_(p.detach())
            p.data = view
            p.grad = self._view(self.grad, entry)
        for entry, (name, b) in zip(entries[len(params):], buffers):
            view = self._view(self.vector, entry)
            view.copy_(b)
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = view

    @staticmethod
    def _view(vector: torch.Tensor, entry: Entry) -> torch.Tensor:
        return vector[entry.offset:entry.offset + entry.numel].view(entry.shape)

    @property
    def params(self) -> torch.Tensor:
        """The trainable slice of `vector` (a view: writes go to the model)."""
        return self.vector[:self.layout.n_trainable]

    def load(self, vector: torch.Tensor) -> None:
        """Copy another flat vector of the same layout into this model, in place."""
        self.vector.copy_(vector)


class StackedModule:
    """B models of one architecture, their parameters and buffers the rows of a (B, size) matrix,
    run in one batched call (torch.func.vmap over functional_call) instead of a loop of modules.
    Works for any module whose forward does not update state (no batch-norm running statistics)."""

    def __init__(self, module: nn.Module, layout: Layout):
        self.module, self.layout = module, layout
        call = lambda params, x: functional_call(module, params, (x,))  # noqa: E731
        self._own_inputs = vmap(call)                     # each model on its own inputs
        self._shared_inputs = vmap(call, in_dims=(0, None))  # every model on the same inputs

    def forward_views(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n, C) of B models given as (B, *shape) tensors, on inputs (B, n, ...)."""
        return self._own_inputs(views, x)

    def __call__(self, matrix: torch.Tensor, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Logits of the models in the rows of `matrix` on inputs (B, n, ...), or with `shared` on
        one batch (n, ...) that every model sees."""
        views = self.layout.rows(matrix)
        return self._shared_inputs(views, x) if shared else self._own_inputs(views, x)
