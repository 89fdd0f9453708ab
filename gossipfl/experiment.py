"""Everything an experiment derives from its config, built the same way in every runtime.

Given the same config, each runtime (the in-process simulator, a node process) gets the same
graph, mixing matrix, data partition and initial model, so their results can be compared.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch

from . import data, models
from .algorithms import schedule
from .algorithms.merge import Merger
from .algorithms.attacks import Attack, AttackContext, resolve_attack
from .algorithms.robust import DistanceGuard, FilterChain, FilterContext, resolve_filter
from .algorithms.sampling import Churn, default_sample_size
from .algorithms.schedule import RoundPlan
from .algorithms.train import LocalTraining, learning_rate, local_batches, module_gradient
from .config import ConfigError, ExperimentConfig
from .graph import mixing, sdp, topology, weights
from .metrics import Evaluator, ValidationRecall, suspects
from .params import FlatModel, Layout, StackedModule
from .runtimes.node import Node
from .seeding import INIT_ROUND, PLACEMENT_STREAM, VALIDATION_STREAM, round_seed
from .transport import Transport

class Experiment:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)

    @cached_property
    def graph(self) -> nx.Graph:
        t = self.cfg.topology
        if t.file:
            return topology.read_graph(t.file)
        return topology.build(t.kind, t.nodes, seed=self.cfg.seed, p=t.p, degree=t.degree, radius=t.radius,
                              k=t.k, rows=t.rows)

    @property
    def n(self) -> int:
        return self.graph.number_of_nodes()

    @cached_property
    def slow_nodes(self) -> list[int]:
        """timing.slow, checked against the graph: each a node that computes slow_factor times slower."""
        slow = self.cfg.timing.slow
        if any(i >= self.n for i in slow):
            raise ConfigError(f"timing.slow = {slow} names a node beyond the {self.n} nodes (ids 0..{self.n - 1})")
        return list(slow)

    @cached_property
    def weights(self) -> sdp.SolveResult:
        """The mixing matrix: loaded from gossip.weights_file, else computed (solved once per run)."""
        g = self.cfg.gossip
        if g.weights_file:
            graph = self.graph
            try:
                return weights.from_json(json.loads(Path(g.weights_file).read_text()), graph)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"gossip.weights_file = {g.weights_file!r} is not JSON ({exc})") from None
            except (OSError, ValueError) as exc:
                raise ConfigError(f"gossip.weights_file = {g.weights_file!r}: {exc}") from None
        result = weights.solve_weights(self.graph, g.weights)
        mixing.check(result.matrix, self.graph, doubly_stochastic=result.method != "uniform_neighbourhood")
        return result

    @property
    def mixing(self) -> np.ndarray:
        return self.weights.matrix

    @cached_property
    def rates(self) -> sdp.RatesResult:
        """Per-edge Poisson clock rates (schedule = "poisson"), summing to the rate budget."""
        g = self.cfg.gossip
        budget = g.rate_budget or self.n / 2
        return sdp.optimal_rates(self.graph, budget) if g.rates == "optimal" else sdp.uniform_rates(self.graph, budget)

    @cached_property
    def plan(self) -> Callable[[int], RoundPlan]:
        """plan(r): who trains and which exchanges happen in round r, the same in every runtime."""
        g = self.cfg.gossip
        if g.schedule == "poisson":
            return schedule.poisson_plan(self.rates.rates, self.rates.edges, g.poisson_time, self.cfg.seed)
        if g.schedule == "async":
            return schedule.async_plan(self.cfg.timing.compute_s)
        return schedule.sync_plan(g.steps)

    @cached_property
    def shard(self) -> data.Shard | None:
        """This node's slice of the data set from `gossipfl deploy init` (data.shard), checked to be
        cut from this config's data settings; None: the whole data set is loaded."""
        if not self.cfg.data.shard:
            return None
        shard = data.read_shard(self.cfg.data.shard)
        if shard.source != self.data_source():
            raise ConfigError(f"data.shard = {self.cfg.data.shard!r} was cut for other data settings "
                              f"({shard.source}); export it again with `gossipfl deploy init`")
        return shard

    def data_source(self) -> dict[str, Any]:
        """What decides each node's data: a shard records it, and must match the config reading it."""
        d = dataclasses.asdict(self.cfg.data)
        for key in ("path", "shard"):
            d.pop(key)
        d["dataset"] = data.resolve_name(self.cfg.data.dataset, self.cfg.data.path)
        fraction = self.cfg.robust.validation_fraction if self.needs_validation else None
        return {"data": d, "seed": self.cfg.seed, "nodes": self.n, "validation_fraction": fraction}

    @cached_property
    def dataset(self) -> data.Dataset:
        if self.shard:
            return self.shard.dataset
        d = self.cfg.data
        return data.load(d.dataset, d.path, seed=self.cfg.seed,
                         synthetic=(d.synthetic_samples, d.synthetic_features, d.synthetic_classes))

    @cached_property
    def partition(self) -> list[np.ndarray]:
        """Each node's share of the training set (from a shard: its own node's only)."""
        if self.shard:
            return self.shard.per_node(np.arange(len(self.dataset.y_train)), self.n)
        d = self.cfg.data
        return data.partition(self.dataset.y_train.numpy(), self.n, d.partition, seed=self.cfg.seed,
                              alpha=d.alpha, shards_per_node=d.shards_per_node)

    @cached_property
    def needs_validation(self) -> bool:
        """Whether a filter judges models on a local validation split (Bristle's integrator)."""
        r = self.cfg.robust
        return "bristle" in r.filters and r.options.get("bristle", {}).get("integrate", True)

    @cached_property
    def validation_parts(self) -> list[np.ndarray]:
        """Each node's validation split: robust.validation_fraction of its share (at least one
        sample), held out of training; empty unless a filter needs it."""
        if not self.needs_validation:
            return [np.empty(0, dtype=np.int64) for _ in range(self.n)]
        if self.shard:
            return self.shard.per_node(self.shard.validation, self.n)
        rng = np.random.default_rng(round_seed(self.cfg.seed, VALIDATION_STREAM))
        fraction = self.cfg.robust.validation_fraction
        return [np.sort(rng.choice(p, max(1, int(len(p) * fraction)), replace=False)) for p in self.partition]

    @cached_property
    def parts(self) -> list[np.ndarray]:
        """The samples each node trains on: its share without its validation split."""
        return [np.setdiff1d(p, v, assume_unique=True) for p, v in zip(self.partition, self.validation_parts)]

    @cached_property
    def local_test_parts(self) -> list[np.ndarray]:
        if self.shard:
            return self.shard.per_node(self.shard.local_test, self.n)
        return data.local_test_split(self.partition, self.dataset.y_train.numpy(), self.dataset.y_test.numpy(),
                                     seed=self.cfg.seed)

    # -- attackers, for evaluating filters

    @cached_property
    def attackers(self) -> list[int]:
        """The Byzantine nodes: byzantine.nodes, or byzantine.fraction of them placed from the seed."""
        b = self.cfg.byzantine
        if any(i >= self.n for i in b.nodes):
            raise ConfigError(f"byzantine.nodes = {b.nodes} names a node beyond the {self.n} nodes (ids 0..{self.n - 1})")
        if b.nodes:
            return sorted(b.nodes)
        count = round(b.fraction * self.n)
        rng = np.random.default_rng(round_seed(self.cfg.seed, PLACEMENT_STREAM))
        return sorted(rng.choice(self.n, count, replace=False).tolist())

    @property
    def honest(self) -> list[int]:
        bad = set(self.attackers)
        return [i for i in range(self.n) if i not in bad]

    @cached_property
    def attack(self) -> Attack | None:
        b = self.cfg.byzantine
        if not self.attackers:
            return None
        return resolve_attack(b.attack, AttackContext(self.n, len(self.attackers)), **b.options)

    def misbehaviour(self, observations: dict[tuple[int, int], tuple[int, float]]) -> dict[str, Any]:
        """The run summary's account of who attacked and who was suspected of it."""
        report = suspects(observations, self.cfg.byzantine.suspect_threshold, self.attackers)
        return {"attackers": self.attackers, **report}

    @cached_property
    def churn(self) -> Churn:
        """sampling's churn schedule, with crash_fraction placed from the seed and ids checked."""
        s = self.cfg.sampling
        for event in ("crash", "leave", "join"):
            nodes = getattr(s, f"{event}_nodes")
            if any(i >= self.n for i in nodes):
                raise ConfigError(f"sampling.{event}_nodes = {nodes} names a node beyond the {self.n} nodes")
        crash = s.crash_nodes
        if s.crash_fraction:
            rng = np.random.default_rng(round_seed(self.cfg.seed, PLACEMENT_STREAM, 1))
            crash = rng.choice(self.n, round(s.crash_fraction * self.n), replace=False).tolist()
        return Churn(self.n, s.crash_at, frozenset(crash), s.leave_at, frozenset(s.leave_nodes), s.join_at,
                     frozenset(s.join_nodes))

    @property
    def sample_size(self) -> int:
        return min(self.cfg.sampling.sample_size or default_sample_size(self.n), self.n)

    def recall(self, device: torch.device | str = "cpu") -> ValidationRecall:
        """Bristle's judge: models' per-class recall on each node's validation split."""
        held_out = np.concatenate(self.validation_parts)
        position = {int(i): k for k, i in enumerate(held_out.tolist())}
        local = [np.array([position[int(i)] for i in v], dtype=np.int64) for v in self.validation_parts]
        index = torch.from_numpy(held_out)
        return ValidationRecall(self.stacked_model(training=False), self.dataset.train_inputs(index).to(device),
                                self.dataset.y_train[index], local)

    def filters(self, population: int, network: bool, device: torch.device | str = "cpu") -> FilterChain:
        """What an honest node applies to what it received: the guard (where `guarded`), then
        robust.filters in order, for a population of `population` nodes."""
        r = self.cfg.robust
        context = FilterContext(self.layout, self.cfg.rounds, self.cfg.seed,
                                self.recall(device) if self.needs_validation else None)
        chain = [self.guard(population)] if self.guarded(network) else []
        chain += [resolve_filter(name, population, context, **r.options.get(name, {})) for name in r.filters]
        return FilterChain(chain)

    def resolved_config(self) -> ExperimentConfig:
        """The config with "auto" choices replaced by what was actually used."""
        d = dataclasses.replace(self.cfg.data, dataset=self.dataset.name)
        t = dataclasses.replace(self.cfg.topology, nodes=self.n)
        return dataclasses.replace(self.cfg, data=d, topology=t)

    def build_model(self, node: int) -> FlatModel:
        """A fresh model: one shared initialisation, or one per node with gossip.init = independent."""
        m = self.cfg.model
        owner = node if self.cfg.gossip.init == "independent" else 0
        torch.manual_seed(round_seed(self.cfg.seed, owner, INIT_ROUND))
        module = models.build(m.name, self.dataset.input_shape, self.dataset.num_classes,
                              hidden=m.hidden, width=m.width)
        return FlatModel(module)

    @cached_property
    def layout(self) -> Layout:
        """The model's flat layout (the same for every node)."""
        return self.build_model(0).layout

    def stacked_model(self, training: bool) -> StackedModule:
        """The architecture as a batched function of (B, d) parameter rows, in training or eval mode."""
        template = self.build_model(0)
        template.module.train(training)
        return StackedModule(template.module, template.layout)

    def evaluator(self, device: torch.device | str = "cpu") -> Evaluator:
        return Evaluator(self.stacked_model(training=False), self.dataset, self.local_test_parts, self.cfg.eval,
                         self.cfg.seed, device, population=self.honest)

    def guarded(self, network: bool) -> bool:
        """Whether the distance guard filters received vectors: robust.guard = auto guards what comes
        from a network (node processes) or from attackers, and trusts an honest in-process simulation."""
        mode = self.cfg.robust.guard
        return mode == "on" or (mode == "auto" and (network or bool(self.attackers)))

    def guard(self, population: int) -> DistanceGuard:
        r = self.cfg.robust
        return DistanceGuard(population, r.guard_factor, r.guard_max_relative, r.guard_window)

    def merger(self, layout: Layout) -> Merger:
        g = self.cfg.gossip
        return Merger(layout, g.merge, g.variance_target, g.conservative_c, g.variance_eps)

    def neighbour_weights(self, node: int) -> dict[int, float]:
        row = self.mixing[node]
        return {int(j): float(row[j]) for j in self.graph.neighbors(node)}

    def make_node(self, node: int, transport: Transport, network: bool) -> Node:
        """Node `node` over `transport`; `network` says whether its input comes from a real network."""
        if self.shard and node != self.shard.node:
            raise ConfigError(f"data.shard = {self.cfg.data.shard!r} holds node {self.shard.node}'s data, "
                              f"not node {node}'s")
        flat = self.build_model(node)
        part = torch.from_numpy(self.parts[node])
        if len(part) == 0:
            raise ValueError(f"node {node} has no training data")
        stored = self.dataset.train_stored  # kept stored (uint8 images): see module_gradient
        x = stored if len(part) == len(stored) else stored[part]  # a shard's node takes all of it: no copy
        y, t = self.dataset.y_train[part], self.cfg.train
        attack = self.attack if node in self.attackers else None
        if attack is not None and attack.label_map is not None:
            y = attack.label_map(y, self.dataset.num_classes)
        training = LocalTraining(flat.params.view(1, -1), flat.grad.view(1, -1), t)
        return Node(node, flat, training,
                    batches=lambda r: local_batches(self.cfg.seed, node, r, len(y), t.local_steps, t.batch_size),
                    gradient=module_gradient(flat, x, y, self.dataset.normalise), lr=lambda r: learning_rate(t, r),
                    self_weight=float(self.mixing[node, node]), neighbour_weights=self.neighbour_weights(node),
                    transport=transport, merger=self.merger(flat.layout),
                    filters=FilterChain([]) if attack else self.filters(1, network), attack=attack)


def write_weights(run_dir: str | Path, experiment: Experiment) -> Path:
    """Store the run's mixing matrix as W.json, so every node of a deployment uses exactly it."""
    path = Path(run_dir) / "W.json"
    path.write_text(json.dumps(weights.to_json(experiment.weights)) + "\n")
    return path
