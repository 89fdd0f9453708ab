"""Filters: what an honest node does with the vectors it received before it merges them.

A filter sees B nodes at once (a FilterInput) and says what the merge should use instead (a
FilterOutput): changed received rows, changed weights, or one aggregate row that replaces them,
never writing into its inputs (a received vector may be shared by every recipient). It also says
how suspicious each sender looked, in [0, 1], which runtimes add up per neighbour to report who
misbehaved. Filters chain: each one's output is the next one's input.

`DistanceGuard` is the floor every runtime applies to untrusted input: a vector from a neighbour
may move a node at most a bounded distance, learned from that node's recent honest traffic.

The Byzantine-robust rules, each over the node's own vector and the senders that arrived (a
sender with weight 0 is ignored, whatever its row holds):
- `CoordinateMedian`, `TrimmedMean`: per coordinate, an aggregate returned as one row.
- `Krum` (multi-Krum), `Balance`: select or reject senders (weight 0), the merge averages the rest.
- `ClippedGossip`: self-centred clipping of every received row, weights unchanged.
- `Bristle`: distance-based prioritizer, then a per-class performance-based integrator.
`FILTERS` names them for the config; `resolve_filter` builds a built-in or a user's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..params import Layout
from ..seeding import FILTER_STREAM, round_seed
from .merge import finite_rows
from .plugins import Parameter, construct, is_plugin_name, load_callable, parameter_table

GUARD_MODES = ("auto", "on", "off")
WARMUP = 4  # accepted distances a node must have seen before its learned bound is used


@dataclass(frozen=True)
class FilterInput:
    """B nodes' view of one exchange. `rows` are the nodes' indices in the filter's population (the
    node ids in the vectorized engine, [0] for a Node); `received` holds K tensors of (B, d), one per
    sender slot, as the merge rules take them; `weights` (B, K + 1) are the mixing weights of the
    node itself (column 0) and each sender, 0 for a sender that did not arrive (its row is finite
    but meaningless). `nodes` (B,) and `senders` (B, K) are the global ids of the receiving nodes
    and of each slot's sender: rules that draw at random key their draws on them, so that every
    runtime, however it orders or pads its slots, draws alike (None: `rows`, and no sender ids)."""
    rows: torch.Tensor
    own: torch.Tensor
    received: Sequence[torch.Tensor]
    weights: torch.Tensor
    round: int = 0
    step: int = 0
    nodes: torch.Tensor | None = None
    senders: torch.Tensor | None = None


@dataclass(frozen=True)
class FilterOutput:
    """What to merge instead: `received` (K' tensors of (B, d)) with `weights` (B, K' + 1), and a
    (B, K) suspicion per original sender slot: 0 = taken as sent, 1 = discarded entirely."""
    received: Sequence[torch.Tensor]
    weights: torch.Tensor
    suspicion: torch.Tensor


Filter = Callable[[FilterInput], FilterOutput]
Recall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (nodes (B,), models (B, M, d)) -> (B, M, C)


class FilterChain:
    """Filters applied in order, each to the previous one's output. A sender's suspicion is the
    largest any filter gave it while the slots were still the senders; once a filter has replaced
    them by an aggregate, later filters' suspicion concerns that aggregate and is not charged."""

    def __init__(self, filters: Sequence[Filter]):
        self.filters = list(filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def state(self) -> list[dict | None]:
        """What a checkpoint keeps: the state of each filter that learns (the guard's history)."""
        return [rule.state() if hasattr(rule, "state") else None for rule in self.filters]

    def load_state(self, state: list[dict | None]) -> None:
        for rule, saved in zip(self.filters, state):
            if saved is not None:
                rule.load_state(saved)

    def __call__(self, batch: FilterInput) -> FilterOutput:
        k = len(batch.received)
        suspicion = torch.zeros(batch.own.shape[0], k, dtype=torch.float64)
        received, weights, slots_are_senders = batch.received, batch.weights, True
        for rule in self.filters:
            out = rule(replace(batch, received=received, weights=weights))
            if slots_are_senders:
                suspicion = torch.maximum(suspicion, out.suspicion.to(suspicion))
            received, weights = out.received, out.weights
            slots_are_senders = slots_are_senders and len(received) == k
        return FilterOutput(received, weights, suspicion)


# -- shared pieces


def distances(own: torch.Tensor, received: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K) float64: ||x_k - x_own|| for each sender slot."""
    out = own.new_empty((own.shape[0], len(received)), dtype=torch.float64)
    for k, x in enumerate(received):
        out[:, k] = torch.linalg.vector_norm(x - own, dim=1).double()
    return out


def pulled(own: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of x whose `rows` (B,) bool are moved to own + (x - own) * scale (B,), and to own
    where that is not finite (x - own can overflow): ClippedGossip's clip(x - own) added to own."""
    moved = torch.addcmul(own, x - own, scale.to(own.device, own.dtype)[:, None])
    moved = torch.where(finite_rows(moved)[:, None], moved, own)
    return torch.where(rows.to(own.device)[:, None], moved, x)


def clipped_senders(own: torch.Tensor, received: Sequence[torch.Tensor], distance: torch.Tensor,
                    radius: torch.Tensor, present: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each present sender clipped to within `radius` (B,) of the node (distance (B, K) as
    `distances` gives it): the rows to merge, a row block copied only where one of its rows is
    clipped, and each slot's suspicion, the share clipped away (1 - radius / distance)."""
    clipped = present & ~(distance <= radius[:, None])  # an overflowed (inf) distance is clipped too
    scale = radius[:, None] / distance
    rows = [pulled(own, x, scale[:, j], clipped[:, j]) if bool(clipped[:, j].any()) else x
            for j, x in enumerate(received)]
    return rows, torch.where(clipped, 1.0 - scale.nan_to_num(0.0), 0.0)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """(B, n) the 0-based rank of each entry in its row, ascending; ties keep slot order."""
    order = torch.argsort(values, dim=1, stable=True)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def kept_weights(weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mixing weights with the senders not `kept` (B, K + 1 bool, column 0 the node) set to 0; a
    row left without weight keeps the node's own vector alone."""
    out = torch.where(kept, weights, 0.0)
    out[:, 0] = torch.where(out.sum(dim=1) > 0, out[:, 0], 1.0)
    return out


def aggregate(vector: torch.Tensor, suspicion: torch.Tensor) -> FilterOutput:
    """An aggregate the merge must return as is: one row, weights [0, 1]."""
    weights = torch.zeros(vector.shape[0], 2, dtype=torch.float64, device=suspicion.device)
    weights[:, 1] = 1.0
    return FilterOutput([vector], weights, suspicion)


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort (1968) for n inputs as compare-exchange pairs (i, j), i < j:
    about n log^2 n / 4 of them (16 for 7 inputs), each two elementwise ops over all B rows and d
    coordinates. For the few inputs a node merges this beats torch.sort, which sorts B * d rows of
    n values one by one (measured: 0.28 against 0.56 s for 64 nodes, 7 inputs, d = 101,770)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def sorted_inputs(batch: FilterInput, present: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The node's own vector and the present received ones sorted per coordinate, as K + 1 tensors
    (B, d) from smallest to largest, missing senders as +inf (sorted last); and each row's number
    of real inputs (B,). One (B, K + 1, d) copy, sorted in place."""
    real = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
    stacked = torch.stack([batch.own, *batch.received], dim=1)
    stacked.masked_fill_(~real[:, :, None], math.inf)
    columns = list(stacked.unbind(1))
    spare = torch.empty_like(columns[0])
    for i, j in sorting_network(len(columns)):
        torch.minimum(columns[i], columns[j], out=spare)
        torch.maximum(columns[i], columns[j], out=columns[j])
        columns[i], spare = spare, columns[i]
    return columns, real.sum(dim=1)


def order_statistic(columns: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """(B, d): row b of columns[index[b]] (columns as `sorted_inputs` returns them)."""
    low, high = int(index.min()), int(index.max())
    out = columns[low]
    for p in range(low + 1, high + 1):
        out = torch.where((index == p)[:, None], columns[p], out)
    return out


def masked_sum(columns: Sequence[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """(B, d): the sum over positions p with keep[b, p] of row b of columns[p]."""
    total = torch.zeros_like(columns[0])
    for p, column in enumerate(columns):
        if bool(keep[:, p].all()):
            total += column
        elif bool(keep[:, p].any()):
            total += torch.where(keep[:, p, None], column, 0.0)
    return total


def outside(received: Sequence[torch.Tensor], present: torch.Tensor, low: torch.Tensor,
            high: torch.Tensor) -> torch.Tensor:
    """(B, K) the share of coordinates in which each present sender lies outside [low, high]."""
    share = [torch.count_nonzero((x < low) | (x > high), dim=1).double() / x.shape[1] for x in received]
    return torch.stack(share, dim=1) * present if share else present.double()


# -- the distance guard


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
        distance = distances(own, received).cpu()
        bound = self.bound(rows, torch.linalg.vector_norm(own, dim=1).double().cpu())
        present = weights[:, 1:].cpu() > 0
        out, suspicion = clipped_senders(own, received, distance, bound, present)
        self._record(rows, torch.minimum(distance, bound[:, None]), present)
        return FilterOutput(out, weights, suspicion.to(weights.device))

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


# -- coordinate-wise rules


class CoordinateMedian:
    """Coordinate-wise median of the node's own vector and the senders that arrived, unweighted
    (the mean of the two middle values for an even count), as the decentralised median of He et
    al.'s reference code takes it over a node and its neighbours (Yin et al. 2018 for the rule).
    Suspicion: the share of coordinates in which a sender lies outside the range a trimmed mean
    cutting a quarter from each end would keep; the middle value itself would flag every sender
    in almost every coordinate, this leaves an honest sender about half and an outlier 1."""

    def __call__(self, batch: FilterInput) -> FilterOutput:
        present = batch.weights[:, 1:].to(batch.own.device) > 0
        ordered, n = sorted_inputs(batch, present)
        # lerp of two equal values is that value exactly: an odd count gives the middle value itself
        median = torch.lerp(order_statistic(ordered, (n - 1) // 2), order_statistic(ordered, n // 2), 0.5)
        q = n // 4
        suspicion = outside(batch.received, present, order_statistic(ordered, q), order_statistic(ordered, n - 1 - q))
        return aggregate(median, suspicion.to(batch.weights.device))


class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018; BRIDGE, Yang and Bajwa 2019, for the node and
    its neighbours): per coordinate, drop the `b` largest and `b` smallest of the node's own value
    and those of the senders that arrived, and average the rest, unweighted. With `fraction`, b =
    floor(fraction * n) for n inputs instead. b is capped so that one value remains (as the
    reference code lowers it). Suspicion: the share of coordinates in which a sender lay outside
    the kept range (ties with a kept value count as kept)."""

    def __init__(self, b: int = 1, fraction: float | None = None):
        if b < 0:
            raise ValueError(f"trimmed_mean.b must be >= 0, got {b}")
        if fraction is not None and not 0 <= fraction < 0.5:
            raise ValueError(f"trimmed_mean.fraction must be in [0, 0.5), got {fraction}")
        self.b, self.fraction = b, fraction

    def __call__(self, batch: FilterInput) -> FilterOutput:
        present = batch.weights[:, 1:].to(batch.own.device) > 0
        ordered, n = sorted_inputs(batch, present)
        t = torch.floor(self.fraction * n).long() if self.fraction is not None else torch.full_like(n, self.b)
        t = torch.minimum(t, (n - 1) // 2)
        position = torch.arange(len(ordered), device=n.device)
        keep = (position >= t[:, None]) & (position < (n - t)[:, None])
        mean = masked_sum(ordered, keep) / (n - 2 * t)[:, None].to(batch.own.dtype)
        suspicion = outside(batch.received, present, order_statistic(ordered, t), order_statistic(ordered, n - 1 - t))
        return aggregate(mean, suspicion.to(batch.weights.device))


# -- selecting and rejecting


class Krum:
    """(Multi-)Krum (Blanchard et al. 2017) over the node's own vector and the senders that
    arrived: each candidate's score is the sum of squared distances to its n - f - 2 nearest other
    candidates (at least 1, so a node with few arrivals still ranks them); the `m` lowest scores
    are kept with their mixing weights, the rest get weight 0 (the node's own vector too, if it
    is not among them). Ties go to the node's own vector, then to the lower slot. Suspicion 1 for
    an excluded sender. Krum's guarantee needs n > 2f + 2; below that it still runs."""

    def __init__(self, f: int = 1, m: int = 1):
        if f < 0:
            raise ValueError(f"krum.f must be >= 0, got {f}")
        if m < 1:
            raise ValueError(f"krum.m must be >= 1, got {m}")
        self.f, self.m = f, m

    def __call__(self, batch: FilterInput) -> FilterOutput:
        device = batch.own.device
        weights = batch.weights.to(device)
        real = torch.cat([torch.ones_like(weights[:, :1], dtype=torch.bool), weights[:, 1:] > 0], dim=1)
        stacked = torch.stack([batch.own, *batch.received], dim=1)
        squared = torch.cdist(stacked, stacked, compute_mode="donot_use_mm_for_euclid_dist").double() ** 2
        n, width = real.sum(dim=1), real.shape[1]
        pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(width, dtype=torch.bool, device=device)
        nearest = torch.where(pairs, squared, math.inf).sort(dim=2).values
        counted = torch.arange(width, device=device) < (n - self.f - 2).clamp_min(1)[:, None]
        score = torch.where(counted[:, None, :], nearest, 0.0).sum(dim=2)
        selected = real & (ranks(torch.where(real, score, math.inf)) < n.clamp_max(self.m)[:, None])
        suspicion = (real[:, 1:] & ~selected[:, 1:]).double()
        return FilterOutput(batch.received, kept_weights(weights, selected).to(batch.weights.device),
                            suspicion.to(batch.weights.device))


class Balance:
    """BALANCE (Fang et al. 2024): accept sender j when ||x_i - x_j|| <= gamma * exp(-kappa * t /
    T) * ||x_i||, t the round and T the run's rounds, so the admitted distance shrinks as training
    converges; rejected senders get weight 0 (suspicion 1). The paper then sets x_i <- alpha x_i +
    (1 - alpha) * mean of the accepted; here the node's mixing weights play that role, or with
    `alpha` set exactly the paper's update (the accepted weighted equally). A node that accepts
    nobody keeps its own vector, as in the paper."""

    def __init__(self, rounds: int, gamma: float = 0.3, kappa: float = 1.0, alpha: float | None = None):
        if rounds < 1:
            raise ValueError(f"balance needs the run's rounds (>= 1), got {rounds}")
        if gamma <= 0:
            raise ValueError(f"balance.gamma must be > 0, got {gamma}")
        if kappa < 0:
            raise ValueError(f"balance.kappa must be >= 0, got {kappa}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"balance.alpha must be in [0, 1], got {alpha}")
        self.rounds, self.gamma, self.kappa, self.alpha = rounds, gamma, kappa, alpha

    def __call__(self, batch: FilterInput) -> FilterOutput:
        device = batch.own.device
        weights = batch.weights.to(device)
        present = weights[:, 1:] > 0
        radius = self.gamma * math.exp(-self.kappa * batch.round / self.rounds)
        limit = radius * torch.linalg.vector_norm(batch.own, dim=1).double()
        accepted = present & (distances(batch.own, batch.received) <= limit[:, None])
        if self.alpha is None:
            out = kept_weights(weights, torch.cat([torch.ones_like(accepted[:, :1]), accepted], dim=1))
        else:
            count = accepted.sum(dim=1, keepdim=True)
            own_weight = torch.where(count > 0, self.alpha, 1.0).double()
            out = torch.cat([own_weight, accepted.double() * (1 - self.alpha) / count.clamp_min(1)], dim=1)
        suspicion = (present & ~accepted).double()
        return FilterOutput(batch.received, out.to(batch.weights.device), suspicion.to(batch.weights.device))


# -- clipping


class ClippedGossip:
    """Self-centred clipping (He, Karimireddy, Jaggi 2022): x_i <- sum_j W_ij (x_i + clip(x_j - x_i,
    tau_i)), clip(z, tau) = z * min(1, tau / ||z||). That is the weighted mean of the node and the
    rows x_i + clip(x_j - x_i), so this returns those rows with the weights unchanged, and a
    Byzantine sender moves x_i by at most W_ij * tau_i. Suspicion: the share clipped away, 1 -
    tau_i / ||x_j - x_i||, for a clipped sender.

    tau_i is `tau` when set. Otherwise it is adaptive: the paper's radius, sqrt(sum over honest j of
    W_ij ||x_i - x_j||^2 / delta_i) for delta_i the node's mixing weight on Byzantine neighbours,
    needs to know who is honest, so, as the authors' code does, the farthest senders are clipped
    to the distance of the nearest unclipped one: senders in order of decreasing distance are
    clipped until their mixing weight reaches `delta`, the weight assumed Byzantine (their code
    clips exactly the farthest neighbour, which `delta` = 0.1 gives on graphs of degree up to 9
    with Metropolis weights). A node with one sender, or whose senders are all in that share,
    takes the nearest one's distance; delta = 0 clips nothing."""

    def __init__(self, tau: float | None = None, delta: float = 0.1):
        if tau is not None and tau < 0:
            raise ValueError(f"clipped_gossip.tau must be >= 0, got {tau}")
        if not 0 <= delta <= 1:
            raise ValueError(f"clipped_gossip.delta must be in [0, 1], got {delta}")
        self.tau, self.delta = tau, delta

    def radius(self, distance: torch.Tensor, weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B,) tau_i from the senders' distances and mixing weights (B, K)."""
        if self.tau is not None or distance.shape[1] == 0:
            return distance.new_full((distance.shape[0],), math.inf if self.tau is None else self.tau)
        order = torch.argsort(torch.where(present, distance, -1.0), dim=1, descending=True, stable=True)
        far, real = distance.gather(1, order), present.gather(1, order)
        w = torch.where(real, weights.gather(1, order), 0.0)
        clipped = real & (torch.cumsum(w, dim=1) - w < self.delta)
        rest = real & ~clipped
        largest_rest = torch.where(rest, far, -math.inf).amax(dim=1)
        nearest = torch.where(present, distance, math.inf).amin(dim=1)
        return torch.where(rest.any(dim=1), largest_rest, nearest)

    def __call__(self, batch: FilterInput) -> FilterOutput:
        device = batch.own.device
        weights = batch.weights.to(device)
        present = weights[:, 1:] > 0
        distance = distances(batch.own, batch.received)
        tau = self.radius(distance, weights[:, 1:], present)
        out, suspicion = clipped_senders(batch.own, batch.received, distance, tau, present)
        return FilterOutput(out, batch.weights, suspicion.to(batch.weights.device))


# -- Bristle


def class_rows(layout: Layout) -> torch.Tensor:
    """(C, h + 1) positions in the flat vector of the parameters that produce each logit c: row c
    of the last layer's weight (C, h) and element c of its bias (when the entry after the weight
    is a bias of C elements)."""
    entries = list(layout.entries)
    last = max((i for i, e in enumerate(entries) if e.kind == "param" and len(e.shape) >= 2), default=None)
    if last is None:
        raise ValueError("bristle needs a model whose last layer has a weight matrix")
    weight = entries[last]
    classes, width = weight.shape[0], weight.numel // weight.shape[0]
    rows = weight.offset + torch.arange(classes * width).view(classes, width)
    after = entries[last + 1] if last + 1 < len(entries) else None
    if after is not None and after.kind == "param" and after.shape == (classes,):
        rows = torch.cat([rows, (after.offset + torch.arange(classes))[:, None]], dim=1)
    return rows


def recall_per_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., C) recall of each class from logits (..., n, C) and labels broadcastable to (..., n):
    the share of class-c examples predicted c, NaN for a class without examples. A label < 0 marks
    padding (for validation splits of unequal sizes)."""
    classes = logits.shape[-1]
    labels = labels.expand(logits.shape[:-1])
    real = labels >= 0
    truth = torch.nn.functional.one_hot(labels.clamp_min(0), classes).bool() & real[..., None]
    hit = truth & (logits.argmax(dim=-1) == labels)[..., None]
    return hit.sum(dim=-2).double() / truth.sum(dim=-2).double()  # 0 / 0 = NaN: class absent


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash in int64 arithmetic; multipliers below 2^31 keep every product below
    2^63, so nothing overflows on any device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(seed: int, *keys: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws, one per element of the broadcast `keys` (int64 tensors), that depend on
    nothing but (seed, keys): the same in every runtime, batch and order, with no loop over nodes."""
    shape = torch.broadcast_shapes(*(k.shape for k in keys))
    h = torch.full(shape, seed & _MASK32, dtype=torch.long, device=keys[0].device)
    h = _mix32(h ^ (seed >> 32 & _MASK32))
    for key in keys:
        h = _mix32(h ^ _mix32((key.long() & _MASK32) * 0x61C88647 & _MASK32))
    return h.double() / 2**32


class Bristle:
    """Bristle (Verbraeken, de Vos, Pouwelse 2021), from the paper and the authors' reference code.

    Prioritizer: keep the `closest` senders nearest to the node's own vector (Euclidean) plus
    `random` of the others drawn uniformly, keyed on (seed, node, round, step, sender) so that every
    runtime draws alike; the rest get weight 0 (suspicion 1).

    Integrator (`integrate`): `recall(nodes, models)` gives each kept model's recall on each class on
    the node's validation split (NaN for a class absent there). For a class c present there, with
    r_i, r_j the node's and sender j's recall: d = 10 |r_j - r_i|, score s = d^(3 + r_i) if r_j >
    r_i else -d^(4 + r_i); certainty_j = max(0, mean - std of j's recalls over the present
    classes); weight w_jc = certainty_j * max(0, 10 sigmoid(s / 100) - 4) (0 below s = -40.5, so
    the reference's bound of s at -100 changes nothing and is left out). The
    rows producing logit c (last-layer weight row and bias) become x_i + sum_j w_jc (x_j - x_i) /
    (1 + sum_j w_jc): the node weighs itself 1. A class absent from the split, and (departure)
    every parameter outside the class rows, gets the reference code's per-sender weight for
    classes it cannot judge: w_j = certainty_j * max(0, 10 sigmoid(sum_c s_jc / 100) - 4). Bristle exchanges only the last layer over a frozen shared feature extractor,
    where those parameters are equal everywhere and this changes nothing; with whole models it
    keeps a sender that is worse on every class out of the feature layers too. Departure: the
    reference's "sequential attack" penalty, which charges a sender for the recalls of the senders
    evaluated before it, is left out (it depends on their order). The result is returned as one
    aggregate row; suspicion of a kept sender is 1 - its mean class weight / the best sender's."""

    def __init__(self, seed: int = 0, layout: Layout | None = None, recall: Recall | None = None,
                 closest: int = 50, random: int = 5, integrate: bool = True):
        if closest < 0 or random < 0:
            raise ValueError(f"bristle.closest and bristle.random must be >= 0, got {closest}, {random}")
        if integrate and (recall is None or layout is None):
            raise ValueError("bristle's integrator needs the runtime's recall function and the model layout "
                             "(set bristle.integrate = false for the prioritizer alone)")
        self.seed, self.closest, self.random, self.integrate = seed, closest, random, integrate
        self.recall = recall
        self.rows = class_rows(layout) if integrate and layout is not None else None

    def prioritize(self, batch: FilterInput, present: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: the senders kept."""
        distance = torch.where(present, distances(batch.own, batch.received), math.inf)
        closest = present & (ranks(distance) < self.closest)
        others = present & ~closest
        if self.random == 0 or not bool(others.any()):
            return closest
        if batch.senders is None:
            raise ValueError("bristle's random picks need FilterInput.senders (the slots' node ids)")
        nodes = batch.rows if batch.nodes is None else batch.nodes
        keys = keyed_uniform(round_seed(self.seed, FILTER_STREAM, batch.round, batch.step),
                             nodes.to(distance.device)[:, None], batch.senders.to(distance.device))
        return closest | (others & (ranks(torch.where(others, keys, math.inf)) < self.random))

    def __call__(self, batch: FilterInput) -> FilterOutput:
        device = batch.own.device
        weights = batch.weights.to(device)
        present = weights[:, 1:] > 0
        kept = self.prioritize(batch, present)
        rejected = (present & ~kept).double()
        if not self.integrate or not bool(kept.any()):
            out = kept_weights(weights, torch.cat([torch.ones_like(kept[:, :1]), kept], dim=1))
            return FilterOutput(batch.received, out.to(batch.weights.device), rejected.to(batch.weights.device))
        vector, trust = self.integrated(batch, kept)
        return aggregate(vector, torch.where(kept, 1.0 - trust, rejected).to(batch.weights.device))

    def integrated(self, batch: FilterInput, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The integrated vector (B, d) and each slot's weight relative to the best kept sender."""
        own = batch.own
        count = kept.sum(dim=1)
        m = int(count.max())
        slots = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :m]  # kept slots first
        valid = torch.arange(m, device=own.device) < count[:, None]
        stacked = torch.stack(list(batch.received), dim=1)
        peers = stacked.gather(1, slots[:, :, None].expand(-1, -1, own.shape[1]))
        peers = torch.where(valid[:, :, None], peers, own[:, None])  # padding: the node itself, weight 0
        nodes = batch.rows if batch.nodes is None else batch.nodes
        recall = self.recall(nodes, torch.cat([own[:, None], peers], dim=1))
        if tuple(recall.shape) != (own.shape[0], m + 1, self.rows.shape[0]):
            raise ValueError(f"bristle: recall returned shape {tuple(recall.shape)}, expected "
                             f"({own.shape[0]}, {m + 1}, {self.rows.shape[0]})")
        class_weight, sender_weight = bristle_weights(recall.to(own.device, torch.float64), valid)
        diff = peers - own[:, None]
        total = (1 + sender_weight.sum(dim=1))[:, None]
        vector = own + torch.einsum("bm,bmd->bd", (sender_weight / total).to(own.dtype), diff)
        rows = self.rows.to(own.device)
        familiar = ~torch.isnan(recall[:, 0]).to(own.device)
        class_total = (1 + class_weight.sum(dim=1))[:, :, None]
        by_class = own[:, rows] + torch.einsum("bmc,bmch->bch", class_weight.to(own.dtype), diff[:, :, rows]) \
            / class_total.to(own.dtype)
        vector[:, rows] = torch.where(familiar[:, :, None], by_class, vector[:, rows])
        judged = torch.where(familiar.any(dim=1, keepdim=True),
                             torch.where(familiar[:, None], class_weight, 0.0).sum(dim=2)
                             / familiar.sum(dim=1, keepdim=True).clamp_min(1), sender_weight)
        best = judged.amax(dim=1, keepdim=True)
        relative = torch.where(best > 0, judged / best, 0.0)
        trust = torch.zeros(kept.shape, dtype=torch.float64, device=own.device)
        trust.scatter_(1, slots, torch.where(valid, relative, 0.0))
        return vector, trust


def bristle_weights(recall: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bristle's integrator weights from recalls (B, 1 + m, C) (the node first, then m senders;
    NaN for classes absent from the node's split) and which of the m senders are real (B, m):
    per (sender, class) weights (B, m, C), 0 for absent classes, and per-sender weights (B, m)."""
    mine, theirs = recall[:, :1], recall[:, 1:]
    familiar = ~torch.isnan(mine)
    diff = 10 * (theirs - mine).abs()
    score = torch.where(theirs > mine, diff ** (3 + mine), -(diff ** (4 + mine)))
    score = torch.where(familiar, score, 0.0)
    shown = familiar.expand_as(theirs)
    count = shown.sum(dim=2).clamp_min(1)
    mean = torch.where(shown, theirs, 0.0).sum(dim=2) / count
    std = (torch.where(shown, theirs - mean[:, :, None], 0.0) ** 2).sum(dim=2).div(count).sqrt()
    certainty = (mean - std).clamp_min(0) * valid * familiar.any(dim=2)

    def weight(s: torch.Tensor) -> torch.Tensor:
        return (10 * torch.sigmoid(s / 100) - 4).clamp_min(0)

    class_weight = certainty[:, :, None] * weight(score) * familiar
    sender_weight = certainty * weight(score.sum(dim=2))
    return class_weight, sender_weight


# -- naming filters in a config


@dataclass(frozen=True)
class FilterContext:
    """What a run knows that a filter may need: the model layout, the number of rounds, the
    experiment seed, and (where the runtime can evaluate models) Bristle's recall function."""
    layout: Layout | None = None
    rounds: int = 1
    seed: int = 0
    recall: Recall | None = None


CONTEXT_ARGUMENTS = ("population", "layout", "rounds", "seed", "recall")


@dataclass(frozen=True)
class FilterSpec:
    """A built-in filter: the class, and the meaning of each of its configurable parameters (their
    defaults are the class's own; arguments named in CONTEXT_ARGUMENTS come from the run)."""
    rule: Callable[..., Filter]
    meanings: Mapping[str, str]

    @property
    def parameters(self) -> dict[str, Parameter]:
        return parameter_table(self.rule, self.meanings, CONTEXT_ARGUMENTS)


FILTERS: dict[str, FilterSpec] = {
    "median": FilterSpec(CoordinateMedian, {}),
    "trimmed_mean": FilterSpec(TrimmedMean, {
        "b": "values dropped from each end per coordinate",
        "fraction": "if set, drop floor(fraction * n) of the n values from each end instead of b"}),
    "krum": FilterSpec(Krum, {
        "f": "senders assumed Byzantine: a score sums the n - f - 2 nearest squared distances",
        "m": "vectors kept (1 = Krum, more = multi-Krum, averaged with their mixing weights)"}),
    "clipped_gossip": FilterSpec(ClippedGossip, {
        "tau": "fixed clipping radius; unset = adaptive per node and step",
        "delta": "adaptive radius: mixing weight assumed Byzantine; the farthest senders up to it are clipped"}),
    "balance": FilterSpec(Balance, {
        "gamma": "accept a sender within gamma * exp(-kappa * round / rounds) * ||own||",
        "kappa": "how fast the accepted distance shrinks over the run",
        "alpha": "if set, the paper's update: own weight alpha, the accepted share 1 - alpha equally"}),
    "bristle": FilterSpec(Bristle, {
        "closest": "senders nearest the node's own vector kept by the prioritizer",
        "random": "further senders kept at random (seeded per node, round, step and sender)",
        "integrate": "weigh each class by recall on the node's validation split (needs the runtime's recall)"}),
}


def resolve_filter(name_or_path: str, population: int, context: FilterContext, **params: Any) -> Filter:
    """The built-in filter `name` built with `params`, or the user's `package.module:function`
    (which takes a FilterInput and returns a FilterOutput, and no parameters)."""
    if is_plugin_name(name_or_path):
        if params:
            raise ValueError(f"filter {name_or_path!r}: a user-supplied filter takes no parameters, got {sorted(params)}")
        return checked_filter(name_or_path, load_callable(name_or_path, "filter"))
    spec = FILTERS.get(name_or_path)
    if spec is None:
        raise ValueError(f"filter {name_or_path!r}; choose one of {', '.join(FILTERS)}, or give 'package.module:function'")
    provided = {"population": population, "layout": context.layout, "rounds": context.rounds,
                "seed": context.seed, "recall": context.recall}
    return construct("filter", name_or_path, spec.rule, spec.parameters, provided, params)


def checked_filter(name: str, rule: Filter) -> Filter:
    """A user's filter whose every output is checked against the interface, with a clear message."""
    def run(batch: FilterInput) -> FilterOutput:
        out = rule(batch)
        b, k = batch.own.shape[0], len(batch.received)
        if not isinstance(out, FilterOutput):
            raise ValueError(f"filter {name!r} returned {type(out).__name__}, not a FilterOutput")
        shapes_ok = (all(tuple(x.shape) == tuple(batch.own.shape) for x in out.received)
                     and tuple(out.weights.shape) == (b, len(out.received) + 1)
                     and tuple(out.suspicion.shape) == (b, k))
        if not shapes_ok:
            raise ValueError(f"filter {name!r} returned received {[tuple(x.shape) for x in out.received]}, "
                             f"weights {tuple(out.weights.shape)}, suspicion {tuple(out.suspicion.shape)}; "
                             f"expected K' rows of {tuple(batch.own.shape)}, ({b}, K' + 1) and ({b}, {k})")
        return out
    return run
