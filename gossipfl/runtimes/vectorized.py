"""The vectorized engine: all N nodes as rows of preallocated N x d tensors, on a CPU or a GPU.

Local training is one batched forward and backward per step for all nodes (StackedGradient) and
one fused SGD update; a broadcast gossip step is the sparse product W @ X into a second buffer
(double-buffered: no N x d allocation per round), followed by the batched variance correction;
runs of disjoint Poisson pairs merge as one batch. With the distance guard on, a step gathers each
chunk of nodes' received rows (B, K, d) and calls the same guard and merge as a Node does, so the
two engines agree to float tolerance. Memory is a handful of N x d float32 buffers; nothing of
size N x K x d exists for all nodes at once.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..algorithms.merge import keep_finite
from ..allocation import reuse_large_allocations
from ..algorithms.robust import FilterInput
from ..algorithms.schedule import Broadcast, Pair, RoundPlan, pair_batches
from ..algorithms.train import LocalTraining, StackedBatch, StackedGradient, learning_rate, local_batches
from ..experiment import Experiment
from .sim import lock_step

GATHER_BYTES = 256 << 20  # received rows gathered at once on the guarded path


class VectorizedEngine:
    resumable = True

    def __init__(self, experiment: Experiment, device: torch.device):
        reuse_large_allocations()  # per-step N x d gradients and gathers would each fault in fresh pages
        cfg, n = experiment.cfg, experiment.n
        self.experiment, self.cfg, self.device, self.n = experiment, cfg, device, n
        template = experiment.build_model(0)
        self.layout = layout = template.layout
        self.x = torch.empty(n, layout.size, device=device)
        if cfg.gossip.init == "independent":
            for i in range(n):
                self.x[i] = experiment.build_model(i).vector
        else:
            self.x[:] = template.vector
        self.spare = torch.empty_like(self.x)  # the gossip step's output, and the round's start for rollbacks
        self.grad = torch.zeros(n, layout.n_trainable, device=device)
        self.training = LocalTraining(self.x[:, :layout.n_trainable], self.grad, cfg.train)
        self.gradient = StackedGradient(experiment.stacked_model(training=True), layout, self.x, self.grad)
        self._data(experiment)
        self._graph(experiment)
        self.merger = experiment.merger(layout)
        self.guard = experiment.guard(n) if experiment.guarded(network=False) else None
        self.bytes_sent = self.flagged = self.rolled_back = 0

    def _data(self, experiment: Experiment) -> None:
        ds = experiment.dataset
        self.train_x = ds.train_inputs().to(self.device)
        self.train_y = ds.y_train.to(self.device)
        self.parts = [torch.from_numpy(p) for p in experiment.parts]

    def _graph(self, experiment: Experiment) -> None:
        w = torch.tensor(experiment.mixing, dtype=torch.float64)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": sparse @ dense is all we use
            warnings.simplefilter("ignore", UserWarning)
            self.w = w.to(torch.float32).to_sparse_csr().to(self.device)
            self.w64 = w.to_sparse_csr().to(self.device)  # averages the per-tensor variances in float64
        degrees = [experiment.graph.degree(i) for i in range(self.n)]
        self.step_bytes = sum(degrees) * self.layout.size * 4
        # neighbours in ascending id, as a Node orders what it received; padded with the node itself at weight 0
        k = max(degrees)
        self.neighbours = torch.arange(self.n).repeat_interleave(k).view(self.n, k)
        self.neighbour_weights = torch.zeros(self.n, k + 1, dtype=torch.float64)
        for i in range(self.n):
            row = experiment.neighbour_weights(i)
            ids = sorted(row)
            self.neighbours[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.neighbour_weights[i, 0] = float(experiment.mixing[i, i])
            self.neighbour_weights[i, 1:len(ids) + 1] = torch.tensor([row[j] for j in ids], dtype=torch.float64)

    # -- local training

    def batches(self, round_index: int) -> list[StackedBatch]:
        """Every node's minibatches of the round, drawn as a Node draws them, padded to one width."""
        t, seed = self.cfg.train, self.cfg.seed
        local = [local_batches(seed, i, round_index, len(p), t.local_steps, t.batch_size) for i, p in enumerate(self.parts)]
        width = max(b.shape[1] for b in local)
        index = torch.zeros(t.local_steps, self.n, width, dtype=torch.long)
        mask = torch.zeros(t.local_steps, self.n, width)
        for i, (b, part) in enumerate(zip(local, self.parts)):
            index[:, i, :b.shape[1]] = part[b]
            mask[:, i, :b.shape[1]] = 1.0
        index, mask = index.to(self.device), mask.to(self.device)
        padded = not bool(mask.all())
        return [StackedBatch(self.train_x[index[s]], self.train_y[index[s]], mask[s] if padded else None)
                for s in range(t.local_steps)]

    def train(self, round_index: int) -> float:
        self.spare.copy_(self.x)
        losses = self.training.run(self.batches(round_index), self.gradient, learning_rate(self.cfg.train, round_index))
        self.rolled_back += keep_finite(self.x, self.spare)
        return float(losses.mean())

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        return lock_step(self, plan)

    # -- gossip

    def exchange(self, plan: RoundPlan) -> None:
        pairs: list[Pair] = []
        for e in plan.exchanges + [None]:
            if isinstance(e, Pair):
                pairs.append(e)
                continue
            for run in pair_batches(pairs) if pairs else []:
                self.pairs(run)
            pairs = []
            if isinstance(e, Broadcast):
                self.broadcast()

    def broadcast(self) -> None:
        """One lock-step gossip step for all nodes, into the spare buffer, then swap."""
        out = self.spare
        if self.guard is not None:
            self._gathered_step(out)
        else:
            torch.addmm(out, self.w, self.x, beta=0, out=out)
            correction = self.merger.correction
            if correction is not None and correction.slices:
                own_var = correction.moments(self.x)[1]
                moments = correction.moments(out)
                target = correction.target_variance(own_var, self.w64 @ own_var, moments[1])
                correction.apply(out, target, moments)
        self.rolled_back += keep_finite(out, self.x)
        self.x, self.spare = out, self.x
        self._bind()
        self.bytes_sent += self.step_bytes

    def _gathered_step(self, out: torch.Tensor) -> None:
        k = self.neighbours.shape[1]
        step = max(1, GATHER_BYTES // (k * self.layout.size * 4))
        for start in range(0, self.n, step):
            rows = torch.arange(start, min(start + step, self.n))
            own = self.x[rows]
            received = self.x[self.neighbours[rows].to(self.device)].unbind(1)
            weights = self.neighbour_weights[rows]
            if self.guard is not None:
                filtered = self.guard(FilterInput(rows, own, received, weights))
                received, weights = filtered.received, filtered.weights
                self.flagged += int((filtered.suspicion > 0).sum())
            self.merger(own, received, weights, out=out[start:start + len(rows)])

    def pairs(self, run: list[Pair]) -> None:
        """Disjoint pairwise exchanges at once: each end merges the other's pre-exchange vector."""
        u = torch.tensor([p.owner for p in run])
        v = torch.tensor([p.peer for p in run])
        weights = torch.full((len(run), 2), 0.5, dtype=torch.float64)
        x_u, x_v = self.x[u.to(self.device)], self.x[v.to(self.device)]
        new_u = self._merge_pair(u, x_u, x_v, weights)
        new_v = self._merge_pair(v, x_v, x_u, weights)
        self.x[u.to(self.device)] = new_u
        self.x[v.to(self.device)] = new_v
        self.bytes_sent += 2 * len(run) * self.layout.size * 4

    def _merge_pair(self, rows: torch.Tensor, own: torch.Tensor, other: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        received = [other]
        if self.guard is not None:
            filtered = self.guard(FilterInput(rows, own, received, weights))
            received, weights = filtered.received, filtered.weights
            self.flagged += int((filtered.suspicion > 0).sum())
        out = self.merger(own, received, weights, out=torch.empty_like(own))
        self.rolled_back += keep_finite(out, own)
        return out

    def _bind(self) -> None:
        """Point the optimiser and the gradient at the current parameter buffer after a swap."""
        self.training.params = self.x[:, :self.layout.n_trainable]
        self.gradient.matrix = self.x

    # -- what the loop reads

    def vectors(self) -> torch.Tensor:
        return self.x

    def state(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "flagged": self.flagged, "rolled_back": self.rolled_back,
                "guard": self.guard.state() if self.guard else None}

    def restore(self, vectors: torch.Tensor, state: dict[str, Any]) -> None:
        self.x.copy_(vectors)
        self.bytes_sent, self.flagged, self.rolled_back = state["bytes_sent"], state["flagged"], state["rolled_back"]
        if self.guard is not None:
            self.guard.load_state(state["guard"])

    def counters(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "rejected": {}, "flagged": self.flagged,
                "rolled_back": self.rolled_back}

