"""The `gossipfl` command line.

Only argparse and the torch-free config are imported up front: each command imports what it
needs, so `--help`, `keys`, `plot`, `runs` and `compare` start without torch or cvxpy. Errors a
user can fix (gossipfl.errors.UserError) print one line and exit with code 2; `--json` makes a
command print one JSON document on stdout and nothing else (progress and logs go to stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from . import config as config_mod
from .config import GossipConfig
from .errors import UserError
from .runtimes import RESTART_POLICIES

LAUNCH_QUICKSTART_NODES = 8  # one process per node: 8 fit a 2-core machine comfortably
IMAGE_FORMATS = ("png", "pdf", "svg")
DEFAULT_COMPARE = ("metropolis", "max_degree", "best_constant", "fmmc", "fdla")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_RUNS = "runs"  # the config's default `output`


class LazyChoices(Sequence[str]):
    """The names of a table in the module that implements it, read when argparse first needs them
    (to check a value or show a help screen), so that building the parser imports nothing heavy."""

    def __init__(self, module: str, table: str):
        self.module, self.table = module, table

    def names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module, __package__), self.table))

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())


WEIGHT_SCHEMES = LazyChoices(".graph.weights", "METHODS")


class UsageError(UserError):
    """A command-line argument that cannot be used; the message names it."""


class Parser(argparse.ArgumentParser):
    """argparse with its error on one line (`gossipfl keys: error: ... (see --help)`), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def image_path(text: str) -> str:
    suffix = Path(text).suffix.lower().lstrip(".")
    if suffix not in IMAGE_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown image type {Path(text).suffix or '(none)'!r}; "
                                         f"end the name with {', '.join('.' + f for f in IMAGE_FORMATS)}")
    return text


def scheme_list(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in WEIGHT_SCHEMES]
    if unknown or not schemes:
        raise argparse.ArgumentTypeError(f"unknown weight scheme {unknown[0] if unknown else text!r}; "
                                         f"choose from {', '.join(WEIGHT_SCHEMES)}")
    return schemes


# ------------------------------------------------------------------------------------ running


def print_result(args: argparse.Namespace, document: Any, text: str) -> None:
    """`--json`: the document alone on stdout; otherwise the text for a person."""
    print(json.dumps(document, indent=2) if args.json else text, flush=True)


def run_text(summary: dict[str, Any], run_dir: Any) -> str:
    from .report import readable_bytes
    lines = []
    if summary.get("final_accuracy_mean") is not None:
        lines.append(f"final accuracy: {summary['final_accuracy_mean']:.4f} node mean, "
                     f"{summary['final_accuracy_min']:.4f} weakest node"
                     + (f", {summary['final_accuracy_average_model']:.4f} average model"
                        if summary.get("final_accuracy_average_model") is not None else ""))
    if summary.get("final_merge_accuracy") is not None:
        lines.append(f"final merge: {summary['final_merge_accuracy']:.4f}, the exact average of "
                     f"{summary['final_merge_nodes']} of {summary['nodes']} nodes' models")
    if summary.get("final_accuracy_global_model") is not None:  # a sampled run (MoDeST, FedAvg)
        lines.append(f"final accuracy: {summary['final_accuracy_global_model']:.4f} newest aggregate")
    if summary.get("final_consensus_distance") is not None:
        lines.append(f"consensus distance: {summary['final_consensus_distance']:.4g}")
    if summary.get("wall_seconds") is not None:
        lines.append(f"{summary['rounds']} rounds in {summary['wall_seconds']:.1f} s, "
                     f"{readable_bytes(summary.get('bytes_sent_total') or 0)} of models sent")
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)


def end_run(args: argparse.Namespace, summary: dict[str, Any], run_dir: Any, resume_hint: str = "") -> int:
    """Plots and the summary of the rounds done, also of an interrupted run (then exit code 130)."""
    if not args.no_plot and summary.get("rounds"):
        from .plots import plot_run
        plot_run(run_dir)
    print_result(args, summary, run_text(summary, run_dir))
    if summary["status"] == "interrupted":
        print(f"gossipfl: interrupted after {summary['rounds']} rounds"
              + (f"; continue with {resume_hint}" if resume_hint else ""), file=sys.stderr)
        return 130
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .allocation import reuse_large_allocations
    from .rundir import checked_run_dir, claim_run_dir, recording_status
    reuse_large_allocations()  # this process is ours: the vectorized engine's per-step N x d buffers reuse pages
    if args.resume:
        if args.config or args.set or args.out:
            raise UsageError("--resume continues a run with its own config.toml and folder; "
                             "give no CONFIG, --set or --out with it")
        run_dir = checked_run_dir(args.resume)
        from .runtimes.sim import Simulation
        sim = Simulation.resume(run_dir, progress=not args.quiet)
    else:
        cfg = config_mod.load_config(args.config, args.set)  # a config error comes back before torch loads
        from .runtimes.sim import Simulation
        sim = Simulation(cfg, run_dir=args.out and claim_run_dir(args.out), progress=not args.quiet)
    with recording_status(sim.run_dir):
        summary = sim.run()
    return end_run(args, summary, sim.run_dir, resume_hint=f"gossipfl simulate --resume {sim.run_dir}")


def cmd_launch(args: argparse.Namespace) -> int:
    defaults = [] if args.config else [f"topology.nodes={LAUNCH_QUICKSTART_NODES}", "name='quickstart-launch'"]
    cfg = config_mod.load_config(args.config, defaults + args.set)
    from .rundir import claim_run_dir, new_run_dir, recording_status
    from .runtimes.launch import launch
    from .runtimes.process import check_supported
    check_supported(cfg)
    run_dir = claim_run_dir(args.out) if args.out else new_run_dir(cfg.output, cfg.name)
    with recording_status(run_dir):
        summary = launch(cfg, run_dir, progress=not args.quiet, restart=args.restart, max_restarts=args.max_restarts)
    return end_run(args, summary, run_dir)


def cmd_node(args: argparse.Namespace) -> int:
    import logging
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = config_mod.load(args.config)
    node_id = node_id_of(args, cfg)
    from .runtimes import cap_threads
    cap_threads(cfg.threads)  # before torch loads: its thread pools and BLAS's read the limit at start
    from .experiment import Experiment
    from .runtimes.process import run_node
    n = Experiment(cfg).n
    if not 0 <= node_id < n:
        given = f"--id {node_id}" if args.id is not None else f"deploy.id = {node_id}"
        raise UsageError(f"{given} is out of range: {args.config} describes {n} nodes (ids 0..{n - 1})")
    run_dir = cfg.deploy.run_dir or f"{cfg.output}/{cfg.name}"
    summary = run_node(cfg, node_id, run_dir, resume=args.resume)
    print(json.dumps(summary))
    return 0


def node_id_of(args: argparse.Namespace, cfg: config_mod.ExperimentConfig) -> int:
    """--id, or the file's deploy.id; both given, they must agree."""
    own = cfg.deploy.id if cfg.deploy.id >= 0 else None
    if args.id is not None and own is not None and args.id != own:
        raise UsageError(f"--id {args.id} disagrees with deploy.id = {own} in {args.config}")
    if args.id is None and own is None:
        raise UsageError(f"{args.config} sets no deploy.id: give --id N")
    return own if args.id is None else args.id


def cmd_deploy_init(args: argparse.Namespace) -> int:
    from .deploy.bundle import RUNSHEET, init_deployment
    from .deploy.hosts import Target
    raw = config_mod.apply_overrides(config_mod.config_dict(args.config), dict(config_mod.parse_override(text) for text in args.set))
    say = lambda text: print(text, flush=True)  # noqa: E731
    out = init_deployment(raw, args.graph, args.hosts, args.out, keys=not args.no_keys,
                          target=Target(args.user, args.remote_dir, args.venv), say=say)
    say(f"wrote {out}; next steps in {out / RUNSHEET}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from .transport.keys import write_keys
    try:
        listing = write_keys(args.out, range(args.nodes), replace=args.force)
    except FileExistsError as exc:
        raise UsageError(f"--out {args.out}: {exc}; pass --force to replace them") from None
    print(f"wrote key pairs for {args.nodes} nodes to {args.out}; public keys listed in {listing}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Ask every node of a deployment for its round, accuracy, neighbours' liveness and drops."""
    source = Path(args.target)
    cfg = config_mod.load(source / "config.toml" if source.is_dir() else source)
    addresses = cfg.deploy.addresses
    if not addresses:
        raise UsageError(f"{args.target}: deploy.addresses is empty, so there are no nodes to ask")
    curve = None
    keys, named = (args.keys, f"--keys {args.keys}") if args.keys else (cfg.deploy.keys, f"deploy.keys = {cfg.deploy.keys!r}")
    if keys:
        from .transport.keys import load_operator_keys
        try:
            curve = load_operator_keys(keys)
        except FileNotFoundError as exc:
            raise UsageError(f"{named} has no operator key pair ({exc.filename}); write keys with this "
                             "version's gossipfl keys (deploy init: the folder operator/)") from None
        missing = [i for i in range(len(addresses)) if i not in curve.allowed_public_keys]
        if missing:
            raise UsageError(f"{named} lists no public key for node {missing[0]}")
    from .transport.status import query_status
    answers = query_status({i: f"tcp://{a}" for i, a in enumerate(addresses)}, args.timeout, curve)
    nodes = [{"node": i, "address": addresses[i], "reachable": answer is not None, **(answer or {})}
             for i, answer in answers.items()]
    print_result(args, {"source": str(source), "timeout_s": args.timeout, "nodes": nodes}, status_table(nodes))
    return 0 if all(n["reachable"] for n in nodes) else 1


def status_table(nodes: list[dict[str, Any]]) -> str:
    from .report import markdown_table

    def neighbours(node: dict[str, Any]) -> str:
        by_state: dict[str, list[str]] = {}
        for peer, row in node.get("liveness", {}).items():
            by_state.setdefault(row["state"], []).append(peer)
        return "; ".join(f"{state} {','.join(peers)}" for state, peers in sorted(by_state.items())) or "-"

    def counts(node: dict[str, Any]) -> str:
        rejected = node.get("rejected", {})
        return ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1])) \
            or "-"

    def row(node: dict[str, Any]) -> dict[str, Any]:
        if not node["reachable"]:
            return {"node": node["node"], "address": node["address"], "status": "UNREACHABLE"}
        accuracy = node.get("accuracy")
        return {"node": node["node"], "address": node["address"], "status": node.get("error", "live"),
                "round": f"{node.get('round', '?')}/{node.get('rounds', '?')}",
                "accuracy": "-" if accuracy is None else f"{accuracy:.4f}",
                "neighbours": neighbours(node), "rejected": counts(node)}

    live = sum(n["reachable"] for n in nodes)
    table = markdown_table([row(n) for n in nodes],
                           ["node", "address", "status", "round", "accuracy", "neighbours", "rejected"])
    return f"{table}\n{live} of {len(nodes)} nodes answered"


def cmd_topology(args: argparse.Namespace) -> int:
    from .graph import sdp, topology, weights
    graph = topology.read_graph(args.graph)
    n, m = graph.number_of_nodes(), graph.number_of_edges()
    document: dict[str, Any] = {"graph": args.graph, "nodes": n, "edges": m, "schemes": []}
    say: Callable[[str], None] = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    say(f"{args.graph}: n = {n}, edges = {m}")
    say(f"{'weights':<16} {'SLEM':>10} {'gap':>10} {'solver':>14} {'seconds':>8}  status")
    needed = args.weights if (args.out or (args.plot and not args.rates)) else None
    results = {}
    for name in dict.fromkeys([*(args.compare or DEFAULT_COMPARE), *([needed] if needed else [])]):
        try:  # each line as soon as its scheme is solved: an SDP can take minutes
            results[name] = r = weights.solve_weights(graph, name)
        except sdp.ProgramTooLarge as exc:
            if name == needed:
                raise
            document["schemes"].append({"weights": name, "refused": str(exc)})
            say(f"{name:<16} refused: {exc}")
            continue
        document["schemes"].append({"weights": name, "slem": r.slem, "gap": 1 - r.slem, "solver": r.solver,
                                    "seconds": r.seconds, "status": r.status})
        say(f"{name:<16} {r.slem:>10.6f} {1 - r.slem:>10.6f} {r.solver:>14} {r.seconds:>8.2f}  {r.status}")
    if args.out:
        Path(args.out).write_text(json.dumps(weights.to_json(results[args.weights])) + "\n")
        document["out"] = args.out
        say(f"wrote {args.weights} weights to {args.out}")
    rates = None
    if args.rates:
        rates = {"uniform": sdp.uniform_rates(graph, args.budget)}
        if args.rates == "optimal":
            rates["optimal"] = sdp.optimal_rates(graph, args.budget)
        for kind, r in rates.items():
            document.setdefault("rates", {})[kind] = {"lambda2": r.lambda2, "chi1": r.chi1, "chi2": r.chi2,
                                                     "solver": r.solver, "status": r.status}
            say(f"{kind} rates: lambda_2 = {r.lambda2:.6f}, chi_1 = {r.chi1:.4f}, chi_2 = {r.chi2:.4f}")
    if args.plot:
        from .plots import plot_graph
        if rates:
            edge_values, label = rates[args.rates].rates, f"{args.rates} rate"
        else:
            matrix = results[args.weights].matrix
            edge_values, label = [matrix[u, v] for u, v in graph.edges], f"{args.weights} weight"
        document["plot"] = str(plot_graph(graph, edge_values, label, args.plot))
        say(f"wrote {document['plot']}")
    if args.json:
        print(json.dumps(document, indent=2))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .report import markdown_table
    from .rundir import describe_run, find_runs
    root = Path(args.dir or DEFAULT_RUNS)
    if args.dir and not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    runs = [describe_run(path, root) for path in find_runs(root)] if root.is_dir() else []
    rows = [{"run": r["name"], "started": r["started"].replace("T", " ")[:16], "status": r["status"],
             "settings": settings_text(r["settings"]), "rounds": f"{r['rounds_done']}/{r['rounds']}",
             "final accuracy": r["final_accuracy"]} for r in runs]
    text = markdown_table(rows, ["run", "started", "status", "settings", "rounds", "final accuracy"]) if runs \
        else f"no runs under {root}"
    print_result(args, {"root": str(root), "runs": runs}, text)
    return 0


def settings_text(settings: dict[str, Any]) -> str:
    s = settings
    return (f"{s['dataset']}, {s['topology']} x{s['nodes']}, {s['model']}, Q={s['gossip.steps']}, "
            f"rho={s['train.rho']}, {s['gossip.weights']}, {s['gossip.merge']}, {s['gossip.schedule']}")


def cmd_compare(args: argparse.Namespace) -> int:
    from .plots import compare
    for path in compare(args.runs, args.out, args.format):
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep
    spec = sweep.from_command_line(args.config, args.set, grid=args.grid, seeds=args.seeds, jobs=args.jobs,
                                   out=args.out)
    result = sweep.run_sweep(spec, progress=not args.quiet)
    print_result(args, result.document(), result.markdown())
    return 1 if result.failed else 0


# ------------------------------------------------------------------------------------ parser


def add_experiment_arguments(parser: argparse.ArgumentParser, out_help: str, plots: bool = True) -> None:
    parser.add_argument("config", nargs="?", help="experiment TOML file (default: the built-in quickstart)")
    if plots:
        parser.add_argument("--no-plot", action="store_true",
                            help="skip the PNG plots of the run (draw them later with gossipfl plot)")
    parser.add_argument("--out", metavar="DIR", help=out_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, value read as TOML: --set train.rho=0 --set "
                             "model.hidden=[64,64] --set data.dataset=digits (repeatable; fields in docs/guide.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gossipfl", description="Decentralized learning by gossip: simulate, launch or deploy "
                                                 "nodes that train and exchange models with graph neighbours.")
    parser.add_argument("--version", action="version", version=f"gossipfl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new_run = "run folder to create; must not exist or be empty (default: OUTPUT/NAME-TIMESTAMP)"

    sim = sub.add_parser("simulate", help="run every node in this process (default: the quickstart)",
                         description="Run an experiment with every node in this process.")
    add_experiment_arguments(sim, new_run)
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted simulation from its newest checkpoint (saved every "
                          "deploy.checkpoint_every rounds), with the config in its folder")
    sim.set_defaults(func=cmd_simulate)

    launch = sub.add_parser("launch", help="run one OS process per node on this machine",
                            description="Run an experiment with one OS process per node over ZeroMQ on this "
                                        f"machine (no config: the quickstart with {LAUNCH_QUICKSTART_NODES} nodes).")
    add_experiment_arguments(launch, new_run)
    launch.add_argument("--restart", default="never", choices=RESTART_POLICIES,
                        help="start a node that died again, resuming from its last checkpoint (default never)")
    launch.add_argument("--max-restarts", type=positive_int, default=3, metavar="N",
                        help="restarts per node with --restart on-failure (default 3)")
    launch.set_defaults(func=cmd_launch)

    sweep = sub.add_parser("sweep", help="run a grid of settings over seeds; table of mean and spread",
                           description="Run every combination of --grid values (and of the config's [sweep] "
                                       "table) for each seed, each as its own `gossipfl simulate`, then write "
                                       "results.csv/.json/.md of final metrics per combination over seeds. "
                                       "Runs already complete in the sweep folder are skipped, so an "
                                       "interrupted sweep resumes when run again.")
    add_experiment_arguments(sweep, "sweep folder (default: OUTPUT/NAME-sweep; the same folder resumes)",
                             plots=False)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values of one field to sweep, e.g. --grid gossip.steps=1,4 --grid "
                            "gossip.weights=metropolis,fmmc (repeatable: every combination runs)")
    sweep.add_argument("--seeds", type=positive_int, metavar="N",
                       help="run each combination with seeds SEED..SEED+N-1 (default 1, or [sweep] seeds)")
    sweep.add_argument("--jobs", type=positive_int, metavar="N",
                       help="runs in parallel, each one process with one torch thread (default 1)")
    sweep.set_defaults(func=cmd_sweep)

    node = sub.add_parser("node", help="run one node of a deployment (one per host or process)",
                          description="Run one node of a deployment over ZeroMQ; see docs/deployment.md.")
    node.add_argument("--config", required=True, metavar="DEPLOY.toml",
                      help="deployment TOML: the experiment plus [deploy] addresses")
    node.add_argument("--id", type=int, help="this node's id, 0..n-1 (default: the file's deploy.id)")
    node.add_argument("--resume", action="store_true", help="continue from this node's last checkpoint")
    node.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                      help="stderr log detail: " + ", ".join(LOG_LEVELS) + " (default info: a line per round)")
    node.set_defaults(func=cmd_node)

    status = sub.add_parser("status", help="ask the nodes of a running deployment how they fare",
                            description="Ask every node, over its own port, for its round, last accuracy, "
                                        "neighbours' liveness (alive or suspected) and rejected-message "
                                        "counts; a node answers while it trains. Exit code 1 when some node "
                                        "did not answer within --timeout.")
    status.add_argument("target", metavar="RUN_DIR_OR_DEPLOY.toml",
                        help="a run folder of gossipfl launch (its config.toml) or a deployment file")
    status.add_argument("--timeout", type=positive_float, default=3.0, metavar="S",
                        help="seconds to wait for the answers; a node silent that long is unreachable (default 3)")
    status.add_argument("--keys", metavar="DIR", help="the operator's CurveZMQ key folder (default: the file's "
                                                       "deploy.keys; deploy init writes it to operator/)")
    status.add_argument("--json", action="store_true", help="print the answers as one JSON document on stdout")
    status.set_defaults(func=cmd_status)

    add_deploy_parser(sub)

    keys = sub.add_parser("keys", help="make CurveZMQ key pairs for a deployment",
                          description="Make one CurveZMQ key pair per node, the operator's pair (for "
                                      "gossipfl status) and keys.toml, the public listing.")
    keys.add_argument("--nodes", type=positive_int, required=True, help="number of nodes (ids 0..N-1)")
    keys.add_argument("--out", required=True, metavar="DIR", help="folder for the key files")
    keys.add_argument("--force", action="store_true", help="replace key files already in DIR")
    keys.set_defaults(func=cmd_keys)

    topo = sub.add_parser("topology", help="compare mixing weights of a graph file; store or draw them",
                          description="Print the SLEM and spectral gap of mixing-weight schemes on a graph, "
                                      "each as soon as it is solved; store or draw the chosen weights or rates.")
    topo.add_argument("graph", help="graph file: .edgelist/.edges/.txt, .graphml or .json")
    topo.add_argument("--weights", default="fmmc", choices=WEIGHT_SCHEMES, metavar="SCHEME",
                      help="the scheme that --out stores and --plot draws: %(choices)s (default fmmc)")
    topo.add_argument("--compare", type=scheme_list, metavar="A,B,...",
                      help="comma-separated schemes to show (default: " + ",".join(DEFAULT_COMPARE) + ")")
    topo.add_argument("--out", metavar="W.json", help="write the chosen weights (full matrix plus solve record)")
    topo.add_argument("--rates", choices=GossipConfig.RATES,
                      help="also compute Poisson gossip rates (" + ", ".join(GossipConfig.RATES)
                           + "); --plot then draws these rates")
    topo.add_argument("--budget", type=positive_float, default=1.0, help="total edge rate for --rates (default 1)")
    topo.add_argument("--plot", type=image_path, metavar="FILE",
                      help="draw the graph, edge width by weight (or rate): " + ", ".join(IMAGE_FORMATS))
    topo.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    topo.set_defaults(func=cmd_topology)

    plot = sub.add_parser("plot", help="(re)draw the PNG plots of a run folder",
                          description="Draw accuracy, training loss, local accuracy and consensus distance "
                                      "against round and bytes into the run folder.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (from simulate or launch)")
    plot.set_defaults(func=cmd_plot)

    runs = sub.add_parser("runs", help="list run folders with status, settings and final accuracy",
                          description="List the run folders under DIR (sweeps included): name, start, status "
                                      "(running, complete, failed, interrupted), key settings, final accuracy.")
    runs.add_argument("dir", nargs="?", metavar="DIR", help=f"folder to search (default: {DEFAULT_RUNS})")
    runs.add_argument("--json", action="store_true", help="print the listing as one JSON document on stdout")
    runs.set_defaults(func=cmd_runs)

    comp = sub.add_parser("compare", help="overlay the curves of several runs or sweeps",
                          description="Draw accuracy, training loss, local accuracy and consensus distance "
                                      "against round, bytes sent and wall time for several runs overlaid; a "
                                      "sweep folder gives one curve per combination, its seeds as a band. The "
                                      "legend names what differs between the runs' configs.")
    comp.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders and sweep folders")
    comp.add_argument("--out", metavar="DIR", help="where to write the figures (default: the folder given, "
                                                   "or ./compare for several)")
    comp.add_argument("--format", default="png", choices=IMAGE_FORMATS,
                      help="figure file type: " + ", ".join(IMAGE_FORMATS) + " (default png)")
    comp.set_defaults(func=cmd_compare)
    return parser


def add_deploy_parser(sub: Any) -> None:
    from .deploy.hosts import Target
    deploy = sub.add_parser("deploy", help="prepare a deployment on separate hosts",
                            description="Prepare a deployment on separate hosts (see docs/deploy.md).")
    actions = deploy.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="write every host's files from a graph and a list of hosts",
                              description="Write one deployment folder: per host its node file, CurveZMQ keys "
                                          "and data shard; the mixing weights solved once (W.json), a systemd "
                                          "unit template and RUNSHEET.md with the commands to copy, start, "
                                          "watch and collect.")
    init.add_argument("config", nargs="?", help="experiment TOML file (default: the built-in quickstart)")
    init.add_argument("--graph", required=True, metavar="GRAPH", help="graph file (.edgelist, .graphml, .json): "
                                                                      "node ids 0..n-1, one host each")
    init.add_argument("--hosts", required=True, metavar="HOSTS.txt",
                      help="one host or host:port a line in node-id order, # comments (or a .toml with hosts = "
                           "[...]); the default port is 7100")
    init.add_argument("--out", required=True, metavar="DIR", help="folder to create; must not exist or be empty")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, value read as TOML (repeatable)")
    init.add_argument("--no-keys", action="store_true", help="no CurveZMQ keys: a lab network only")
    init.add_argument("--user", default=Target.user, help=f"account on the hosts (default {Target.user})")
    init.add_argument("--remote-dir", default=Target.directory, metavar="DIR",
                      help=f"deployment folder on the hosts (default {Target.directory})")
    init.add_argument("--venv", default=Target.venv, metavar="DIR",
                      help=f"virtual environment with gossipfl on the hosts (default {Target.venv})")
    init.set_defaults(func=cmd_deploy_init)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as exc:
        print(f"gossipfl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gossipfl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (gossipfl runs | head): stop quietly, as the docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
