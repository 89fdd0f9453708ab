"""The `gossipfl` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import config as config_mod
from .config import ConfigError, ExperimentConfig
from .data import DatasetError
from .topology import TopologyError

USER_ERRORS = (ConfigError, DatasetError, TopologyError, FileNotFoundError)


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


def cmd_simulate(args: argparse.Namespace) -> int:
    from .plots import plot_run
    from .sim import Simulation
    cfg = load_config(args.config, args.set)
    sim = Simulation(cfg, run_dir=args.out, progress=not args.quiet)
    summary = sim.run()
    plot_run(sim.run_dir)
    print(json.dumps(summary, indent=2))
    print(f"run folder: {sim.run_dir}  (plots: gossipfl plot {sim.run_dir})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossipfl", description="Decentralized learning by gossip.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run every node in this process (default: the quickstart)")
    sim.add_argument("config", nargs="?", help="experiment TOML (default: built-in quickstart)")
    sim.add_argument("--out", help="run folder (default: runs/NAME-TIMESTAMP)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set train.rho=0 --set rounds=5")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)

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
