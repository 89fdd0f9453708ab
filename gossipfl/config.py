"""Typed experiment configuration: TOML in, validated dataclasses out, resolved TOML back.

Every error names the offending field as `section.key` and, for choices, the allowed values, so a
user can fix a config without reading code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args, get_type_hints

import tomli_w

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


ENGINES = ("auto", "nodes", "vectorized")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the field."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ConfigError(f"{name} = {value!r} must lie in [{low}, {high}]")


@dataclass
class DataConfig:
    dataset: str = "auto"        # auto = fashion-mnist when installed, else digits
    path: str = ""               # directory of IDX files; "" = $GOSSIPFL_DATA or the Debian path
    partition: str = "dirichlet"
    alpha: float = 0.3           # Dirichlet concentration (smaller = more label skew)
    shards_per_node: int = 2     # labels per node for partition = "shards"
    synthetic_samples: int = 4000
    synthetic_features: int = 20
    synthetic_classes: int = 4
    shard: str = ""              # folder of one node's data from `gossipfl deploy init`; "" = load the data set

    def validate(self) -> None:
        from .data import DATASETS, PARTITIONS
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.partition", self.partition, PARTITIONS)
        _positive("data.alpha", self.alpha)
        _positive("data.shards_per_node", self.shards_per_node)
        for name in ("synthetic_samples", "synthetic_features"):
            _positive(f"data.{name}", getattr(self, name))
        if self.synthetic_classes < 2:
            raise ConfigError(f"data.synthetic_classes = {self.synthetic_classes} must be >= 2")


@dataclass
class TopologyConfig:
    kind: str = "ring"
    nodes: int = 16
    file: str = ""               # a graph file (edge list, GraphML, JSON) overrides kind/nodes
    p: float = 0.3               # erdos_renyi edge probability; small_world rewiring probability
    degree: int = 4              # random_regular
    radius: float = 0.4          # random_geometric
    k: int = 4                   # small_world ring neighbours
    rows: int = 0                # grid/torus rows (0 = squarest)

    def validate(self) -> None:
        from .graph.topology import KINDS
        if not self.file:
            _choice("topology.kind", self.kind, KINDS)
        if self.nodes < 2:
            raise ConfigError(f"topology.nodes = {self.nodes} must be >= 2: gossip needs two or more nodes")
        _in_range("topology.p", self.p, 0.0, 1.0)
        _positive("topology.radius", self.radius)


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [200])  # MLP hidden widths
    width: int = 16              # CNN / ResNet base channels

    def validate(self) -> None:
        from .models import MODELS
        _choice("model.name", self.name, tuple(MODELS))
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden = {self.hidden} must hold positive widths")
        _positive("model.width", self.width)


@dataclass
class TrainConfig:
    local_steps: int = 10        # K minibatch steps per round
    batch_size: int = 32
    lr: float = 0.1
    lr_decay: float = 0.998      # multiplied into lr once per round
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05            # SAM radius; 0 = plain SGD (DFedAvg)

    def validate(self) -> None:
        _positive("train.local_steps", self.local_steps, allow_zero=True)
        _positive("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        _in_range("train.lr_decay", self.lr_decay, 0.0, 1.0)
        _in_range("train.momentum", self.momentum, 0.0, 0.999)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.rho", self.rho, allow_zero=True)


@dataclass
class GossipConfig:
    steps: int = 4               # Q gossip steps per round (DFedSAM-MGS); 1 = DFedSAM
    weights: str = "metropolis"
    merge: str = "mean"
    variance_target: str = "follow_others"
    conservative_c: float = 0.5  # share of the variance gap closed by variance_target = "conservative"
    variance_eps: float = 1e-4   # epsilon of the variance ratio (Tian et al.); biases layers with var ~ eps
    init: str = "common"         # common = one initial model for all; independent = one per node
    weights_file: str = ""       # a stored W.json (gossipfl topology --out) used instead of `weights`
    schedule: str = "sync"       # sync = Q lock-step steps; poisson = pairwise exchanges on edge clocks;
                                 # async = each node trains, merges what arrived and sends at its own pace
    rates: str = "uniform"       # poisson: per-edge rates, uniform or optimal (DADAO SDP)
    poisson_time: float = 1.0    # poisson: clock time per round
    rate_budget: float = 0.0     # poisson: sum of edge rates; 0 = n/2 (about one exchange per node)
    staleness_decay: float = 1.0  # async: a vector k rounds behind the receiver weighs decay**k (1 = no decay)

    RATES = ("uniform", "optimal")
    INITS = ("common", "independent")

    def validate(self) -> None:
        from .algorithms.merge import MERGES, VARIANCE_TARGETS
        from .algorithms.schedule import SCHEDULES
        from .graph.weights import METHODS
        if self.steps < 1:
            raise ConfigError(f"gossip.steps = {self.steps} must be >= 1")
        _choice("gossip.weights", self.weights, tuple(METHODS))
        _choice("gossip.merge", self.merge, MERGES)
        _choice("gossip.variance_target", self.variance_target, VARIANCE_TARGETS)
        _in_range("gossip.conservative_c", self.conservative_c, 0.0, 1.0)
        _positive("gossip.variance_eps", self.variance_eps, allow_zero=True)
        _choice("gossip.init", self.init, self.INITS)
        _choice("gossip.schedule", self.schedule, SCHEDULES)
        _choice("gossip.rates", self.rates, self.RATES)
        _positive("gossip.poisson_time", self.poisson_time)
        _positive("gossip.rate_budget", self.rate_budget, allow_zero=True)
        _in_range("gossip.staleness_decay", self.staleness_decay, 0.0, 1.0)


@dataclass
class EvalConfig:
    every: int = 1               # evaluate every this many rounds (and always after the last)
    batch_size: int = 2000
    nodes: int = 0               # evaluate a fixed seeded sample of this many nodes; 0 = all
    test_samples: int = 0        # on a fixed seeded sample of this many test examples; 0 = all

    def validate(self) -> None:
        _positive("eval.every", self.every)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.nodes", self.nodes, allow_zero=True)
        _positive("eval.test_samples", self.test_samples, allow_zero=True)


@dataclass
class RobustConfig:
    """What an honest node does with received vectors before it merges them: the distance guard,
    then the filters in order (each a name in algorithms/robust.FILTERS or package.module:function)."""
    filters: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # per filter its parameters: {krum = {f = 2}}
    guard: str = "auto"          # distance guard: auto = on for network input (node processes), off in simulation
    guard_factor: float = 10.0   # accept up to this many times the median of recent honest distances
    guard_max_relative: float = 10.0  # and never more than this many times the node's own norm
    guard_window: int = 32       # recent accepted distances the median is taken over
    validation_fraction: float = 0.1  # share of each node's data held out for filters that judge models (bristle)

    def validate(self) -> None:
        from torch import nn

        from .algorithms.robust import GUARD_MODES, FilterContext, resolve_filter
        from .params import FlatModel
        _choice("robust.guard", self.guard, GUARD_MODES)
        stand_in = FilterContext(FlatModel(nn.Linear(2, 2)).layout, recall=lambda nodes, models: models)
        for name in self.options:
            if name not in self.filters:
                raise ConfigError(f"robust.options.{name}: no filter {name!r} in robust.filters = {self.filters}")
        for name in self.filters:
            options = self.options.get(name, {})
            if not isinstance(options, dict):
                raise ConfigError(f"robust.options.{name} = {options!r} must be a table of parameters")
            try:  # built with a stand-in model and recall: what is checked here is the name and the parameters
                resolve_filter(name, 1, stand_in, **options)
            except ValueError as exc:
                raise ConfigError(f"robust.filters: {exc}") from None
        _positive("robust.guard_factor", self.guard_factor)
        _positive("robust.guard_max_relative", self.guard_max_relative)
        _positive("robust.guard_window", self.guard_window)
        _in_range("robust.validation_fraction", self.validation_fraction, 0.0, 0.9)


@dataclass
class ByzantineConfig:
    """Attackers, to evaluate filters against: which nodes misbehave and how. The rest are honest,
    and the metrics that matter are theirs."""
    attack: str = ""             # "" = none; a name in algorithms/attacks.ATTACKS or package.module:function
    fraction: float = 0.0        # share of the nodes that attack, placed at random from the seed
    nodes: list[int] = field(default_factory=list)  # or exactly these node ids
    options: dict[str, Any] = field(default_factory=dict)  # the attack's parameters: {epsilon = 0.5}
    suspect_threshold: float = 0.5  # a peer whose mean suspicion reaches this is reported as suspected

    def validate(self) -> None:
        from .algorithms.attacks import AttackContext, resolve_attack
        _in_range("byzantine.fraction", self.fraction, 0.0, 1.0)
        _in_range("byzantine.suspect_threshold", self.suspect_threshold, 0.0, 1.0)
        if any(i < 0 for i in self.nodes) or len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"byzantine.nodes = {self.nodes} must be distinct node ids >= 0")
        if self.nodes and self.fraction:
            raise ConfigError("byzantine.nodes and byzantine.fraction both place attackers: give one of them")
        if (self.nodes or self.fraction) and not self.attack:
            raise ConfigError("byzantine.attack is empty: name the attack the byzantine.nodes or fraction mount")
        if self.attack:
            try:  # with a stand-in network: what is checked here is the name and the parameters
                resolve_attack(self.attack, AttackContext(nodes=3, attackers=1), **self.options)
            except ValueError as exc:
                raise ConfigError(f"byzantine.attack: {exc}") from None
        elif self.options:
            raise ConfigError("byzantine.options given without byzantine.attack")


@dataclass
class SamplingConfig:
    """Who trains each round: everyone (none: decentralized gossip), a MoDeST sample decided by
    every node from its view of the population (modest), or a server's uniform sample as the
    federated-learning reference (fedavg). The churn schedule applies to modest and fedavg."""
    kind: str = "none"
    sample_size: int = 0         # s; 0 = max(2, n // 10)
    aggregators: int = 1         # a: aggregators per round (modest)
    success_fraction: float = 1.0  # sf: an aggregator merges once ceil(sf * s) trained models arrived
    inactivity_rounds: int = 50  # a peer silent this long leaves the candidates
    ping_timeout_s: float = 5.0  # node processes: give up on a candidate that does not answer
    ping_interval_s: float = 1.0  # node processes: ping again this often until then
    silence_s: float = 600.0     # node processes: a node that hears nothing this long ends its run
    crash_at: int = -1           # churn: from this round on, crash_nodes stop answering (-1 = never)
    crash_nodes: list[int] = field(default_factory=list)
    crash_fraction: float = 0.0  # or this share of the nodes, placed from the seed
    leave_at: int = -1           # leave_nodes announce that they leave, then stop
    leave_nodes: list[int] = field(default_factory=list)
    join_at: int = -1            # join_nodes are not members until they announce themselves then
    join_nodes: list[int] = field(default_factory=list)

    def validate(self) -> None:
        from .algorithms.sampling import SAMPLING_KINDS
        _choice("sampling.kind", self.kind, SAMPLING_KINDS)
        _positive("sampling.sample_size", self.sample_size, allow_zero=True)
        _positive("sampling.aggregators", self.aggregators)
        if not 0 < self.success_fraction <= 1:
            raise ConfigError(f"sampling.success_fraction = {self.success_fraction!r} must lie in (0, 1]")
        _positive("sampling.inactivity_rounds", self.inactivity_rounds)
        _positive("sampling.ping_timeout_s", self.ping_timeout_s)
        _positive("sampling.ping_interval_s", self.ping_interval_s)
        _positive("sampling.silence_s", self.silence_s)
        _in_range("sampling.crash_fraction", self.crash_fraction, 0.0, 1.0)
        if self.crash_nodes and self.crash_fraction:
            raise ConfigError("sampling.crash_nodes and sampling.crash_fraction both choose who crashes: give one")
        for event in ("crash", "leave", "join"):
            nodes, at = getattr(self, f"{event}_nodes"), getattr(self, f"{event}_at")
            if any(i < 0 for i in nodes) or len(set(nodes)) != len(nodes):
                raise ConfigError(f"sampling.{event}_nodes = {nodes} must be distinct node ids >= 0")
            if (nodes or (event == "crash" and self.crash_fraction)) and at < 0:
                raise ConfigError(f"sampling.{event}_at must name the round the {event} happens")
        if self.join_at == 0:
            raise ConfigError("sampling.join_at must be >= 1: nodes there from round 0 are members already")


@dataclass
class TimingConfig:
    """How long things take, for the asynchronous schedule: a virtual clock in `simulate`, a real
    slowdown of the listed nodes in node processes (to study or test heterogeneous networks)."""
    compute_s: float = 1.0       # simulate: mean seconds of one local round; also the length of a metrics round
    compute_spread: float = 0.0  # simulate: nodes' compute times vary by a seeded log-normal factor, sigma
    latency_s: float = 0.01      # simulate: mean one-way link latency
    latency_spread: float = 0.0  # simulate: links' latencies vary by a seeded log-normal factor, sigma
    slow: list[int] = field(default_factory=list)  # node ids that compute slow_factor times slower (both)
    slow_factor: float = 4.0

    def validate(self) -> None:
        _positive("timing.compute_s", self.compute_s)
        _positive("timing.compute_spread", self.compute_spread, allow_zero=True)
        _positive("timing.latency_s", self.latency_s, allow_zero=True)
        _positive("timing.latency_spread", self.latency_spread, allow_zero=True)
        if any(i < 0 for i in self.slow):
            raise ConfigError(f"timing.slow = {self.slow} must hold node ids >= 0")
        if self.slow_factor < 1 or not math.isfinite(self.slow_factor):
            raise ConfigError(f"timing.slow_factor = {self.slow_factor!r} must be >= 1")


@dataclass
class DeployConfig:
    """How node processes find each other; used by `gossipfl node` and `gossipfl launch` only."""
    addresses: list[str] = field(default_factory=list)  # "host:port" per node id; [] = free loopback ports
    id: int = -1                 # the node this file is for (written by `gossipfl deploy init`); -1 = give --id
    run_dir: str = ""            # where nodes write results; "" = OUTPUT/NAME
    keys: str = ""               # folder from `gossipfl keys`; "" = no CurveZMQ
    deadline_s: float = 30.0     # the longest wait per gossip step before a silent neighbour is left out
    failure_detection: bool = True  # wait for each neighbour only as long as its usual delay justifies, and
                                 # not at all once it missed suspect_after steps; false = deadline_s for all
    deadline_floor_s: float = 1.0  # the least wait beyond a neighbour's usual delay (at most deadline_s)
    suspect_after: int = 2       # consecutive missed steps before a neighbour is suspected (no longer waited for)
    startup_s: float = 120.0     # wait for the very first step (peers import torch, load data)
    checkpoint_every: int = 5    # rounds between checkpoints, of node processes and of simulate (0 = never)
    max_message_mb: float = 0.0  # refuse larger messages; 0 = model size plus headroom
    rounds_ahead: int = 2        # keep neighbours' messages at most this many rounds ahead of this node's
    buffer_ttl_s: float = 600.0  # drop a message kept for a later step after this long
    max_connections: int = 0     # accepted connections in all; 0 = 4 per neighbour + 64, within the open-file limit
    max_connections_per_address: int = 0  # from one remote address; 0 = 2 per neighbour + 4
    idle_timeout_s: float = 300.0  # close a connection that sent no valid message for this long after connecting
    keepalive_s: int = 10        # TCP keepalive idle time and probe interval; 3 lost probes drop a dead peer
    final_merge: bool = False    # end with the exact average of the live nodes' models, over a spanning tree

    def validate(self) -> None:
        if self.id < -1:
            raise ConfigError(f"deploy.id = {self.id} must be a node id >= 0 (or -1: given by --id)")
        for i, address in enumerate(self.addresses):
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"deploy.addresses[{i}] = {address!r} must be host:port with port 1..65535")
        if len(set(self.addresses)) != len(self.addresses):
            raise ConfigError("deploy.addresses must be distinct")
        _positive("deploy.deadline_s", self.deadline_s)
        _positive("deploy.deadline_floor_s", self.deadline_floor_s)
        if self.suspect_after < 1:
            raise ConfigError(f"deploy.suspect_after = {self.suspect_after} must be >= 1")
        _positive("deploy.startup_s", self.startup_s)
        _positive("deploy.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _positive("deploy.max_message_mb", self.max_message_mb, allow_zero=True)
        _positive("deploy.rounds_ahead", self.rounds_ahead, allow_zero=True)
        _positive("deploy.buffer_ttl_s", self.buffer_ttl_s)
        _positive("deploy.max_connections", self.max_connections, allow_zero=True)
        _positive("deploy.max_connections_per_address", self.max_connections_per_address, allow_zero=True)
        _positive("deploy.idle_timeout_s", self.idle_timeout_s)
        _positive("deploy.keepalive_s", self.keepalive_s)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 30
    output: str = "runs"         # parent folder of run folders
    threads: int = 1             # torch threads for this process
    engine: str = "auto"         # simulate: auto = vectorized when the config allows it, else nodes
    device: str = "auto"         # vectorized engine: auto = cuda when torch sees a GPU, else cpu
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def validate(self) -> "ExperimentConfig":
        if self.rounds < 1:
            raise ConfigError(f"rounds = {self.rounds} must be >= 1")
        if self.threads < 1:
            raise ConfigError(f"threads = {self.threads} must be >= 1")
        _choice("engine", self.engine, ENGINES)
        _choice("device", self.device, DEVICES)
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        if self.deploy.final_merge and self.byzantine.attack:
            raise ConfigError("deploy.final_merge averages every live model exactly, with no defence against "
                              "byzantine.attack: turn one of them off")
        kind = self.sampling.kind
        if kind != "none" and self.gossip.schedule == "async":
            raise ConfigError(f"sampling.kind = {kind!r} decides who trains each round; it does not combine with "
                              "gossip.schedule = 'async'")
        if kind != "none" and (self.byzantine.nodes or self.byzantine.fraction):
            raise ConfigError(f"byzantine attackers do not run with sampling.kind = {kind!r} yet: their filters run "
                              "at the aggregators (robust.filters), attacks only under gossip")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field {prefix}{unknown[0]}; known fields: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, default, kind)
    return cls(**kwargs)


def _coerce(name: str, value: Any, default: Any, kind: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        (item,) = get_args(kind)
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    elif isinstance(default, dict):  # a table of parameters, checked by whatever takes them
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:  # pragma: no cover - every field has one of the types above
        ok = True
    if not ok:
        raise ConfigError(f"{name} = {value!r} has the wrong type; expected {kind}")
    return value


SWEEP_TABLE = "sweep"  # read by `gossipfl sweep` (gossipfl/sweep.py) and removed before validation


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    if isinstance(data, dict) and SWEEP_TABLE in data:
        raise ConfigError(f"[{SWEEP_TABLE}] is read by `gossipfl sweep` only: run this file with "
                          f"`gossipfl sweep`, or remove the table to run one experiment")
    return _build(ExperimentConfig, data, "").validate()


def parse_value(raw: str) -> Any:
    """A command-line value read as TOML (numbers, booleans, lists, quoted strings), else as text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_override(text: str, option: str = "--set") -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", value); the one parser of --set (and of --grid keys)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"{option} {text!r}: expected section.key=value")
    return key, parse_value(raw)


def override_text(key: str, value: Any) -> str:
    """The inverse of parse_override: the value as a TOML literal (tables inline)."""
    return f"{key}={toml_literal(value)}"


def toml_literal(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(value)  # numbers, booleans and strings: JSON's literals are TOML's


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys ("train.rho") in a config dict, in place; validation happens in from_dict."""
    for key, value in overrides.items():
        *sections, name = key.split(".")
        table = data
        for depth, section in enumerate(sections):
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{key}: {'.'.join(sections[:depth + 1])} is not a section")
        table[name] = value
    return data


def flat_fields(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: {"gossip": {"steps": 4}} -> {"gossip.steps": 4}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def derive(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """`cfg` with dotted-key overrides ({"train.rho": 0.0}), validated."""
    return from_dict(apply_overrides(cfg.to_dict(), overrides))


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A config file (or the quickstart when `path` is None) with `--set` texts applied, validated."""
    return from_dict(apply_overrides(config_dict(path), dict(parse_override(text) for text in overrides)))


def config_dict(path: str | Path | None) -> dict[str, Any]:
    """A config file's fields as written, before defaults fill the rest (the quickstart's when
    `path` is None): what tells a field the user set from one left at its default."""
    return read_toml(path) if path else tomllib.loads(resources.files("gossipfl").joinpath("quickstart.toml").read_text())


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file into a dict, with file-named errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    return from_dict(read_toml(path))


def quickstart() -> ExperimentConfig:
    """The built-in quickstart experiment (also shipped as simulations/quickstart.toml)."""
    return from_dict(config_dict(None))
