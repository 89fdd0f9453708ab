"""The `gossipfl` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import config as config_mod
from .config import ConfigError, ExperimentConfig
from .data import DatasetError
from .runtimes.launch import LaunchError
from .graph.topology import TopologyError

USER_ERRORS = (ConfigError, DatasetError, TopologyError, LaunchError, FileNotFoundError)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` with value read as TOML (numbers, booleans, lists), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = config_mod.tomllib.loads(f"v = {raw}")["v"]
    except config_mod.tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | None, overrides: list[str]) -> ExperimentConfig:
    """The config file (or the quickstart), with --set overrides applied before validation."""
    data = config_mod.read_toml(path) if path else config_mod.quickstart().to_dict()
    for text in overrides:
        keys, value = parse_override(text)
        table = data
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        table[keys[-1]] = value
    return config_mod.from_dict(data)


LAUNCH_QUICKSTART_NODES = 8  # one process per node: 8 fit a 2-core machine comfortably


def finish_run(summary: dict[str, Any], run_dir: Any) -> int:
    from .plots import plot_run
    plot_run(run_dir)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {run_dir}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .runtimes.sim import Simulation
    sim = Simulation(load_config(args.config, args.set), run_dir=args.out, progress=not args.quiet)
    return finish_run(sim.run(), sim.run_dir)


def cmd_launch(args: argparse.Namespace) -> int:
    from .runtimes.launch import launch
    from .rundir import new_run_dir
    defaults = [] if args.config else [f"topology.nodes={LAUNCH_QUICKSTART_NODES}", "name='quickstart-launch'"]
    cfg = load_config(args.config, defaults + args.set)
    run_dir = args.out or new_run_dir(cfg.output, cfg.name)
    return finish_run(launch(cfg, run_dir, progress=not args.quiet), run_dir)


def cmd_node(args: argparse.Namespace) -> int:
    import logging
    from .runtimes.process import run_node
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = config_mod.load(args.config)
    run_dir = cfg.deploy.run_dir or f"{cfg.output}/{cfg.name}"
    summary = run_node(cfg, args.id, run_dir, resume=args.resume)
    print(json.dumps(summary))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .transport.keys import write_keys
    listing = write_keys(args.out, range(args.nodes))
    print(f"wrote key pairs for {args.nodes} nodes to {args.out}; public keys listed in {listing}")
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from .graph import sdp, topology, weights
    from .plots import plot_graph
    graph = topology.read_graph(args.graph)
    print(f"{args.graph}: n = {graph.number_of_nodes()}, edges = {graph.number_of_edges()}")
    methods = args.compare.split(",") if args.compare else ["metropolis", "max_degree", "best_constant",
                                                             "fmmc", "fdla"]
    results = {m: weights.solve_weights(graph, m) for m in dict.fromkeys([*methods, args.weights])}
    print(f"{'weights':<14} {'SLEM':>10} {'gap':>10} {'solver':>12} {'seconds':>8}  status")
    for name, r in results.items():
        print(f"{name:<14} {r.slem:>10.6f} {1 - r.slem:>10.6f} {r.solver:>12} {r.seconds:>8.2f}  {r.status}")
    chosen = results[args.weights]
    if args.out:
        Path(args.out).write_text(json.dumps(weights.to_json(chosen)) + "\n")
        print(f"wrote {args.weights} weights to {args.out}")
    rates = None
    if args.rates:
        rates = {kind: (sdp.optimal_rates if kind == "optimal" else sdp.uniform_rates)(graph, args.budget)
                 for kind in ("uniform", "optimal")}
        for kind, r in rates.items():
            print(f"{kind} rates: lambda_2 = {r.lambda2:.6f}, chi_1 = {r.chi1:.4f}, chi_2 = {r.chi2:.4f}")
    if args.plot:
        edge_values = rates[args.rates].rates if rates else [chosen.matrix[u, v] for u, v in graph.edges]
        label = f"{args.rates} rate" if rates else f"{args.weights} weight"
        print("wrote", plot_graph(graph, edge_values, label, args.plot))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment TOML (default: built-in quickstart)")
    parser.add_argument("--out", help="run folder (default: runs/NAME-TIMESTAMP)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.rho=0 --set rounds=5")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossipfl", description="Decentralized learning by gossip.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run every node in this process (default: the quickstart)")
    add_run_arguments(sim)
    sim.set_defaults(func=cmd_simulate)

    launch = sub.add_parser("launch", help="run one OS process per node on this machine "
                                           f"(default: the quickstart with {LAUNCH_QUICKSTART_NODES} nodes)")
    add_run_arguments(launch)
    launch.set_defaults(func=cmd_launch)

    node = sub.add_parser("node", help="run one node of a deployment (one per host or process)")
    node.add_argument("--config", required=True, help="deployment TOML: experiment plus [deploy]")
    node.add_argument("--id", type=int, required=True, help="this node's id (0..n-1)")
    node.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    node.set_defaults(func=cmd_node)

    keys = sub.add_parser("keys", help="make CurveZMQ key pairs for a deployment")
    keys.add_argument("--nodes", type=int, required=True)
    keys.add_argument("--out", required=True, help="folder for the key files")
    keys.set_defaults(func=cmd_keys)

    topo = sub.add_parser("topology", help="compare mixing weights of a graph file; store or draw them")
    topo.add_argument("graph", help="graph file: .edgelist/.edges/.txt, .graphml or .json")
    topo.add_argument("--weights", default="fmmc", help="the scheme to store with --out (default fmmc)")
    topo.add_argument("--compare", help="comma-separated schemes to show (default: all but uniform)")
    topo.add_argument("--out", help="write the chosen weights as W.json (full matrix plus solve record)")
    topo.add_argument("--rates", choices=("uniform", "optimal"),
                      help="also compute Poisson gossip rates; --plot then draws these rates")
    topo.add_argument("--budget", type=float, default=1.0, help="total edge rate for --rates")
    topo.add_argument("--plot", metavar="PNG", help="draw the graph, edge width by weight (or rate)")
    topo.set_defaults(func=cmd_topology)

    plot = sub.add_parser("plot", help="write PNG plots of a run folder")
    plot.add_argument("run_dir")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"gossipfl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gossipfl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
