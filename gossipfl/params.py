"""One contiguous float32 vector per model, with a layout table for per-tensor rules.

`FlatModel` rebinds a module's parameters (and their gradients) and its float buffers as views into
one vector. Training then updates the vector in place, gossip sends it as one raw frame, and merge
rules work on it with a few vector operations instead of a Python loop over tensors. Trainable
parameters come first, so `params` is one slice that the optimiser can step in one go.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import torch
from torch import nn

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

    def segment_ids(self) -> torch.Tensor:
        """Per-element index of the entry it belongs to (used for segment reductions)."""
        ids = torch.empty(self.size, dtype=torch.long)
        for i, e in enumerate(self.entries):
            ids[e.offset:e.offset + e.numel] = i
        return ids


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
