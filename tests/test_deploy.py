"""`gossipfl deploy init`: the folder it writes, the hosts files it reads, the shards a node reads
instead of the whole data set, and a run from the written files with one real process per node."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gossipfl import config
from gossipfl.config import ConfigError
from gossipfl.deploy.bundle import init_deployment, node_file
from gossipfl.deploy.hosts import HostsError, read_hosts
from gossipfl.experiment import Experiment
from gossipfl.runtimes import single_thread_env
from gossipfl.runtimes.launch import free_loopback_addresses
from gossipfl.runtimes.process import node_dir
from gossipfl.runtimes.sim import Simulation
from gossipfl.transport.keys import load_keys, read_public_keys, read_status_keys
from process_helpers import node_command

NOT_FOR_A_NODE = ("sklearn", "cvxpy", "matplotlib")  # a node process from a shard never needs these


def tiny(tmp_path, **extra):
    """A seconds-long experiment on digits, as a config dict (what `deploy init` reads)."""
    return {"name": "tiny", "seed": 1, "rounds": 3, "output": str(tmp_path / "runs"),
            "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"local_steps": 4, "batch_size": 16, "lr": 0.05, "rho": 0.05},
            "gossip": {"steps": 2}, **extra}


def ring(tmp_path, n):
    path = tmp_path / f"ring{n}.edgelist"
    path.write_text("".join(f"{i} {(i + 1) % n}\n" for i in range(n)))
    return path


def hosts_file(tmp_path, addresses):
    path = tmp_path / "hosts.txt"
    path.write_text("# the test's hosts\n" + "".join(f"{a}\n" for a in addresses))
    return path


def start_nodes(out: Path, n: int, importtime: frozenset = frozenset()) -> list[subprocess.Popen]:
    """Each node as the systemd unit starts it (`gossipfl node --config node-I/node.toml --resume`, from
    the deployment folder): a first start with --resume and no checkpoint must not wait for neighbours."""
    procs = []
    for i in range(n):
        flags = ("-X", "importtime") if i in importtime else ()
        log = (out / f"node-{i}.log").open("wb")
        procs.append(subprocess.Popen(node_command(i, flags), cwd=out, stdout=log, stderr=subprocess.STDOUT,
                                      env=single_thread_env()))
    return procs


def test_deploy_init_output_runs_and_matches_the_in_process_engine(tmp_path, processes):
    n = 4
    raw = tiny(tmp_path, engine="nodes")
    out = init_deployment(json.loads(json.dumps(raw)), ring(tmp_path, n),
                          hosts_file(tmp_path, free_loopback_addresses(n)), tmp_path / "deploy")
    processes += start_nodes(out, n, importtime=frozenset({0}))
    for i, proc in enumerate(processes):
        assert proc.wait(60) == 0, (out / f"node-{i}.log").read_text()[-2000:]
    imported = (out / "node-0.log").read_text()
    assert "import time:" in imported and "gossipfl.experiment" in imported
    for module in NOT_FOR_A_NODE:
        assert f"| {module}" not in imported.replace("  ", " "), f"a node process imported {module}"
    raw["topology"] = {"file": str(ring(tmp_path, n))}
    raw["eval"] = {"batch_size": 256}
    sim = Simulation(config.from_dict(raw), run_dir=tmp_path / "sim", progress=False)
    sim_summary = sim.run()
    run_dir = out / "runs" / "tiny"
    for i, vector in enumerate(sim.vectors()):
        final = np.load(node_dir(run_dir, i) / "final.npy", allow_pickle=False)
        np.testing.assert_allclose(final, vector.numpy(), rtol=0, atol=1e-6)
        summary = json.loads((node_dir(run_dir, i) / "summary.json").read_text())
        assert summary["rounds_completed"] == 3 and summary["rejected"] == {}
    accuracy = [json.loads((node_dir(run_dir, i) / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"]
                for i in range(n)]
    assert np.mean(accuracy) == pytest.approx(sim_summary["final_accuracy_mean"], abs=1e-9)


def test_each_host_folder_holds_its_own_secret_key_and_the_shared_files_once(tmp_path):
    n = 3
    out = init_deployment(tiny(tmp_path), ring(tmp_path, n), hosts_file(tmp_path, ["10.0.0.1", "10.0.0.2:7200",
                                                                                   "pi-3.local"]), tmp_path / "d")
    assert sorted(p.name for p in out.iterdir()) == ["RUNSHEET.md", "W.json", "gossipfl-node@.service",
                                                     "graph.edgelist", "node-0", "node-1", "node-2", "operator"]
    listing = read_public_keys(out / "node-0" / "keys" / "keys.toml")
    assert sorted(listing) == [0, 1, 2]
    assert sorted(p.name for p in (out / "operator").iterdir()) == ["keys.toml", "operator.public", "operator.secret"]
    assert read_status_keys(out / "node-0" / "keys" / "keys.toml") == {(out / "operator" / "operator.public")
                                                                      .read_bytes().strip()}
    for i in range(n):
        keys = out / f"node-{i}" / "keys"
        assert sorted(p.name for p in keys.iterdir()) == ["keys.toml", f"node-{i}.public", f"node-{i}.secret"]
        assert stat.S_IMODE((keys / f"node-{i}.secret").stat().st_mode) == 0o600
        assert load_keys(keys, i).public_key == listing[i]
        cfg = config.load(out / node_file(i))
        assert cfg.deploy.id == i and cfg.deploy.keys == f"node-{i}/keys"
        assert cfg.deploy.addresses == ["10.0.0.1:7100", "10.0.0.2:7200", "pi-3.local:7100"]
        assert (cfg.gossip.weights_file, cfg.topology.file, cfg.data.shard) == ("W.json", "graph.edgelist",
                                                                                f"node-{i}/data")
    unit = (out / "gossipfl-node@.service").read_text()
    for line in ("User=pi", "WorkingDirectory=/home/pi/gossipfl-run", "Restart=on-failure",
                 "ExecStart=/home/pi/gossipfl-venv/bin/gossipfl node --config node-%i/node.toml --resume"):
        assert line in unit
    sheet = (out / "RUNSHEET.md").read_text()
    assert "scp -r W.json graph.edgelist gossipfl-node@.service node-1 pi@10.0.0.2:/home/pi/gossipfl-run/" in sheet
    assert "gossipfl status" in sheet and "pi@pi-3.local:/home/pi/gossipfl-run/runs/tiny/nodes/node-2" in sheet


def test_deploy_init_refuses_a_used_folder_and_a_host_count_that_is_not_the_graph_size(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "precious").write_text("x")
    with pytest.raises(Exception, match="exists and is not empty"):
        init_deployment(tiny(tmp_path), ring(tmp_path, 3), hosts_file(tmp_path, ["a", "b", "c"]), used)
    assert [p.name for p in used.iterdir()] == ["precious"]
    with pytest.raises(HostsError, match="lists 2 hosts but .* has 3 nodes"):
        init_deployment(tiny(tmp_path), ring(tmp_path, 3), hosts_file(tmp_path, ["a", "b"]), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts.txt", "ring3.edgelist", "used"]  # no leftovers


def test_hosts_files_plain_and_toml(tmp_path):
    plain = tmp_path / "hosts.txt"
    plain.write_text("# cluster\n192.168.1.21\n\n192.168.1.22:7101   # second\npi-3.local\n")
    assert read_hosts(plain) == ["192.168.1.21:7100", "192.168.1.22:7101", "pi-3.local:7100"]
    listed = tmp_path / "hosts.toml"
    listed.write_text('port = 7300\nhosts = ["a", "b:7301"]\n')
    assert read_hosts(listed) == ["a:7300", "b:7301"]
    table = tmp_path / "table.toml"
    table.write_text('[hosts]\n1 = "b"\n0 = "a:9"\n')
    assert read_hosts(table) == ["a:9", "b:7100"]
    bad = {"twice.txt": ("a\na:7100\n", r"twice.txt:2: a:7100 repeats .*twice.txt:1"),
           "port.txt": ("a:70000\n", r"port.txt:1: 'a:70000' has port '70000'"),
           "words.txt": ("a b\n", r"words.txt:1: one host a line"),
           "name.txt": ("a/b\n", r"name.txt:1: 'a/b' is not a host name"),
           "empty.txt": ("# nothing\n", "lists no hosts"),
           "gap.toml": ('[hosts]\n0 = "a"\n2 = "c"\n', r"keys must be the node ids 0..1"),
           "key.toml": ('host = ["a"]\n', "unknown key 'host'")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(HostsError, match=message):
            read_hosts(tmp_path / name)


def test_a_node_built_from_its_shard_equals_one_built_from_the_whole_data_set(tmp_path):
    n = 4
    raw = tiny(tmp_path, robust={"filters": ["bristle"]})  # bristle holds out a validation split: it travels too
    out = init_deployment(json.loads(json.dumps(raw)), ring(tmp_path, n), hosts_file(tmp_path, list("abcd")),
                          tmp_path / "d")
    raw["topology"] = {"file": str(ring(tmp_path, n))}
    raw["eval"] = {"batch_size": 256}
    whole = Experiment(config.from_dict(raw))
    cfg = config.load(out / node_file(2))
    shard_cfg = config.derive(cfg, {"data.shard": str(out / "node-2" / "data"), "topology.file": str(out / "graph.edgelist"),
                                    "gossip.weights_file": str(out / "W.json")})
    part = Experiment(shard_cfg)
    assert len(part.dataset.y_train) == len(whole.partition[2]) < len(whole.dataset.y_train)
    i_whole, i_part = torch.from_numpy(whole.parts[2]), torch.from_numpy(part.parts[2])
    assert torch.equal(whole.dataset.train_inputs(i_whole), part.dataset.train_inputs(i_part))
    assert torch.equal(whole.dataset.y_train[i_whole], part.dataset.y_train[i_part])
    assert np.array_equal(whole.local_test_parts[2], part.local_test_parts[2])
    assert len(part.validation_parts[2]) == len(whole.validation_parts[2]) > 0
    vector = whole.build_model(2).vector.view(1, -1)
    a, b = whole.evaluator(), part.evaluator()
    assert torch.equal(a.accuracy(vector), b.accuracy(vector))
    assert torch.equal(a.local_accuracy(vector, [2]), b.local_accuracy(vector, [2]))
    with pytest.raises(ConfigError, match="holds node 2's data, not node 1's"):
        part.make_node(1, transport=None, network=True)
    with pytest.raises(ConfigError, match="was cut for other data settings"):
        _ = Experiment(config.derive(shard_cfg, {"data.alpha": 0.9})).dataset


def test_cap_threads_holds_torch_and_blas_to_the_configured_count():
    """Without a cap, torch and numpy's OpenBLAS use every core (2 here; OpenBLAS never more)."""
    code = ("from gossipfl.runtimes import cap_threads; cap_threads(1); import torch, numpy; "
            "from threadpoolctl import threadpool_info; "
            "print(torch.get_num_threads(), torch.get_num_interop_threads(), "
            "sorted({p['num_threads'] for p in threadpool_info()}))")
    env = {k: v for k, v in single_thread_env().items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(maxsplit=2) == ["1", "1", "[1]\n"]


def test_the_8_pi_example_is_a_valid_deployment():
    """topologies/pi8.toml, pi8-hosts.toml and ring8.edgelist, as docs/deploy.md uses them."""
    from gossipfl.graph.topology import read_graph
    topologies = Path(__file__).resolve().parent.parent / "topologies"
    cfg = config.from_dict(config.apply_overrides(config.read_toml(topologies / "pi8.toml"),
                                                  {"topology.file": str(topologies / "ring8.edgelist")}))
    hosts = read_hosts(topologies / "pi8-hosts.toml")
    assert len(hosts) == read_graph(cfg.topology.file).number_of_nodes() == 8 and len(set(hosts)) == 8
    assert cfg.threads == 4 and cfg.deploy.final_merge and cfg.eval.batch_size == 256
