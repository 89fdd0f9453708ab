"""Simulator overhead: how much a round costs beyond the local training it must do.

Measured side by side in one process, on the quickstart's models and data split:
  * our round (train + Q gossip steps, no evaluation) / our local-training phase alone;
  * our local-training phase vs a naive loop of N torch modules stepped by torch.optim.SGD;
  * our gossip phase (flat vectors) vs naive per-tensor state_dict averaging.

    python benchmarks/bench_overhead.py [--rounds 8] [--rho 0.05]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from common import write

from gossipfl import config
from gossipfl.report import markdown_table
from gossipfl.runtimes.sim import Simulation


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def naive_training(sim: Simulation, round_index: int) -> float:
    """The same minibatches, one torch.optim.SGD per node module (plain SGD: compare at rho = 0)."""
    modules = [copy.deepcopy(node.flat.module) for node in sim.nodes]
    cfg = sim.cfg.train
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            for m in modules]
    batches = [node.trainer.batches(round_index) for node in sim.nodes]

    def run() -> None:
        for node, module, opt, idx in zip(sim.nodes, modules, opts, batches):
            x, y = node.trainer.x, node.trainer.y
            for b in idx:
                opt.zero_grad()
                F.cross_entropy(module(x[b]), y[b]).backward()
                opt.step()
    return timed(run)


def naive_gossip(sim: Simulation) -> float:
    """Q steps of per-tensor weighted averaging over state_dicts, the way many peer tools merge."""
    w = sim.experiment.mixing
    states = [copy.deepcopy(node.flat.module.state_dict()) for node in sim.nodes]

    def run() -> None:
        nonlocal states
        for _ in range(sim.cfg.gossip.steps):
            snapshot = [{k: v.clone() for k, v in s.items()} for s in states]
            new = []
            for i in range(len(states)):
                neighbours = [j for j in range(len(states)) if w[i, j] != 0]
                new.append({k: sum(w[i, j] * snapshot[j][k].float() for j in neighbours) for k in states[i]})
            states = new
    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--rho", type=float, default=0.0)
    args = parser.parse_args()
    cfg = config.derive(config.quickstart(), {"rounds": args.rounds, "train.rho": args.rho})
    torch.set_num_threads(1)
    sim = Simulation(cfg, progress=False)
    rows = []
    for r in range(args.rounds):
        train = timed(lambda: sim.train(r))
        gossip = timed(lambda: sim.gossip(r))
        row = {"round": r, "train_s": train, "gossip_s": gossip, "round_over_train": (train + gossip) / train,
               "naive_gossip_s": naive_gossip(sim)}
        if args.rho == 0:
            row["naive_train_s"] = naive_training(sim, r)
        rows.append(row)
    keys = [k for k in rows[0] if k != "round"]
    median = {"round": "median", **{k: statistics.median(r[k] for r in rows) for k in keys}}
    summary = {
        "round_over_train": median["round_over_train"],
        "gossip_speedup_vs_naive": median["naive_gossip_s"] / median["gossip_s"],
    }
    if "naive_train_s" in median:
        summary["train_speedup_vs_naive"] = median["naive_train_s"] / median["train_s"]
    print(markdown_table(rows + [median], ["round", *keys]))
    print(summary)
    print("wrote", write("overhead", {"args": vars(args), "nodes": sim.experiment.n,
                                      "params": sim.nodes[0].vector.numel(), "rounds": rows, "median": median,
                                      "summary": summary}))


if __name__ == "__main__":
    main()
