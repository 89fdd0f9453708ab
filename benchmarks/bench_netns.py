"""A deployment across network namespaces against loopback, with one host's link impaired.

`gossipfl deploy init`'s files for 4 nodes on a ring (Fashion-MNIST, MLP 784-200-10: 636 KB a
message, CurveZMQ on), one node process per namespace on a bridge (tests/netns.py), node 0 behind
the impaired link: a one-way delay with jitter and periodic connection resets from
tests/tcp_proxy.py, a `tc tbf` bandwidth cap both ways. The loopback row runs the same files on
127.0.0.1. Reports the wall time (start of the node processes to the last exit, imports included)
and the run time (the slowest node's rounds, after its setup), each the least over the repeats
(the settings run interleaved, so a busy machine hurts all alike), the final accuracies over
all nodes and repeats, and per run (mean over the repeats) the steps at which a node went without
a neighbour's message ("lost") and the messages nodes sent again after a reset ("resent").

    python benchmarks/bench_netns.py [--rounds 10] [--repeats 2] [--only SETTING ...]   # as root; 15 minutes on a busy 2-core machine

A reset every 30 s would not happen in a run this short: the reset row ends each connection 5 s
after it opened instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402  (test infrastructure: namespaces, proxy)

from gossipfl.report import markdown_table  # noqa: E402

N = 4
SETTINGS = {
    "loopback": None,
    "namespaces": netns.Impairment(),
    "50 ms delay": netns.Impairment(delay_ms=50, jitter_ms=5),
    "10 Mbit/s cap": netns.Impairment(mbit=10),
    "reset every 5 s": netns.Impairment(reset_s=5),
    "reset every 1 s": netns.Impairment(reset_s=1),
    "all three": netns.Impairment(delay_ms=50, jitter_ms=5, reset_s=5, mbit=10),
}


def experiment(rounds: int) -> dict:
    return {"name": "netns", "seed": 0, "rounds": rounds,
            "data": {"dataset": "fashion-mnist", "partition": "dirichlet", "alpha": 0.3},
            "model": {"name": "mlp", "hidden": [200]},
            "train": {"local_steps": 20, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "rho": 0.05},
            "gossip": {"steps": 2}, "eval": {"every": rounds},
            "deploy": {"deadline_s": 5.0, "startup_s": 60.0, "checkpoint_every": 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, interleaved (default 2)")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="SETTING",
                        help="run these settings only (default: all)")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        sys.exit(f"bench_netns: {reason}")
    raw = experiment(args.rounds)
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        graph = work / "ring.edgelist"
        graph.write_text("".join(f"{i} {(i + 1) % N}\n" for i in range(N)))
        for repeat in range(args.repeats):
            for name in args.only:
                impairment = SETTINGS[name]
                where = work / f"{repeat}-{name.replace(' ', '-').replace('/', '')}"
                run = (netns.run_on_loopback(raw, graph, where, N, timeout_s=600) if impairment is None else
                       netns.run_on_lan(raw, graph, where, N, impairment, timeout_s=600))
                runs[name].append({"wall_s": run.wall_s, "run_s": max(s["wall_seconds"] for s in run.summaries),
                                   "accuracy": run.accuracy, "resets": run.proxy.get("resets", 0),
                                   "lost": run.missing, "resent": sum(s.get("resent", 0) for s in run.summaries),
                                   "rounds": min(s["rounds_completed"] for s in run.summaries)})
                print(f"{name}: {runs[name][-1]}", flush=True)
    rows = [{"setting": name, "wall s": round(min(r["wall_s"] for r in done), 1),
             "run s": round(min(r["run_s"] for r in done), 1),
             "accuracy mean": round(statistics.mean(a for r in done for a in r["accuracy"]), 4),
             "accuracy min": round(min(a for r in done for a in r["accuracy"]), 4),
             "rounds": min(r["rounds"] for r in done), "resets": round(statistics.mean(r["resets"] for r in done)),
             "lost": statistics.mean(r["lost"] for r in done), "resent": statistics.mean(r["resent"] for r in done),
             "impairment": vars(SETTINGS[name]) if SETTINGS[name] else None, "runs": done}
            for name, done in runs.items()]
    print(markdown_table(rows, ["setting", "wall s", "run s", "accuracy mean", "accuracy min", "rounds", "resets",
                                "lost", "resent"]))
    print(f"wrote {write('netns', {'nodes': N, 'repeats': args.repeats, 'config': raw, 'rows': rows})}")


if __name__ == "__main__":
    main()
