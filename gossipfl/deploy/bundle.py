"""`gossipfl deploy init`: from a graph and a list of hosts to the folder a deployment ships.

    OUT/
      W.json                  mixing weights, solved once; every node file points at it
      graph.EXT               the graph, as given
      node-I/node.toml        node I's deployment file (deploy.id = I, every address, its folders)
      node-I/keys/            node I's CurveZMQ key pair and the public listing (no other secret)
      node-I/data/            node I's shard: its training samples, its test slice, the test set
      gossipfl-node@.service  systemd unit template (instance = node id)
      RUNSHEET.md             copy, start, watch, collect: the commands for these hosts

Paths inside the node files are relative to the deployment folder, which each host holds as
W.json, graph.EXT and its own node-I/; nodes run from there. The folder is built beside OUT and
renamed into place at the end, so a failure leaves nothing half-written, and an existing OUT that
is not empty is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import config as config_mod
from ..data import write_shard
from ..errors import UserError
from ..experiment import Experiment, write_weights
from ..transport.keys import write_host_keys
from .hosts import HostsError, Target, read_hosts

SMALL_HOST_EVAL_BATCH = 256  # test samples per evaluation batch on a small host (a CNN's activations at 2000: ~300 MB)
UNIT = "gossipfl-node@.service"
RUNSHEET = "RUNSHEET.md"
OPERATOR_FOLDER = "operator"  # the operator's key pair, for gossipfl status: it stays on the workstation


def node_folder(node: int) -> str:
    return f"node-{node}"


def node_file(node: int) -> str:
    return f"{node_folder(node)}/node.toml"


def init_deployment(raw: dict[str, Any], graph: str | Path, hosts: str | Path, out: str | Path, *, keys: bool = True,
                    target: Target = Target(), say: Callable[[str], None] = lambda text: None) -> Path:
    """Write the deployment folder `out` for the experiment `raw` (a config dict, overrides
    applied) over the graph file `graph`, one node per line of `hosts`. Returns `out`."""
    out, graph = Path(out), Path(graph)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; give a new folder (a deployment's keys "
                        f"and files are never overwritten)")
    addresses = read_hosts(hosts)
    raw = config_mod.apply_overrides(raw, {"topology.file": str(graph)})
    if "eval.batch_size" not in config_mod.flat_fields(raw):
        raw = config_mod.apply_overrides(raw, {"eval.batch_size": SMALL_HOST_EVAL_BATCH})
        say(f"eval.batch_size = {SMALL_HOST_EVAL_BATCH} for small hosts (--set eval.batch_size=N to choose)")
    experiment = Experiment(config_mod.from_dict(raw))
    if len(addresses) != experiment.n:
        raise HostsError(f"{hosts} lists {len(addresses)} hosts but {graph} has {experiment.n} nodes; "
                         f"list one host per node, in node-id order")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_bundle(experiment, graph, addresses, staging, keys, target, say)
        os.replace(staging, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_bundle(experiment: Experiment, graph: Path, addresses: list[str], folder: Path, keys: bool,
                 target: Target, say: Callable[[str], None]) -> None:
    n, cfg = experiment.n, experiment.resolved_config()
    cfg = dataclasses.replace(cfg, deploy=dataclasses.replace(cfg.deploy, run_dir=cfg.deploy.run_dir or f"runs/{cfg.name}"))
    folder.mkdir(parents=True)
    weights = write_weights(folder, experiment).name
    graph_name = f"graph{graph.suffix}"
    shutil.copyfile(graph, folder / graph_name)
    say(f"{experiment.weights.method} weights of {graph} solved once: {weights} (SLEM {experiment.weights.slem:.4f})")
    if keys:
        write_host_keys({i: folder / node_folder(i) / "keys" for i in range(n)}, folder / OPERATOR_FOLDER)
    source = experiment.data_source()
    for i in range(n):
        share = experiment.partition[i]
        write_shard(folder / node_folder(i) / "data", experiment.dataset, i, share,
                    np.searchsorted(share, experiment.validation_parts[i]), experiment.local_test_parts[i], source)
        node_cfg = dataclasses.replace(
            cfg, topology=dataclasses.replace(cfg.topology, file=graph_name),
            gossip=dataclasses.replace(cfg.gossip, weights_file=weights),
            data=dataclasses.replace(cfg.data, path="", shard=f"{node_folder(i)}/data"),
            deploy=dataclasses.replace(cfg.deploy, id=i, addresses=addresses,
                                       keys=f"{node_folder(i)}/keys" if keys else ""))
        (folder / node_file(i)).write_text(
            f"# gossipfl deployment file of node {i} ({addresses[i]}), written by `gossipfl deploy init`.\n"
            f"# Run from the deployment folder: gossipfl node --config {node_file(i)}\n" + node_cfg.to_toml())
    say(f"{n} node folders with their data shards{' and CurveZMQ keys' if keys else ' (no keys: --no-keys)'}")
    (folder / UNIT).write_text(unit_text(target))
    (folder / RUNSHEET).write_text(runsheet_text(cfg, addresses, [weights, graph_name, UNIT], keys, target))


def unit_text(target: Target) -> str:
    """A systemd template unit: `gossipfl-node@3` runs node 3, resuming after a crash."""
    return f"""# systemd unit template written by `gossipfl deploy init`; instance = node id.
#   sudo cp {UNIT} /etc/systemd/system/ && sudo systemctl daemon-reload
#   sudo systemctl start gossipfl-node@3        # node 3 on its host; journalctl -u gossipfl-node@3 -f
[Unit]
Description=gossipfl node %i
After=network-online.target
Wants=network-online.target

[Service]
User={target.user}
WorkingDirectory={target.directory}
# --resume continues from the node's last checkpoint after a crash (a first start has none: it starts fresh)
ExecStart={target.venv}/bin/gossipfl node --config node-%i/node.toml --resume
Restart=on-failure
RestartSec=10
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=multi-user.target
"""


def runsheet_text(cfg: config_mod.ExperimentConfig, addresses: list[str], shared: list[str], keys: bool,
                  target: Target) -> str:
    hosts = [a.rpartition(":")[0] for a in addresses]
    rows = "\n".join(f"| {i} | `{a}` | `{node_folder(i)}/` |" for i, a in enumerate(addresses))
    at = lambda i: f"{target.user}@{hosts[i]}"  # noqa: E731
    copy = "\n".join(f"ssh {at(i)} mkdir -p {target.directory} && scp -r {' '.join(shared)} {node_folder(i)} "
                     f"{at(i)}:{target.directory}/" for i in range(len(addresses)))
    collect = "\n".join(f"scp -r {at(i)}:{target.directory}/{cfg.deploy.run_dir}/nodes/"
                        f"{node_folder(i)} collected/nodes/" for i in range(len(addresses)))
    ports = sorted({a.rpartition(":")[2] for a in addresses})
    return f"""# Run sheet: {cfg.name}, {len(addresses)} nodes, {cfg.rounds} rounds

Written by `gossipfl deploy init`. Run every command from this folder; docs/deploy.md explains each step.

| node | address | its folder |
|---|---|---|
{rows}

## 1. Install (each host, once)

Python 3.11 and gossipfl in `{target.venv}` (docs/deploy.md, "Install"; on a 64-bit Raspberry Pi the
install picks torch's CPU build by itself).

## 2. Copy

Each host gets {', '.join(shared)} and its own node folder{' (which holds its secret key and no other)' if keys else ''}:

```bash
{copy}
```

Open TCP port{'s' if len(ports) > 1 else ''} {', '.join(ports)} on each host to the other hosts only.

## 3. Start

In any order; a node waits up to deploy.startup_s = {cfg.deploy.startup_s:g} s for its neighbours. On host I:

```bash
cd {target.directory} && {target.venv}/bin/gossipfl node --config node-I/node.toml
```

or as a service that restarts after a crash (and resumes from its checkpoint):

```bash
sudo cp {UNIT} /etc/systemd/system/ && sudo systemctl daemon-reload && sudo systemctl start gossipfl-node@I
```

## 4. Watch

From this folder, `gossipfl status node-0/node.toml{' --keys ' + OPERATOR_FOLDER if keys else ''}` asks every node
for its round, accuracy, neighbours' liveness and dropped messages (`--json` for scripts; the
operator/ key pair stays here, no host needs it); on a host, `journalctl -u gossipfl-node@I -f` (service) or the node's
`{cfg.deploy.run_dir}/nodes/node-I/metrics.jsonl` show each round as it ends.

## 5. Collect

When every node has written its `summary.json`:

```bash
mkdir -p collected/nodes
{collect}
```

Each `collected/nodes/node-I/` holds that node's metrics.jsonl, summary.json (final accuracy{', final merge' if cfg.deploy.final_merge else ''}) and final.npy.
"""
