import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossipfl.cli import main

ROOT = Path(__file__).resolve().parent.parent

SMALL = ["--set", "data.dataset='digits'", "--set", "topology.nodes=4", "--set", "rounds=2",
         "--set", "model.hidden=[16]", "--quiet"]


def test_simulate_writes_a_run_folder_with_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["nodes"] == 4
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "consensus_vs_round.png",
                 "consensus_vs_bytes.png", "loss_vs_round.png", "loss_vs_bytes.png"):
        assert (out / name).stat().st_size > 1000
    assert "run folder" in capsys.readouterr().out
    (out / "accuracy_vs_round.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "accuracy_vs_round.png").exists()


def test_bad_input_exits_2_with_the_field_named(tmp_path, capsys):
    assert main(["simulate", "--set", "gossip.weights=fmmx", "--quiet"]) == 2
    assert "gossip.weights = 'fmmx' is not allowed" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["simulate", "--set", "novalue"]) == 2
    assert "section.key=value" in capsys.readouterr().err


def test_console_script_runs_a_config_file(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\nrounds = 1\n[data]\ndataset = "synthetic"\n[topology]\nkind = "complete"\n'
                   'nodes = 3\n[model]\nname = "logistic"\n')
    result = subprocess.run([sys.executable, "-m", "gossipfl.cli", "simulate", str(cfg), "--out",
                             str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"] == "synthetic"


def test_topology_compares_schemes_and_stores_the_chosen_matrix(tmp_path, capsys):
    from gossipfl.graph import topology, weights
    graph_file = topology.write_graph(topology.build("torus", 9), tmp_path / "torus.json")
    out, png = tmp_path / "W.json", tmp_path / "g.png"
    assert main(["topology", str(graph_file), "--weights", "fmmc", "--out", str(out), "--rates", "optimal",
                 "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    for scheme in ("metropolis", "max_degree", "fmmc", "fdla"):
        assert scheme in printed
    assert "optimal rates: lambda_2" in printed
    stored = weights.from_json(json.loads(out.read_text()), topology.read_graph(graph_file))
    assert stored.method == "fmmc" and stored.slem < weights.solve_weights(topology.read_graph(graph_file),
                                                                       "metropolis").slem
    assert png.stat().st_size > 1000


def test_simulate_uses_a_stored_weights_file(tmp_path):
    from gossipfl.graph import topology, weights
    graph = topology.build("ring", 4)
    path = tmp_path / "W.json"
    path.write_text(json.dumps(weights.to_json(weights.solve_weights(graph, "fdla"))))
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), *SMALL, "--set", f"gossip.weights_file='{path}'"]) == 0
    assert json.loads((out / "W.json").read_text())["method"] == "fdla"


def test_keys_command_writes_a_pair_per_node(tmp_path, capsys):
    assert main(["keys", "--nodes", "3", "--out", str(tmp_path / "k")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "keys.toml", "node-0.public", "node-0.secret", "node-1.public", "node-1.secret",
        "node-2.public", "node-2.secret", "operator.public", "operator.secret"]
    assert (tmp_path / "k" / "node-1.secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "operator.secret").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ helpers: runs without torch, CLI in a subprocess

def fake_run(path, rows=3, accuracy=0.5, **fields):
    """A run folder written by RunWriter with made-up metrics: plotting and listing need no training."""
    from gossipfl import config
    from gossipfl.rundir import RunWriter
    cfg = config.from_dict({"data": {"dataset": "digits"}, "topology": {"nodes": 4}, **fields})
    writer = RunWriter(path, cfg)
    for r in range(rows):
        writer.log({"round": r, "train_loss": 2.0 / (r + 1), "accuracy_mean": accuracy * (r + 1) / rows,
                    "accuracy_min": 0.9 * accuracy * (r + 1) / rows, "accuracy_max": min(1.0, 1.1 * accuracy),
                    "accuracy_local_mean": 0.6, "consensus_distance": 10.0 ** -r, "bytes_sent": 1_500_000 * (r + 1),
                    "wall_seconds": 0.5 * (r + 1)})
    writer.close()
    return writer


def cli_env():
    return {k: v for k, v in os.environ.items() if k != "GOSSIPFL_DATA"}


def run_cli_all(cases, timeout=180):
    """Run several `gossipfl ...` command lines at once in subprocesses; their CompletedProcess-like results."""
    procs = [subprocess.Popen([sys.executable, "-m", "gossipfl", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env()) for argv in cases]
    try:
        return [(p, *p.communicate(timeout=timeout)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def bad_inputs(tmp_path):
    """Files the bad-input cases point at, and the cases: argv -> what the one-line message must say."""
    from gossipfl.data import DEBIAN_FASHION_MNIST
    from gossipfl.graph import topology, weights
    ring5 = tmp_path / "W5.json"
    ring5.write_text(json.dumps(weights.to_json(weights.solve_weights(topology.build("ring", 5), "metropolis"))))
    (tmp_path / "notjson.json").write_text("{not json")
    deploy = 'rounds = 1\n[data]\ndataset = "digits"\n[topology]\nnodes = 4\n[model]\nhidden = [8]\n[deploy]\n'
    (tmp_path / "deploy.toml").write_text(deploy + 'addresses = ["127.0.0.1:7101", "127.0.0.1:7102", '
                                          '"127.0.0.1:7103", "127.0.0.1:7104"]\n')
    (tmp_path / "foreign.toml").write_text(deploy + 'startup_s = 1.0\naddresses = ["192.0.2.1:7101", '
                                           '"127.0.0.1:7102", "127.0.0.1:7103", "127.0.0.1:7104"]\n')
    (tmp_path / "fedavg.toml").write_text((tmp_path / "deploy.toml").read_text().replace(
        "[deploy]", '[sampling]\nkind = "fedavg"\n[deploy]'))
    (tmp_path / "churn.toml").write_text((tmp_path / "deploy.toml").read_text().replace(
        "[deploy]", '[sampling]\nkind = "modest"\ncrash_at = 2\ncrash_nodes = [1]\n[deploy]'))
    (tmp_path / "sweep.toml").write_text('rounds = 1\n[sweep]\nseeds = 2\n')
    (tmp_path / "node1.toml").write_text(deploy + 'id = 1\naddresses = ["127.0.0.1:7101", "127.0.0.1:7102", '
                                         '"127.0.0.1:7103", "127.0.0.1:7104"]\n')
    (tmp_path / "badid.toml").write_text(deploy + 'id = -3\n')
    (tmp_path / "hosts3.txt").write_text("a\nb\nc\n")
    (tmp_path / "hosts8.txt").write_text("".join(f"h{i}\n" for i in range(8)))
    (tmp_path / "hosts-bad.txt").write_text("a\nb c\n")
    ring8 = str(ROOT / "topologies" / "ring8.edgelist")
    regular300 = topology.write_graph(topology.build("random_regular", 300, degree=4), tmp_path / "rr300.edgelist")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "node-0.secret").write_text("precious\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    fashion = "holds Fashion-MNIST" if Path(DEBIAN_FASHION_MNIST).is_dir() else "is not a directory"
    loads_torch = {  # run in this process: torch is loaded already
        ("simulate", *SMALL, "--set", f"gossip.weights_file='{tmp_path / 'notjson.json'}'"): "is not JSON",
        ("simulate", *SMALL, "--set", "data.dataset='auto'", "--set", "data.path='/nonexistent/idx'"):
            "data.path = '/nonexistent/idx' is not a directory",
        ("simulate", *SMALL, "--set", "data.dataset='mnist'"): "needs data.path (or GOSSIPFL_DATA)",
        ("simulate", *SMALL, "--set", "data.dataset='mnist'", "--set", f"data.path='{DEBIAN_FASHION_MNIST}'"):
            f"data.path = '{DEBIAN_FASHION_MNIST}' {fashion}",
        ("simulate", *SMALL, "--out", str(tmp_path / "used")): "--out",
    }
    own_process = {  # each in a subprocess: the process boundary and its stderr as a user sees them
        ("simulate", *SMALL, "--set", f"gossip.weights_file='{ring5}'"): "gossip.weights_file",
        ("simulate", *SMALL, "--set", "topology.nodes=1"): "topology.nodes = 1 must be >= 2",
        ("simulate", str(tmp_path / "sweep.toml")): "[sweep]",
        ("node", "--config", str(tmp_path / "deploy.toml"), "--id", "7"): "--id 7 is out of range",
        ("node", "--config", str(tmp_path / "foreign.toml"), "--id", "0"): "deploy.addresses[0] = '192.0.2.1:7101'",
        ("node", "--config", str(tmp_path / "deploy.toml")): "sets no deploy.id: give --id N",
        ("node", "--config", str(tmp_path / "node1.toml"), "--id", "2"): "--id 2 disagrees with deploy.id = 1",
        ("node", "--config", str(tmp_path / "badid.toml")): "deploy.id = -3 must be a node id",
        ("deploy", "init", "--graph", ring8, "--hosts", str(tmp_path / "hosts3.txt"), "--out",
         str(tmp_path / "d1")): "lists 3 hosts but",
        ("deploy", "init", "--graph", ring8, "--hosts", str(tmp_path / "hosts8.txt"), "--out",
         str(tmp_path / "used")): "--out",
        ("deploy", "init", "--graph", ring8, "--hosts", str(tmp_path / "hosts-bad.txt"), "--out",
         str(tmp_path / "d2")): "hosts-bad.txt:2: one host a line",
        ("deploy", "init", "--graph", ring8, "--hosts", str(tmp_path / "hosts8.txt")): "--out",
        ("node", "--config", str(tmp_path / "fedavg.toml"), "--id", "0"): "sampling.kind = 'fedavg' needs a server",
        ("node", "--config", str(tmp_path / "churn.toml"), "--id", "0"): "sampling.crash_at",
        ("launch", *SMALL, "--set", "sampling.kind='fedavg'", "--out", str(tmp_path / "fedavg-launch")):
            "sampling.kind = 'fedavg' needs a server",
        ("topology", ring8, "--weights", "fmmx"): "--weights",
        ("topology", ring8, "--compare", "metropolis,fmmx"): "--compare",
        ("topology", ring8, "--plot", str(tmp_path / "g.xyz")): "--plot",
        ("topology", str(regular300), "--compare", "metropolis", "--weights", "fdla", "--out",
         str(tmp_path / "W.json")): "fmmc_first_order",
        ("plot", str(tmp_path / "empty")): "is not a run folder",
        ("plot", str(tmp_path / "missing")): "no such folder",
        ("compare", str(tmp_path / "empty")): "is not a run folder",
        ("runs", str(tmp_path / "missing")): "no such folder",
        ("keys", "--nodes", "-3", "--out", str(tmp_path / "k")): "--nodes",
        ("keys", "--nodes", "2", "--out", str(tmp_path / "keys")): "--force",
        ("sweep", *SMALL, "--grid", "gossip.steps=0,1", "--out", str(tmp_path / "sw")): "gossip.steps = 0",
    }
    return loads_torch, own_process


def test_bad_input_in_a_subprocess_exits_2_with_one_line_naming_it_and_no_traceback(bad_inputs, tmp_path):
    cases = bad_inputs[1]
    for (proc, out, err), (argv, named) in zip(run_cli_all(list(cases)), cases.items()):
        assert proc.returncode == 2, (argv, out, err)
        assert "Traceback" not in err and named in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert (tmp_path / "keys" / "node-0.secret").read_text() == "precious\n"
    assert not (tmp_path / "sw").exists() and not (tmp_path / "W.json").exists()
    assert not (tmp_path / "fedavg-launch").exists()


def test_bad_data_and_weights_exit_2_with_one_line_naming_the_field(bad_inputs, capsys, monkeypatch):
    monkeypatch.delenv("GOSSIPFL_DATA", raising=False)
    for argv, named in bad_inputs[0].items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_help_and_the_torch_free_commands_never_import_torch(tmp_path):
    fake_run(tmp_path / "runs" / "a")
    fake_run(tmp_path / "runs" / "b", gossip={"steps": 1})
    script = f"""
import contextlib, io, sys
import pytest

from gossipfl.cli import main
for argv in (["--help"], ["keys", "--help"], ["plot", "--help"], ["runs", "--help"], ["compare", "--help"],
             ["sweep", "--help"], ["topology", "--help"]):
    try:
        main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
root = {str(tmp_path)!r}
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["keys", "--nodes", "2", "--out", root + "/keys"], ["runs", root + "/runs"],
                 ["plot", root + "/runs/a"], ["compare", root + "/runs/a", root + "/runs/b", "--out", root + "/cmp"]):
        assert main(argv) == 0, argv
heavy = sorted(m for m in ("torch", "cvxpy", "sklearn") if m in sys.modules)
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY []")
    assert (tmp_path / "cmp" / "compare_vs_time.png").stat().st_size > 1000


def test_version_and_python_dash_m():
    from gossipfl import __version__
    result = subprocess.run([sys.executable, "-m", "gossipfl", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"gossipfl {__version__}"


def test_json_output_is_one_document(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "run"), *SMALL, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["rounds"] == 2
    assert main(["topology", str(ROOT / "topologies" / "ring8.edgelist"), "--compare", "metropolis,max_degree",
                 "--json"]) == 0
    topo = json.loads(capsys.readouterr().out)
    assert [s["weights"] for s in topo["schemes"]] == ["metropolis", "max_degree"] and topo["nodes"] == 8
    assert main(["runs", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in listing["runs"]] == [("run", "complete")]
    assert listing["runs"][0]["versions"]["torch"]


def test_topology_reports_an_sdp_too_large_and_goes_on_with_the_rest(tmp_path, capsys):
    from gossipfl.graph import topology
    big = topology.write_graph(topology.build("random_regular", 300, degree=4), tmp_path / "rr300.edgelist")
    assert main(["topology", str(big), "--compare", "metropolis,fmmc"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2].startswith("metropolis") and "closed-form" in printed[2]
    assert printed[3].startswith("fmmc") and "refused: fmmc on 300 nodes is too large for an SDP" in printed[3]
    assert "min with SCS" in printed[3] and "fmmc_first_order" in printed[3]


def test_runs_lists_complete_interrupted_and_failed_runs(tmp_path, capsys):
    fake_run(tmp_path / "done").write_summary()
    fake_run(tmp_path / "stopped").interrupt()
    fake_run(tmp_path / "broken", rows=1).fail("ValueError: boom")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gossipfl", "simulate", "--out", str(out), *SMALL,
                             "--set", "rounds=100000"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, "simulate did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert main(["runs", str(tmp_path), "--json"]) == 0
    status = {r["name"]: r["status"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert status == {"broken": "failed", "done": "complete", "killed": "interrupted", "stopped": "interrupted"}
    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| killed " in table and "digits, ring x4, mlp, Q=4" in table


def test_compare_overlays_two_runs_with_a_legend_of_what_differs(tmp_path):
    from gossipfl.plots import load_curves
    fake_run(tmp_path / "a", accuracy=0.6, train={"rho": 0.0})
    fake_run(tmp_path / "b", accuracy=0.7, gossip={"steps": 1})
    curves = load_curves([tmp_path / "a", tmp_path / "b"])
    assert [c.label for c in curves] == ["gossip.steps=4, train.rho=0.0", "gossip.steps=1, train.rho=0.05"]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp"),
                 "--format", "svg"]) == 0
    for axis in ("round", "bytes", "time"):
        assert (tmp_path / "cmp" / f"compare_vs_{axis}.svg").stat().st_size > 5000


def test_keys_are_replaced_only_with_force(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["keys", "--nodes", "2", "--out", str(out)]) == 0
    first = (out / "node-0.secret").read_bytes()
    assert main(["keys", "--nodes", "2", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and (out / "node-0.secret").read_bytes() == first
    assert main(["keys", "--nodes", "2", "--out", str(out), "--force"]) == 0
    assert (out / "node-0.secret").read_bytes() != first
