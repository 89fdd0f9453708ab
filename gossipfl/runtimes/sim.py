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

from ..algorithms.attacks import pair_inputs
from ..algorithms.schedule import Broadcast, RoundPlan
from .. import checkpoint, config
from ..config import ConfigError, ExperimentConfig
from ..experiment import Experiment, write_weights
from ..rundir import RunDirError, RunWriter, new_run_dir
from ..transport import MemoryNetwork
from .node import MODEL

CHECKPOINTS = "checkpoints"


class Engine(Protocol):
    """What the simulation loop needs from an engine."""

    def step(self, plan: RoundPlan) -> tuple[float, float]: ...  # one round: (mean loss, seconds training)
    def vectors(self) -> torch.Tensor: ...                    # (N, d) node vectors (a view or a copy)
    def counters(self) -> dict[str, Any]: ...                 # bytes sent, drops, clips, rollbacks
    def observations(self) -> dict[tuple[int, int], tuple[int, float]]: ...  # what filters saw, for `suspects`
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
    """One Node per participant over the memory transport. Attackers (byzantine.*) send what their
    attack makes of every node's current vectors: omniscient, the hardest case."""

    resumable = True  # state() and restore() hold all of it between rounds

    def __init__(self, experiment: Experiment, network: MemoryNetwork | None = None):
        self.network = MemoryNetwork(experiment.layout.size) if network is None else network
        self.nodes = [experiment.make_node(i, self.network.endpoint(i), network=False) for i in range(experiment.n)]
        self.honest, self.attackers, self.seed = experiment.honest, set(experiment.attackers), experiment.cfg.seed

    def step(self, plan: RoundPlan) -> tuple[float, float]:
        return lock_step(self, plan)

    def train(self, round_index: int) -> float:
        losses = {node.id: node.train(round_index) for node in self.nodes}
        return sum(losses[i] for i in self.honest) / len(self.honest)

    def attack_vectors(self, receiver: int, round_index: int, step: int) -> dict[int, torch.Tensor]:
        """What each attacker next to `receiver` sends it now, by attacker id."""
        node = self.nodes[receiver]
        senders = sorted(node.neighbour_weights)
        weights = torch.tensor([[node.self_weight, *(node.neighbour_weights[j] for j in senders)]], dtype=torch.float64)
        batch, slots = pair_inputs(round_index, step, self.seed, torch.tensor([receiver]), node.vector.view(1, -1),
                                   [self.nodes[j].vector.view(1, -1) for j in senders], weights,
                                   torch.tensor([senders]), torch.tensor([[j in self.attackers for j in senders]]),
                                   lambda a: self.nodes[a].round_start[0])
        sent = self.nodes[senders[int(slots[0, 1])]].attack(batch) if len(slots) else None
        return {senders[k]: sent[p].clone() for p, (_, k) in enumerate(slots.tolist())}

    def exchange(self, plan: RoundPlan) -> None:
        r = plan.round
        for e in plan.exchanges:
            if isinstance(e, Broadcast):
                outgoing: dict[int, dict[int, torch.Tensor]] = {a: {} for a in self.attackers}
                for i in self.honest:  # all from the vectors before anyone merges
                    if self.attackers & self.nodes[i].neighbour_weights.keys():
                        for a, vector in self.attack_vectors(i, r, e.step).items():
                            outgoing[a][i] = vector
                for node in self.nodes:
                    if node.id in outgoing:
                        node.send_vectors(MODEL, r, e.step, outgoing[node.id])
                    else:
                        node.send(r, e.step)
                for node in self.nodes:
                    node.receive_and_merge(r, e.step)
            else:
                owner, peer = self.nodes[e.owner], self.nodes[e.peer]
                towards_peer = self.attack_vectors(peer.id, r, e.seq).get(owner.id) if owner.attack else None
                towards_owner = self.attack_vectors(owner.id, r, e.seq).get(peer.id) if peer.attack else None
                owner.request_pair(peer.id, r, e.seq, vector=towards_peer)
                peer.answer_pair(owner.id, r, e.seq, attack=None if towards_owner is None else lambda _: towards_owner)
                owner.finish_pair(peer.id, r, e.seq)

    def vectors(self) -> torch.Tensor:
        return torch.stack([node.vector for node in self.nodes])

    def train_nodes(self, round_index: int, ids: list[int], starts: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Sampled rounds: these nodes train one round from `starts`; their vectors and losses."""
        losses = []
        for i, start in zip(ids, starts):
            self.nodes[i].vector.copy_(start)
            losses.append(self.nodes[i].train(round_index))
        return (torch.stack([self.nodes[i].vector for i in ids]) if ids else starts), losses

    def set_vectors(self, ids: list[int], vectors: torch.Tensor) -> None:
        for i, vector in zip(ids, vectors):
            self.nodes[i].vector.copy_(vector)

    def observations(self) -> dict[tuple[int, int], tuple[int, float]]:
        """(observer, sender) -> (messages merged, summed suspicion), as honest nodes saw them."""
        return {(i, j): (c.messages[j], c.suspicion[j]) for i in self.honest
                for c in [self.nodes[i].counters] for j in c.messages}

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
        base: Engine = NodeEngine(experiment)
    else:
        from .vectorized import VectorizedEngine
        base = VectorizedEngine(experiment, device)
    if experiment.cfg.sampling.kind == "none":
        return base
    from .sampled import SampledEngine
    return SampledEngine(experiment, base)


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
        self.layout = self.experiment.layout.digest()
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
        report = lambda: self.experiment.misbehaviour(self.engine.observations())  # noqa: E731
        try:
            for r in bar:
                round_start = time.perf_counter()
                loss, train_seconds = self.step(r)
                record: dict[str, Any] = {"round": r, "train_loss": loss}
                if (r + 1) % every == 0 or r == rounds - 1:
                    record.update(self.evaluator.evaluate(self.vectors()))
                    if hasattr(self.engine, "global_model"):  # a sampled run's newest aggregate
                        record["accuracy_global_model"] = float(
                            self.evaluator.accuracy(self.engine.global_model.view(1, -1))[0])
                    bar.set_postfix(acc=f"{record['accuracy_mean']:.3f}", loss=f"{loss:.3f}")
                record.update(self.engine.counters(), round_seconds=time.perf_counter() - round_start,
                              train_seconds=train_seconds, wall_seconds=time.perf_counter() - start)
                writer.log(record)
                if keep and ((r + 1) % keep == 0 or r == rounds - 1):
                    checkpoint.save(self.run_dir / CHECKPOINTS, r, self.vectors(), self.layout,
                                    {"engine": self.engine.state(), "wall_seconds": record["wall_seconds"]})
            return writer.write_summary(**extra, **report())
        except KeyboardInterrupt:
            return writer.interrupt(**extra, **report())
        except BaseException as error:
            writer.fail(error)
            raise
        finally:
            bar.close()
            writer.close()
