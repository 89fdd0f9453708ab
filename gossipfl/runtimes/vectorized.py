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

from ..algorithms.attacks import pair_inputs
from ..algorithms.merge import keep_finite
from ..algorithms.robust import FilterInput
from ..algorithms.schedule import Broadcast, Pair, RoundPlan, pair_batches
from ..algorithms.train import LocalTraining, StackedBatch, StackedGradient, learning_rate, local_batches
from ..experiment import Experiment
from .sim import lock_step

GATHER_BYTES = 256 << 20  # received rows gathered at once on the guarded path


class VectorizedEngine:
    resumable = True

    def __init__(self, experiment: Experiment, device: torch.device):
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
        self._graph(experiment)
        self._data(experiment)
        self.merger = experiment.merger(layout)
        self.filters = experiment.filters(n, network=False, device=device)
        self._attackers(experiment)
        self.bytes_sent = self.flagged = self.rolled_back = 0

    def _attackers(self, experiment: Experiment) -> None:
        n, k = self.n, self.neighbours.shape[1]
        self.attack, self.seed = experiment.attack, experiment.cfg.seed
        self.attacker_ids = torch.tensor(experiment.attackers, dtype=torch.long)
        self.is_attacker = torch.zeros(n, dtype=torch.bool)
        self.is_attacker[self.attacker_ids] = True
        self.honest = torch.tensor(experiment.honest, dtype=torch.long)
        self.attacker_slot = {a: i for i, a in enumerate(experiment.attackers)}
        self.attacker_start = torch.empty(len(experiment.attackers), self.layout.size, device=self.device)
        self.seen = torch.zeros(n, k, dtype=torch.long)       # messages each node merged, per sender slot
        self.suspicion = torch.zeros(n, k, dtype=torch.float64)  # and their summed suspicion
        self.filtered = bool(self.filters) or len(experiment.attackers) > 0

    def _data(self, experiment: Experiment) -> None:
        ds = experiment.dataset
        self.train_x = ds.train_inputs().to(self.device)
        self.train_y = ds.y_train.clone()
        self.parts = [torch.from_numpy(p) for p in experiment.parts]
        attack = experiment.attack
        if attack is not None and attack.label_map is not None:  # data poisoning: the attackers' own labels
            for a in experiment.attackers:
                self.train_y[self.parts[a]] = attack.label_map(self.train_y[self.parts[a]], ds.num_classes)
        self.train_y = self.train_y.to(self.device)

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

    def batches(self, round_index: int, nodes: list[int] | None = None) -> list[StackedBatch]:
        """The nodes' minibatches of the round (all nodes by default), drawn as a Node draws them,
        padded to one width."""
        t, seed = self.cfg.train, self.cfg.seed
        nodes = list(range(self.n)) if nodes is None else nodes
        local = [local_batches(seed, i, round_index, len(self.parts[i]), t.local_steps, t.batch_size) for i in nodes]
        width = max(b.shape[1] for b in local)
        index = torch.zeros(t.local_steps, len(nodes), width, dtype=torch.long)
        mask = torch.zeros(t.local_steps, len(nodes), width)
        for row, (b, i) in enumerate(zip(local, nodes)):
            index[:, row, :b.shape[1]] = self.parts[i][b]
            mask[:, row, :b.shape[1]] = 1.0
        index, mask = index.to(self.device), mask.to(self.device)
        padded = not bool(mask.all())
        return [StackedBatch(self.train_x[index[s]], self.train_y[index[s]], mask[s] if padded else None)
                for s in range(t.local_steps)]

    def train(self, round_index: int) -> float:
        self.spare.copy_(self.x)
        self.attacker_start.copy_(self.x[self.attacker_ids.to(self.device)])
        losses = self.training.run(self.batches(round_index), self.gradient, learning_rate(self.cfg.train, round_index))
        if self.attack is not None and not self.attack.trains:  # free riders keep their vectors
            self.x[self.attacker_ids.to(self.device)] = self.attacker_start
        self.rolled_back += keep_finite(self.x, self.spare)
        return float(losses[self.honest].mean())

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        return lock_step(self, plan)

    def train_nodes(self, round_index: int, ids: list[int], starts: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Sampled rounds: these nodes train one round from `starts`, batched in their own buffers."""
        if not ids:
            return starts, []
        x = starts.to(self.device).clone()
        grad = torch.zeros(len(ids), self.layout.n_trainable, device=self.device)
        training = LocalTraining(x[:, :self.layout.n_trainable], grad, self.cfg.train)
        gradient = StackedGradient(self.gradient.stacked, self.layout, x, grad)
        losses = training.run(self.batches(round_index, ids), gradient, learning_rate(self.cfg.train, round_index))
        self.rolled_back += keep_finite(x, starts.to(self.device))
        self.set_vectors(ids, x)
        return x, losses.tolist()

    def set_vectors(self, ids: list[int], vectors: torch.Tensor) -> None:
        self.x[torch.tensor(ids, device=self.device)] = vectors.to(self.device)

    # -- gossip

    def exchange(self, plan: RoundPlan) -> None:
        pairs: list[Pair] = []
        for e in plan.exchanges + [None]:
            if isinstance(e, Pair):
                pairs.append(e)
                continue
            if self.filtered:  # filters and attacks see one exchange (one step) at a time
                for pair in pairs:
                    self.pairs([pair], plan.round)
            else:
                for run in pair_batches(pairs) if pairs else []:
                    self.pairs(run, plan.round)
            pairs = []
            if isinstance(e, Broadcast):
                self.broadcast(plan.round, e.step)

    def broadcast(self, round_index: int, step: int) -> None:
        """One lock-step gossip step for all nodes, into the spare buffer, then swap."""
        out = self.spare
        if self.filtered:
            self._gathered_step(out, round_index, step)
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

    def _gathered_step(self, out: torch.Tensor, round_index: int, step: int) -> None:
        """Each chunk of nodes gathers its received rows, attackers' replaced by what they send, and
        merges them as a Node does: honest nodes through their filters, attackers plainly."""
        chunk = max(1, GATHER_BYTES // (self.neighbours.shape[1] * self.layout.size * 4))
        for start in range(0, self.n, chunk):
            rows = torch.arange(start, min(start + chunk, self.n))
            own, received, weights, senders = self._gather(rows)
            received = self._attacked(rows, own, received, weights, senders, round_index, step)
            self._merge(rows, own, received, weights, senders, round_index, step, out[start:start + len(rows)])

    def _gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        senders = self.neighbours[rows]
        return (self.x[rows.to(self.device)], list(self.x[senders.to(self.device)].unbind(1)),
                self.neighbour_weights[rows], senders)

    def _attacked(self, rows: torch.Tensor, own: torch.Tensor, received: list[torch.Tensor], weights: torch.Tensor,
                  senders: torch.Tensor, round_index: int, step: int) -> list[torch.Tensor]:
        """`received` with every attacker's slot towards an honest receiver replaced by what it sends."""
        byzantine = self.is_attacker[senders] & ~self.is_attacker[rows][:, None]
        if not bool(byzantine.any()):
            return received
        batch, slots = pair_inputs(round_index, step, self.seed, rows, own, received, weights, senders, byzantine,
                                   lambda a: self.attacker_start[self.attacker_slot[a]])
        sent = self.attack(batch)
        received = list(received)
        for column in slots[:, 1].unique().tolist():
            received[column] = received[column].clone()  # copy on write: the gather may be shared
        for p, (b, k) in enumerate(slots.tolist()):
            received[k][b] = sent[p]
        return received

    def _merge(self, rows: torch.Tensor, own: torch.Tensor, received: list[torch.Tensor], weights: torch.Tensor,
               senders: torch.Tensor, round_index: int, step: int, out: torch.Tensor) -> None:
        honest = ~self.is_attacker[rows]
        if not self.filters or not bool(honest.any()):
            self.merger(own, received, weights, out=out)
            return
        h = honest.nonzero().flatten()
        everyone = len(h) == len(rows)
        part = (lambda t: t) if everyone else (lambda t: t[h.to(t.device)])  # noqa: E731
        filtered = self.filters(FilterInput(rows[h], part(own), [part(x) for x in received], weights[h], round_index,
                                            step, rows[h], senders[h]))
        present = weights[h, 1:] > 0
        self.seen[rows[h]] += present
        self.suspicion[rows[h]] += torch.where(present, filtered.suspicion.cpu(), 0.0)
        self.flagged += int((present & (filtered.suspicion.cpu() > 0)).sum())
        if everyone:
            self.merger(own, filtered.received, filtered.weights, out=out)
            return
        out[h.to(out.device)] = self.merger(part(own), filtered.received, filtered.weights,
                                            out=torch.empty_like(part(own)))
        a = (~honest).nonzero().flatten().to(own.device)
        out[a] = self.merger(own[a], [x[a] for x in received], weights[(~honest).nonzero().flatten()],
                             out=torch.empty_like(own[a]))

    def pairs(self, run: list[Pair], round_index: int) -> None:
        """Disjoint pairwise exchanges at once: each end merges the other's pre-exchange vector."""
        u = torch.tensor([p.owner for p in run])
        v = torch.tensor([p.peer for p in run])
        weights = torch.full((len(run), 2), 0.5, dtype=torch.float64)
        x_u, x_v = self.x[u.to(self.device)], self.x[v.to(self.device)]
        step = run[0].seq
        new_u = self._merge_pair(u, x_u, self._sent(v, u, x_v, round_index, step), weights, v, round_index, step)
        new_v = self._merge_pair(v, x_v, self._sent(u, v, x_u, round_index, step), weights, u, round_index, step)
        self.x[u.to(self.device)] = new_u
        self.x[v.to(self.device)] = new_v
        self.bytes_sent += 2 * len(run) * self.layout.size * 4

    def _sent(self, senders: torch.Tensor, receivers: torch.Tensor, vectors: torch.Tensor, round_index: int,
              step: int) -> torch.Tensor:
        """What `senders` send `receivers` in a pairwise exchange (one pair when attackers exist)."""
        if not bool((self.is_attacker[senders] & ~self.is_attacker[receivers]).any()):
            return vectors
        own, received, weights, neighbours = self._gather(receivers)
        received = self._attacked(receivers, own, received, weights, neighbours, round_index, step)
        slot = int((neighbours[0] == senders[0]).nonzero()[0])
        return received[slot]

    def _merge_pair(self, rows: torch.Tensor, own: torch.Tensor, other: torch.Tensor, weights: torch.Tensor,
                    senders: torch.Tensor, round_index: int, step: int) -> torch.Tensor:
        out = torch.empty_like(own)
        if self.filters and not bool(self.is_attacker[rows].any()):
            filtered = self.filters(FilterInput(rows, own, [other], weights, round_index, step, rows, senders[:, None]))
            self.flagged += int((filtered.suspicion > 0).sum())
            slot = (self.neighbours[rows] == senders[:, None]).long().argmax(dim=1)
            self.seen[rows, slot] += 1
            self.suspicion[rows, slot] += filtered.suspicion[:, 0].cpu()
            self.merger(own, filtered.received, filtered.weights, out=out)
        else:
            self.merger(own, [other], weights, out=out)
        self.rolled_back += keep_finite(out, own)
        return out

    def _bind(self) -> None:
        """Point the optimiser and the gradient at the current parameter buffer after a swap."""
        self.training.params = self.x[:, :self.layout.n_trainable]
        self.gradient.matrix = self.x

    # -- what the loop reads

    def vectors(self) -> torch.Tensor:
        return self.x

    def observations(self) -> dict[tuple[int, int], tuple[int, float]]:
        """(observer, sender) -> (messages merged, summed suspicion), as honest nodes saw them."""
        return {(i, int(self.neighbours[i, k])): (int(self.seen[i, k]), float(self.suspicion[i, k]))
                for i in self.honest.tolist() for k in self.seen[i].nonzero().flatten().tolist()}

    def state(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "flagged": self.flagged, "rolled_back": self.rolled_back,
                "filters": self.filters.state(), "seen": self.seen.tolist(), "suspicion": self.suspicion.tolist()}

    def restore(self, vectors: torch.Tensor, state: dict[str, Any]) -> None:
        self.x.copy_(vectors)
        self.bytes_sent, self.flagged, self.rolled_back = state["bytes_sent"], state["flagged"], state["rolled_back"]
        self.filters.load_state(state["filters"])
        self.seen.copy_(torch.tensor(state["seen"]))
        self.suspicion.copy_(torch.tensor(state["suspicion"], dtype=torch.float64))

    def counters(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "rejected": {}, "flagged": self.flagged,
                "rolled_back": self.rolled_back}

