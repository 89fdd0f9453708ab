"""Node processes on this machine: round overhead of `gossipfl launch` and memory per node.

Runs the launch quickstart (8 node processes, one torch thread each) and reports, per round, the
slowest node's wall time over its pure local-training time (rounds after the first, which
includes start-up), the same ratio for the in-process engine on the same config, and each node
process's peak RSS, once with the quickstart MLP and once with the small CNN.

    python benchmarks/bench_launch.py [--rounds 10] [--nodes 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import simulate, write

from gossipfl import config
from gossipfl.report import markdown_table
from gossipfl.runtimes.launch import launch
from gossipfl.rundir import read_metrics


def node_summaries(run_dir: Path, n: int) -> list[dict]:
    return [json.loads((run_dir / "nodes" / f"node-{i}" / "summary.json").read_text()) for i in range(n)]


def measure(name: str, cfg: config.ExperimentConfig, workdir: Path) -> dict:
    summary = launch(cfg, workdir / name, progress=False)
    rows = read_metrics(workdir / name)[1:]
    _, sim_rows = simulate(cfg, workdir / f"{name}-sim")
    n = cfg.topology.nodes
    rss = [s["max_rss_mb"] for s in node_summaries(workdir / name, n)]
    return {
        "model": name, "nodes": n, "launch_acc": summary["final_accuracy_mean"],
        "simulate_acc": sim_rows[-1]["accuracy_mean"],
        "launch_round_over_train": statistics.median(r["round_seconds"] / r["train_seconds"] for r in rows),
        "simulate_round_over_train": statistics.median(r["round_seconds"] / r["train_seconds"] for r in sim_rows[1:]),
        "launch_wall_s": summary["wall_seconds"], "rss_mb_median": statistics.median(rss), "rss_mb_max": max(rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()
    base = {"rounds": args.rounds, "topology.nodes": args.nodes, "deploy.checkpoint_every": 0,
            "eval.every": args.rounds}  # evaluate once, at the end: rounds time gossip, not evaluation
    models = {"mlp": {}, "cnn": {"model.name": "cnn"}}
    with tempfile.TemporaryDirectory() as workdir:
        rows = [measure(name, config.derive(config.quickstart(), {**base, **extra}), Path(workdir))
                for name, extra in models.items()]
    print(markdown_table(rows, list(rows[0])))
    print("wrote", write("launch", {"args": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
