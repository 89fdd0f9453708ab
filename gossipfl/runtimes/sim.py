"""`gossipfl simulate`: every node of an experiment in one process, on one of two engines.

The Node engine runs one Node per participant over the memory transport, each phase for all nodes
before the next: exactly the lock-step schedule node processes follow over sockets, for any model.
The vectorized engine (runtimes/vectorized.py) holds all nodes as N x d tensors, for thousands of
nodes on a CPU or a GPU. Both run the same round plan and the same algorithm core, and share this
loop: progress bar, evaluation, metrics lines and run folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..algorithms.schedule import Broadcast, RoundPlan
from .. import checkpoint, config
from ..config import ConfigError, ExperimentConfig
from ..experiment import Experiment, write_weights
from ..metrics import consensus_distance
from ..rundir import RunDirError, RunWriter, new_run_dir
from ..transport import MemoryNetwork

CHECKPOINTS = "checkpoints"


class Engine(Protocol):
    """What the simulation loop needs from an engine."""

    def step(self, plan: RoundPlan) -> tuple[float, float]: ...  # one round: (mean loss, seconds training)
    def vectors(self) -> torch.Tensor: ...                    # (N, d) node vectors (a view or a copy)
    def counters(self) -> dict[str, Any]: ...                 # bytes sent, drops, clips, rollbacks
    resumable: bool                                           # whether state() holds all of it between rounds
    def state(self) -> dict[str, Any]: ...                    # JSON-safe state beside the vectors
    def restore(self, vectors: torch.Tensor, state: dict[str, Any]) -> None: ...  # from a checkpoint


def lock_step(engine: Any, plan: RoundPlan) -> tuple[float, float]:
    """A round of the planned schedules: every node trains, then the plan's exchanges run."""
    start = time.perf_counter()
    loss = engine.train(plan.round)
    train_seconds = time.perf_counter() - start
    engine.exchange(plan)
    return loss, train_seconds


class NodeEngine:
    """One Node per participant over the memory transport."""

    resumable = True  # state() and restore() hold all of it between rounds

    def __init__(self, experiment: Experiment):
        self.network = MemoryNetwork()
        self.nodes = [experiment.make_node(i, self.network.endpoint(i), network=False) for i in range(experiment.n)]

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        return lock_step(self, plan)

    def train(self, round_index: int) -> float:
        return sum(node.train(round_index) for node in self.nodes) / len(self.nodes)

    def exchange(self, plan: RoundPlan) -> None:
        r = plan.round
        for e in plan.exchanges:
            if isinstance(e, Broadcast):
                for node in self.nodes:
                    node.send(r, e.step)
                for node in self.nodes:
                    node.receive_and_merge(r, e.step)
            else:
                owner, peer = self.nodes[e.owner], self.nodes[e.peer]
                owner.request_pair(peer.id, r, e.seq)
                peer.answer_pair(owner.id, r, e.seq)
                owner.finish_pair(peer.id, r, e.seq)

    def vectors(self) -> torch.Tensor:
        return torch.stack([node.vector for node in self.nodes])

    def state(self) -> dict[str, Any]:
        return {"nodes": [node.state() for node in self.nodes]}

    def restore(self, vectors: torch.Tensor, state: dict[str, Any]) -> None:
        for node, vector, saved in zip(self.nodes, vectors, state["nodes"]):
            node.vector.copy_(vector)
            node.load_state(saved)

    def counters(self) -> dict[str, Any]:
        rejected: dict[str, int] = {}
        for node in self.nodes:
            for reason, count in node.transport.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + count
        return {"bytes_sent": sum(node.transport.bytes_sent for node in self.nodes), "rejected": rejected,
                "flagged": sum(sum(node.counters.flagged.values()) for node in self.nodes),
                "rolled_back": sum(node.counters.rolled_back for node in self.nodes)}


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA GPU here; use device = 'cpu' or 'auto'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def choose_engine(cfg: ExperimentConfig) -> tuple[str, torch.device]:
    """(engine, device) for a simulation: auto picks the vectorized engine wherever it applies; the
    Node engine runs on the CPU only, and alone runs the asynchronous schedule (each node acts at
    its own moments, which no batch of all nodes shares)."""
    device = resolve_device(cfg.device)
    asynchronous = cfg.gossip.schedule == "async"
    if asynchronous and cfg.engine == "vectorized":
        raise ConfigError("gossip.schedule = 'async' needs engine = 'nodes' (or 'auto'): the vectorized engine "
                          "steps all nodes at once, and asynchronous nodes act at their own moments")
    engine = ("nodes" if asynchronous else "vectorized") if cfg.engine == "auto" else cfg.engine
    if engine == "nodes" and device.type != "cpu":
        if cfg.device != "auto":
            raise ConfigError(f"device = {cfg.device!r} needs engine = 'vectorized' (the Node engine runs on the CPU)")
        device = torch.device("cpu")
    return engine, device


def build_engine(experiment: Experiment, engine: str, device: torch.device) -> Engine:
    if experiment.cfg.gossip.schedule == "async":
        from .virtual_clock import VirtualClockEngine
        return VirtualClockEngine(experiment)
    if engine == "nodes":
        return NodeEngine(experiment)
    from .vectorized import VectorizedEngine
    return VectorizedEngine(experiment, device)


class Simulation:
    """The simulation loop over an engine: rounds, evaluation, metrics, checkpoints of the whole
    network every deploy.checkpoint_every rounds and after the last (RUN_DIR/checkpoints, which also
    hold the final vectors), and a summary also when a run is interrupted (Ctrl-C) or fails."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.experiment = Experiment(cfg)
        self.engine_name, self.device = choose_engine(cfg)
        self.engine = build_engine(self.experiment, self.engine_name, self.device)
        self.evaluator = self.experiment.evaluator(self.device)
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(cfg.output, cfg.name)
        self.progress = progress
        self.layout = self.experiment.build_model(0).layout.digest()
        self.start_round, self.wall_before = 0, 0.0  # where a resumed run picks up

    @classmethod
    def resume(cls, run_dir: str | Path, progress: bool = True) -> "Simulation":
        """Continue an interrupted simulation from its newest checkpoint, with its own config."""
        run_dir = Path(run_dir)
        sim = cls(config.load(run_dir / "config.toml"), run_dir, progress)
        if not sim.engine.resumable:
            raise RunDirError(f"{run_dir}: gossip.schedule = {sim.cfg.gossip.schedule!r} simulations cannot be "
                              f"resumed (letters in flight on the virtual clock are not checkpointed)")
        saved = checkpoint.load_latest(run_dir / CHECKPOINTS, sim.layout)
        if saved is None:
            raise RunDirError(f"{run_dir} has no checkpoint to resume from (deploy.checkpoint_every = "
                              f"{sim.cfg.deploy.checkpoint_every})")
        sim.engine.restore(saved.vector.to(sim.device), saved.state["engine"])
        sim.start_round, sim.wall_before = saved.round + 1, saved.state["wall_seconds"]
        return sim

    @property
    def nodes(self):  # the Node engine's nodes (tests and tools that inspect single nodes)
        return self.engine.nodes

    def vectors(self) -> torch.Tensor:
        return self.engine.vectors()

    def step(self, round_index: int) -> tuple[float, float]:
        """One round for all nodes; returns (mean train loss, seconds spent in local training)."""
        return self.engine.step(self.experiment.plan(round_index))

    def run(self) -> dict[str, Any]:
        """Run (or continue) to the last round; the summary's status says whether it got there."""
        writer = RunWriter(self.run_dir, self.experiment.resolved_config(), keep_rounds=self.start_round)
        write_weights(self.run_dir, self.experiment)
        rounds, every = self.cfg.rounds, self.cfg.eval.every
        keep = self.cfg.deploy.checkpoint_every if self.engine.resumable else 0
        start = time.perf_counter() - self.wall_before
        bar = tqdm(range(self.start_round, rounds), desc=f"{self.cfg.name} ({self.experiment.n} nodes, "
                   f"{self.engine_name})", unit="round", disable=not self.progress, initial=self.start_round,
                   total=rounds)
        extra = dict(nodes=self.experiment.n, dataset=self.experiment.dataset.name, run_dir=str(self.run_dir),
                     engine=self.engine_name, device=str(self.device))
        try:
            for r in bar:
                round_start = time.perf_counter()
                loss, train_seconds = self.step(r)
                record: dict[str, Any] = {"round": r, "train_loss": loss}
                if (r + 1) % every == 0 or r == rounds - 1:
                    vectors = self.vectors()
                    record.update(self.evaluator.evaluate(vectors), consensus_distance=consensus_distance(vectors))
                    bar.set_postfix(acc=f"{record['accuracy_mean']:.3f}", loss=f"{loss:.3f}")
                record.update(self.engine.counters(), round_seconds=time.perf_counter() - round_start,
                              train_seconds=train_seconds, wall_seconds=time.perf_counter() - start)
                writer.log(record)
                if keep and ((r + 1) % keep == 0 or r == rounds - 1):
                    checkpoint.save(self.run_dir / CHECKPOINTS, r, self.vectors(), self.layout,
                                    {"engine": self.engine.state(), "wall_seconds": record["wall_seconds"]})
            return writer.write_summary(**extra)
        except KeyboardInterrupt:
            return writer.interrupt(**extra)
        except BaseException as error:
            writer.fail(error)
            raise
        finally:
            bar.close()
            writer.close()
