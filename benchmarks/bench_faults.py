"""Node processes that keep their pace when peers die or lag: 8 processes of the quickstart
(default deadlines and failure detection), ring and random geometric graph, sync and async.

Scenarios, each against the clean run of the same graph and schedule:
  clean               every node runs to the end
  25% killed          2 of 8 nodes SIGKILLed once the slowest survivor has done a quarter of the rounds
  25% killed, half    the same, and one of the two started again with --resume two rounds later
  resumed             (it rejoins at its neighbours' round once its process is up)
  one node 4x slower  timing.slow = [0], timing.slow_factor = 4

Reported, over the survivors (nodes never killed): wall time until the last survivor finished
(start-up included) and its ratio to the clean run (goal <= 1.5x with 25% killed), and until every
process finished (a resumed node included, which may end later than the survivors); their mean final
accuracy; the largest gap between two consecutive rounds of a survivor, in seconds and in
deploy.deadline_s (goal <= 2); and with one slow node, the other nodes' rounds per second over
the clean run's (goal >= 0.8x in async; sync is the control, where neighbours wait).

Nodes are started and killed through the launch runtime's API (start_node, deployment), so
that the script decides who dies when; their metrics are the nodes' own per-round lines.

    python benchmarks/bench_faults.py [--quick] [--rounds 40] [--topologies ring,random_geometric]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write

from gossipfl import config
from gossipfl.experiment import Experiment
from gossipfl.report import markdown_table
from gossipfl.runtimes import stop_all
from gossipfl.runtimes.launch import deployment, start_node
from gossipfl.runtimes.process import node_dir

NODES = 8
VICTIMS = (3, 7)  # 25% of 8, on opposite sides of the ring
SLOW = 0
SCENARIOS = ("clean", "25% killed", "25% killed, half resumed", "one node 4x slower")
RUN_TIMEOUT_S = 900


def rows_of(run_dir: Path, node: int) -> list[dict[str, Any]]:
    path = node_dir(run_dir, node) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def run(cfg: config.ExperimentConfig, run_dir: Path, scenario: str) -> dict[str, Any]:
    """Run `cfg` as node processes under `scenario`; wall time and the survivors' rows."""
    if scenario == "one node 4x slower":
        cfg = config.derive(cfg, {"timing.slow": [SLOW], "timing.slow_factor": 4.0})
    cfg = deployment(Experiment(cfg), run_dir)
    path = run_dir / "config.toml"
    path.write_text(cfg.to_toml())
    killing = scenario.startswith("25% killed")
    survivors = [i for i in range(NODES) if not (killing and i in VICTIMS)]
    started = time.perf_counter()
    procs = {i: start_node(path, run_dir, i) for i in range(NODES)}
    resumed, killed_at, stages, survivors_wall = [], None, [], None
    try:
        while any(p.poll() is None for p in procs.values()):
            if survivors_wall is None and all(procs[i].poll() is not None for i in survivors):
                survivors_wall = time.perf_counter() - started
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                raise RuntimeError(f"{scenario}: the run took over {RUN_TIMEOUT_S} s")
            done = min(len(rows_of(run_dir, i)) for i in survivors)
            if killing and killed_at is None and done >= cfg.rounds // 4:
                for victim in VICTIMS:
                    procs[victim].kill()
                    procs[victim].wait()
                killed_at = done
                stages.append({"killed": list(VICTIMS), "after_round": done, "s": time.perf_counter() - started})
            if scenario.endswith("half resumed") and killed_at is not None and not resumed \
                    and done >= killed_at + 2:
                procs[VICTIMS[0]] = start_node(path, run_dir, VICTIMS[0], resume=True)
                resumed.append(VICTIMS[0])
                stages.append({"resumed": VICTIMS[0], "after_round": done, "s": time.perf_counter() - started})
            time.sleep(0.1)
        wall = time.perf_counter() - started
        survivors_wall = survivors_wall or wall
    finally:
        stop_all(procs.values(), grace=2.0)
    failed = {i: p.returncode for i, p in procs.items() if i in survivors + resumed and p.returncode != 0}
    if failed:
        raise RuntimeError(f"{scenario}: nodes exited with {failed}")
    return {"wall_s": wall, "survivors_wall_s": survivors_wall, "stages": stages, "deadline_s": cfg.deploy.deadline_s,
            "rows": {i: rows_of(run_dir, i) for i in survivors}}


def measures(result: dict[str, Any]) -> dict[str, Any]:
    """The survivors' accuracy, their largest and usual gap between rounds, their rounds/s (the
    slow node left out)."""
    rows = result["rows"]
    gaps = [b["wall_seconds"] - a["wall_seconds"] for r in rows.values() for a, b in zip(r[1:], r[2:])]
    pace = [(len(r) - 2) / (r[-1]["wall_seconds"] - r[1]["wall_seconds"]) for i, r in rows.items() if i != SLOW]
    accuracy = [r[-1]["accuracy"] for r in rows.values() if "accuracy" in r[-1]]
    return {"wall_s": result["wall_s"], "survivors_wall_s": result["survivors_wall_s"], "accuracy": statistics.fmean(accuracy),
            "max_gap_s": max(gaps), "usual_gap_s": statistics.median(gaps),
            "max_gap_deadlines": max(gaps) / result["deadline_s"], "rounds_per_s": statistics.fmean(pace)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ring only, 20 rounds (a few minutes)")
    parser.add_argument("--rounds", type=int, default=40, help="the quickstart's 40 by default")
    parser.add_argument("--topologies", default="ring,random_geometric")
    parser.add_argument("--schedules", default="sync,async")
    args = parser.parse_args()
    rounds, topologies = (20, ["ring"]) if args.quick else (args.rounds, args.topologies.split(","))
    load = os.getloadavg()[0]
    table, runs = [], []
    with tempfile.TemporaryDirectory(prefix="gossipfl-faults-") as scratch:
        for topology in topologies:
            for schedule in args.schedules.split(","):
                cfg = config.derive(config.quickstart(), {
                    "topology.nodes": NODES, "topology.kind": topology, "rounds": rounds,
                    "gossip.schedule": schedule, "eval.every": rounds})  # evaluate at the end only
                clean = None
                for scenario in SCENARIOS:
                    result = run(cfg, Path(scratch) / f"{topology}-{schedule}-{len(runs)}", scenario)
                    m = measures(result)
                    clean = clean or m
                    table.append({
                        "graph": topology, "schedule": schedule, "scenario": scenario,
                        "survivors' wall s": round(m["survivors_wall_s"], 1),
                        "/ clean": round(m["survivors_wall_s"] / clean["survivors_wall_s"], 2),
                        "all processes' wall s": round(m["wall_s"], 1),
                        "survivors' accuracy": round(m["accuracy"], 4),
                        "largest gap s": round(m["max_gap_s"], 2), "usual gap s": round(m["usual_gap_s"], 2),
                        "largest gap / deadline": round(m["max_gap_deadlines"], 3),
                        "others' rounds/s / clean": round(m["rounds_per_s"] / clean["rounds_per_s"], 2)})
                    runs.append({"graph": topology, "schedule": schedule, "scenario": scenario,
                                 "stages": result["stages"], **m})
                    print(table[-1], flush=True)
    print(f"\nload average at start {load:.2f}; {NODES} node processes on {os.cpu_count()} CPUs; {rounds} rounds; "
          f"deploy.deadline_s = {cfg.deploy.deadline_s:g}")
    print(markdown_table(table, list(table[0])))
    print("wrote", write("faults", {"args": vars(args), "rounds": rounds, "load_average_at_start": load,
                                    "table": table, "runs": runs}))


if __name__ == "__main__":
    main()
