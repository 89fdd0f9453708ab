"""Everything an experiment derives from its config, built the same way in every runtime.

Given the same config, each runtime (the in-process simulator, a node process) gets the same
graph, mixing matrix, data partition and initial model, so their results can be compared.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from . import data, models
from .graph import mixing, poisson, sdp, topology, weights
from .config import ConfigError, ExperimentConfig
from .algorithms.merge import Merger
from .runtimes.node import Node
from .params import FlatModel
from .algorithms.train import LocalTrainer
from .seeding import INIT_ROUND, POISSON_STREAM, round_seed
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

    def firings(self, round_index: int) -> list[tuple[int, int]]:
        """The (u, v) pairs that exchange in this round under Poisson clocks, in time order."""
        rng = np.random.default_rng(round_seed(self.cfg.seed, POISSON_STREAM, round_index))
        _, fired = poisson.firings(self.rates.rates, self.cfg.gossip.poisson_time, rng)
        return [self.rates.edges[e] for e in fired]

    @cached_property
    def dataset(self) -> data.Dataset:
        d = self.cfg.data
        return data.load(d.dataset, d.path, seed=self.cfg.seed,
                         synthetic=(d.synthetic_samples, d.synthetic_features, d.synthetic_classes))

    @cached_property
    def parts(self) -> list[np.ndarray]:
        d = self.cfg.data
        return data.partition(self.dataset.y_train.numpy(), self.n, d.partition, seed=self.cfg.seed,
                              alpha=d.alpha, shards_per_node=d.shards_per_node)

    @cached_property
    def local_test_parts(self) -> list[np.ndarray]:
        return data.local_test_split(self.parts, self.dataset.y_train.numpy(), self.dataset.y_test.numpy(),
                                     seed=self.cfg.seed)

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

    def make_node(self, node: int, transport: Transport) -> Node:
        flat = self.build_model(node)
        part = torch.from_numpy(self.parts[node])
        trainer = LocalTrainer(flat, self.dataset.train_inputs(part), self.dataset.y_train[part], self.cfg.train,
                               seed=self.cfg.seed, node=node)
        g = self.cfg.gossip
        merger = Merger(flat.layout, g.merge, g.variance_target, g.conservative_c, g.variance_eps)
        row = self.mixing[node]
        neighbours = {int(j): float(row[j]) for j in self.graph.neighbors(node)}
        return Node(node, flat, trainer, float(row[node]), neighbours, transport, merger, g.steps)


def write_weights(run_dir: str | Path, experiment: Experiment) -> Path:
    """Store the run's mixing matrix as W.json, so every node of a deployment uses exactly it."""
    path = Path(run_dir) / "W.json"
    path.write_text(json.dumps(weights.to_json(experiment.weights)) + "\n")
    return path
