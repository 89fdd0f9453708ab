"""MoDeST against D-PSGD and federated averaging, and through 80% of the nodes going silent.

One command over simulations/modest.toml (64 nodes, Fashion-MNIST), three seeds each, run by
gossipfl.sweep: MoDeST (sample of 6, one aggregator); D-PSGD (every node trains and gossips with
its 6-regular neighbours every round, the same merge rule); federated averaging with a server's
uniform sample of the same size; and MoDeST where 80% of the nodes stop answering half-way.
Reported: rounds, wall time and total bytes until the target accuracy (MoDeST and FedAvg: the
newest aggregate; D-PSGD: the node mean), the bytes ratio D-PSGD / MoDeST, and the churn run's
accuracy before the crash against its end.

    python benchmarks/bench_modest.py [--target 0.70] [--seeds 3] [--jobs 2] [--out DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, write

from gossipfl import config, sweep
from gossipfl.report import markdown_table, readable_bytes
from gossipfl.rundir import read_metrics

BASE = Path(__file__).resolve().parents[1] / "simulations" / "modest.toml"
METHODS = {
    "MoDeST": {"sampling.kind": "modest"},
    "D-PSGD": {"sampling.kind": "none"},
    "FedAvg (same sample size)": {"sampling.kind": "fedavg"},
}


def churn(rounds: int) -> dict[str, Any]:
    return {"sampling.kind": "modest", "sampling.crash_at": rounds // 2, "sampling.crash_fraction": 0.8}


def accuracy(row: dict[str, Any]) -> float | None:
    return row.get("accuracy_global_model", row.get("accuracy_mean"))


def to_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    hit = next((r for r in rows if (accuracy(r) or 0.0) >= target), None)
    final = [accuracy(r) for r in rows if accuracy(r) is not None][-1]
    return {"rounds": hit["round"] + 1 if hit else None, "bytes": hit["bytes_sent"] if hit else None,
            "seconds": hit["wall_seconds"] if hit else None, "final": final, "total_bytes": rows[-1]["bytes_sent"]}


def mean_spread(values: list[float | None], fmt=lambda v: f"{v:.3g}") -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = fmt(statistics.fmean(got)) + (f" ± {fmt(statistics.stdev(got))}" if len(got) > 1 else "")
    return text + ("" if len(got) == len(values) else f" ({len(got)}/{len(values)} seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "modest-sweep"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = config.load_config(str(BASE), args.set)
    variants = {**METHODS, "MoDeST, 80% silent from half-way": churn(base.rounds)}
    result = sweep.run_sweep(sweep.make_spec(base, list(variants.values()), seeds=args.seeds, out=args.out,
                                             jobs=args.jobs))
    table, measured = [], {}
    for name, settings in variants.items():
        runs = [r for r in result.runs if r.settings == settings and r.status == "complete"]
        per_seed = [to_target(read_metrics(r.dir), args.target) for r in runs]
        measured[name] = per_seed
        table.append({"method": name, "seeds": len(per_seed),
                      f"rounds to {args.target:.0%}": mean_spread([p["rounds"] for p in per_seed]),
                      "seconds": mean_spread([p["seconds"] for p in per_seed]),
                      "bytes": mean_spread([p["bytes"] for p in per_seed], readable_bytes),
                      "final accuracy": mean_spread([p["final"] for p in per_seed]),
                      "bytes, whole run": mean_spread([p["total_bytes"] for p in per_seed], readable_bytes)})
    ratios = [d["bytes"] / m["bytes"] for d, m in zip(measured["D-PSGD"], measured["MoDeST"])
              if d["bytes"] and m["bytes"]]
    silent = [r for r in result.runs if r.settings == variants["MoDeST, 80% silent from half-way"]
              and r.status == "complete"]
    half = base.rounds // 2
    before_after = []
    for run in silent:
        rows = [r for r in read_metrics(run.dir) if accuracy(r) is not None]
        before = max(accuracy(r) for r in rows if r["round"] < half)
        after = max(accuracy(r) for r in rows if r["round"] >= half)
        before_after.append({"seed": run.seed, "best before": round(before, 4), "best after": round(after, 4),
                             "skipped after": sum(r.get("skipped", 0) for r in read_metrics(run.dir) if r["round"] >= half)})
    print(markdown_table(table, list(table[0])))
    print(f"\nD-PSGD bytes / MoDeST bytes to {args.target:.0%}: {mean_spread(ratios, lambda v: f'{v:.1f}x')}")
    print("\n80% of the nodes silent from round", half)
    print(markdown_table(before_after, ["seed", "best before", "best after", "skipped after"]))
    print(write("modest", {"base": str(BASE), "overrides": args.set, "target": args.target, "table": table,
                           "per_seed": measured, "bytes_ratio_dpsgd_over_modest": ratios, "churn": before_after}))


if __name__ == "__main__":
    main()
