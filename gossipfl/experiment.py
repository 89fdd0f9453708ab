"""Everything an experiment derives from its config, built the same way in every runtime.

Given the same config, each runtime (the in-process simulator, a node process) gets the same
graph, mixing matrix, data partition and initial model, so their results can be compared.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import networkx as nx
import numpy as np
import torch

from . import data, mixing, models, topology
from .config import ExperimentConfig
from .merge import Merger
from .node import Node
from .params import FlatModel
from .train import LocalTrainer, round_seed
from .transport import Transport

INIT_ROUND = 2**31  # a "round" no run reaches: its seed draws initial weights


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
    def mixing(self) -> np.ndarray:
        w = mixing.HEURISTICS[self.cfg.gossip.weights](self.graph)
        mixing.check(w, self.graph, doubly_stochastic=self.cfg.gossip.weights != "uniform_neighbourhood")
        return w

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
        trainer = LocalTrainer(flat, self.dataset.x_train[part], self.dataset.y_train[part], self.cfg.train,
                               seed=self.cfg.seed, node=node)
        g = self.cfg.gossip
        merger = Merger(flat.layout, g.merge, g.variance_target, g.conservative_c, g.variance_eps)
        row = self.mixing[node]
        neighbours = {int(j): float(row[j]) for j in self.graph.neighbors(node)}
        return Node(node, flat, trainer, float(row[node]), neighbours, transport, merger, g.steps)
