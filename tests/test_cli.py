import json
import subprocess
import sys

from gossipfl.cli import main

SMALL = ["--set", "data.dataset='digits'", "--set", "topology.nodes=4", "--set", "rounds=2",
         "--set", "model.hidden=[16]", "--quiet"]


def test_simulate_writes_a_run_folder_with_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["nodes"] == 4
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "consensus_vs_round.png",
                 "consensus_vs_bytes.png"):
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
        "node-2.public", "node-2.secret"]
    assert (tmp_path / "k" / "node-1.secret").stat().st_mode & 0o777 == 0o600
