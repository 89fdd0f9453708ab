"""Quality benchmarks: variants of the quickstart trained side by side on the same data split,
seeds and rounds (Fashion-MNIST by default).

  --suite algorithms: DFedAvg vs DFedSAM vs DFedSAM-MGS, and plain vs variance-corrected merging
                      (16 nodes, ring, Dirichlet 0.3);
  --suite weights:    FMMC vs Metropolis mixing weights on a 32-node random geometric graph.

Each variant and seed runs as its own `gossipfl simulate` through gossipfl.sweep (so --out keeps
a sweep folder that `gossipfl compare` draws and a second call resumes). Prints a table, writes
benchmarks/results/SUITE.json and a PNG of accuracy against round and bytes.

    python benchmarks/bench_algorithms.py [--suite algorithms] [--rounds 40] [--seeds 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, write

from gossipfl import config, sweep
from gossipfl.report import markdown_table
from gossipfl.rundir import read_metrics

ALGORITHMS = {
    "DFedAvg (rho 0, Q 1; mean, common init)": {"train.rho": 0.0, "gossip.steps": 1},
    "DFedSAM (Q 1)": {"gossip.steps": 1},
    "DFedSAM-MGS (Q 4)": {"gossip.steps": 4},
    "DFedAvg, variance-corrected, common init": {"train.rho": 0.0, "gossip.steps": 1,
                                                 "gossip.merge": "variance_corrected"},
    "DFedAvg, mean, independent init": {"train.rho": 0.0, "gossip.steps": 1, "gossip.init": "independent"},
    "DFedAvg, variance-corrected, independent init": {"train.rho": 0.0, "gossip.steps": 1,
                                                      "gossip.init": "independent",
                                                      "gossip.merge": "variance_corrected"},
}
GEOMETRIC_32 = {"topology.kind": "random_geometric", "topology.nodes": 32, "topology.radius": 0.3}
WEIGHTS = {
    "Metropolis weights, RGG 32": {**GEOMETRIC_32, "gossip.weights": "metropolis"},
    "FMMC weights, RGG 32": {**GEOMETRIC_32, "gossip.weights": "fmmc"},
}
SUITES = {"algorithms": ALGORITHMS, "weights": WEIGHTS}
TARGET = 0.70
CURVE_KEYS = ("round", "accuracy_mean", "accuracy_average_model", "bytes_sent", "consensus_distance")


def measure(name: str, overrides: dict, runs: list[sweep.RunOutcome]) -> dict:
    """The table's columns for one variant, each the mean over its seeds' runs."""
    per_seed = []
    for run in runs:
        rows, summary = read_metrics(run.dir), run.summary
        evaluated = [r for r in rows if "accuracy_mean" in r]
        reach = next((r for r in evaluated if r["accuracy_mean"] >= TARGET), None)
        per_seed.append({
            "final_acc_mean": summary["final_accuracy_mean"],
            "final_acc_min": summary["final_accuracy_min"],
            "final_acc_avg_model": summary["final_accuracy_average_model"],
            "best_acc_mean": max(r["accuracy_mean"] for r in evaluated),
            f"round_to_{TARGET:.0%}": reach["round"] + 1 if reach else None,
            f"MB_to_{TARGET:.0%}": round(reach["bytes_sent"] / 1e6) if reach else None,
            "MB_total": round(summary["bytes_sent_total"] / 1e6),
            "final_consensus": summary["final_consensus_distance"],
            "seconds": round(summary["wall_seconds"], 1),
            "curve": [{k: r.get(k) for k in CURVE_KEYS} for r in rows],
        })
    mean = {key: None if any(p[key] is None for p in per_seed) else statistics.fmean(p[key] for p in per_seed)
            for key in per_seed[0] if key != "curve"}
    curve = [{k: statistics.fmean(c[k] for c in point) if all(c[k] is not None for c in point) else None
              for k in CURVE_KEYS} for point in zip(*(p["curve"] for p in per_seed))]
    return {"variant": name, **mean, "seeds": len(runs), "curve": curve, "overrides": overrides,
            "runs": [str(run.dir) for run in runs]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        curve = [c for c in r["curve"] if c["accuracy_mean"] is not None]
        axes[0].plot([c["round"] + 1 for c in curve], [c["accuracy_mean"] for c in curve], label=r["variant"])
        axes[1].plot([c["bytes_sent"] / 1e9 for c in curve], [c["accuracy_mean"] for c in curve])
    axes[0].set(xlabel="round", ylabel="mean node test accuracy")
    axes[1].set(xlabel="GB sent (all nodes)", ylabel="mean node test accuracy", xscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="algorithms")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dataset", default="auto")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant; the table shows their mean")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (gossipfl sweep --jobs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every variant's base, e.g. --set topology.nodes=8")
    parser.add_argument("--out", help="keep the sweep folder here (run again to resume); default: a temporary one")
    args = parser.parse_args()
    base = config.derive(config.quickstart(), {"rounds": args.rounds, "data.dataset": args.dataset,
                                               **dict(config.parse_override(text) for text in args.set)})
    variants = SUITES[args.suite]
    with tempfile.TemporaryDirectory() as scratch:
        spec = sweep.make_spec(base, list(variants.values()), seeds=args.seeds, jobs=args.workers,
                               out=args.out or Path(scratch) / args.suite)
        result = sweep.run_sweep(spec)
        if result.failed:
            print(result.markdown())
            return 1
        results = [measure(name, overrides, [r for r in result.runs if r.settings == overrides])
                   for name, overrides in variants.items()]
    columns = ["variant", "final_acc_mean", "final_acc_min", "final_acc_avg_model", "best_acc_mean",
               f"round_to_{TARGET:.0%}", f"MB_to_{TARGET:.0%}", "MB_total", "final_consensus", "seconds"]
    print(markdown_table(results, columns))
    RESULTS.mkdir(exist_ok=True)
    plot(results, RESULTS / f"{args.suite}.png")
    print("wrote", write(args.suite, {"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
