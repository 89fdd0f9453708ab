"""Run every node of an experiment in one process over the memory transport.

Each phase (train, then per gossip step: all send, all receive and merge) runs for all nodes
before the next, which is exactly the lock-step schedule node processes follow over sockets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import ExperimentConfig
from ..experiment import Experiment, write_weights
from ..metrics import accuracy, consensus_distance
from ..rundir import RunWriter, new_run_dir
from ..transport import MemoryNetwork


class Simulation:
    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.experiment = Experiment(cfg)
        self.cfg = cfg
        self.network = MemoryNetwork()
        self.nodes = [self.experiment.make_node(i, self.network.endpoint(i)) for i in range(self.experiment.n)]
        self.probe = self.experiment.build_model(0)  # scratch model that evaluates the average vector
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output, cfg.name)
        self.progress = progress

    def vectors(self) -> list[torch.Tensor]:
        return [node.vector for node in self.nodes]

    def evaluate(self) -> dict[str, float]:
        ds, batch = self.experiment.dataset, self.cfg.eval.batch_size
        accs = [accuracy(node.flat.module, ds.x_test, ds.y_test, batch) for node in self.nodes]
        local = [accuracy(node.flat.module, ds.x_test[torch.from_numpy(idx)], ds.y_test[torch.from_numpy(idx)],
                          batch) for node, idx in zip(self.nodes, self.experiment.local_test_parts)]
        self.probe.load(torch.stack(self.vectors()).mean(dim=0))
        return {
            "accuracy_mean": float(np.mean(accs)), "accuracy_min": float(np.min(accs)),
            "accuracy_max": float(np.max(accs)),
            "accuracy_average_model": accuracy(self.probe.module, ds.x_test, ds.y_test, batch),
            "accuracy_local_mean": float(np.nanmean(local)),
        }

    def train(self, round_index: int) -> float:
        return float(np.mean([node.train(round_index) for node in self.nodes]))

    def gossip(self, round_index: int) -> None:
        if self.cfg.gossip.schedule == "poisson":
            return self.poisson_gossip(round_index)
        for q in range(self.cfg.gossip.steps):
            for node in self.nodes:
                node.send(round_index, q)
            for node in self.nodes:
                node.receive_and_merge(round_index, q)

    def poisson_gossip(self, round_index: int) -> None:
        """Pairwise exchanges on the round's Poisson firings, on a virtual clock (the lower id owns an edge)."""
        for seq, (u, v) in enumerate(self.experiment.firings(round_index)):
            owner, peer = self.nodes[min(u, v)], self.nodes[max(u, v)]
            owner.request_pair(peer.id, round_index, seq)
            peer.answer_pair(owner.id, round_index, seq)
            owner.finish_pair(peer.id, round_index, seq)

    def step(self, round_index: int) -> tuple[float, float]:
        """One round for all nodes; returns (mean train loss, seconds spent in local training)."""
        start = time.perf_counter()
        loss = self.train(round_index)
        train_seconds = time.perf_counter() - start
        self.gossip(round_index)
        return loss, train_seconds

    def run(self) -> dict[str, Any]:
        writer = RunWriter(self.run_dir, self.experiment.resolved_config())
        write_weights(self.run_dir, self.experiment)
        rounds, every = self.cfg.rounds, self.cfg.eval.every
        start = time.perf_counter()
        bar = tqdm(range(rounds), desc=f"{self.cfg.name} ({self.experiment.n} nodes)", unit="round",
                   disable=not self.progress)
        try:
            for r in bar:
                round_start = time.perf_counter()
                loss, train_seconds = self.step(r)
                record: dict[str, Any] = {"round": r, "train_loss": loss}
                if (r + 1) % every == 0 or r == rounds - 1:
                    record.update(self.evaluate())
                    bar.set_postfix(acc=f"{record['accuracy_mean']:.3f}", loss=f"{loss:.3f}")
                record.update(
                    consensus_distance=consensus_distance(self.vectors()),
                    bytes_sent=sum(node.transport.bytes_sent for node in self.nodes),
                    round_seconds=time.perf_counter() - round_start,
                    train_seconds=train_seconds,
                    wall_seconds=time.perf_counter() - start,
                )
                writer.log(record)
            return writer.write_summary(nodes=self.experiment.n, dataset=self.experiment.dataset.name,
                                        run_dir=str(self.run_dir))
        finally:
            bar.close()
            writer.close()
