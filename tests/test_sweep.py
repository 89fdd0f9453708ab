"""Sweeps: real `gossipfl simulate` child processes on digits, the table against the runs' own
summaries, resuming without re-running, failures reported with their logs."""

import json
import statistics
from pathlib import Path

import pytest

from gossipfl import config, sweep
from gossipfl.cli import main
from gossipfl.config import ConfigError

TINY = {"data.dataset": "digits", "topology.nodes": 4, "rounds": 2, "model.hidden": [16], "train.local_steps": 2}


def tiny_base(tmp_path, **changes):
    return config.derive(config.quickstart(), {**TINY, "output": str(tmp_path), **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2 x 2 sweep (gossip.steps in 1, 4; seeds 0, 1), two runs at a time."""
    out = tmp_path_factory.mktemp("sweep") / "steps"
    spec = sweep.make_spec(tiny_base(out.parent), sweep.grid_variants({"gossip.steps": [1, 4]}), seeds=2, out=out,
                           jobs=2)
    return spec, sweep.run_sweep(spec, progress=False)


def test_a_two_by_two_sweep_runs_four_runs_and_tabulates_their_summaries(finished):
    spec, result = finished
    assert not result.failed and len(result.runs) == 4
    assert sorted(p.name for p in (spec.out / "runs").iterdir()) == [
        "gossip.steps=1,seed=0", "gossip.steps=1,seed=1", "gossip.steps=4,seed=0", "gossip.steps=4,seed=1"]
    table = json.loads((spec.out / "results.json").read_text())
    for combo in table["combinations"]:
        summaries = [json.loads((spec.out / "runs" / sweep.run_name(combo["settings"], seed) / "summary.json")
                                .read_text()) for seed in (0, 1)]
        accuracy = [s["final_accuracy_mean"] for s in summaries]
        assert combo["complete"] == 2
        assert combo["metrics"]["final_accuracy_mean"]["mean"] == pytest.approx(statistics.fmean(accuracy))
        assert combo["metrics"]["final_accuracy_mean"]["std"] == pytest.approx(statistics.stdev(accuracy))
        assert combo["metrics"]["final_accuracy_mean"]["min"] == min(accuracy)
        configs = [config.load(spec.out / "runs" / sweep.run_name(combo["settings"], seed) / "config.toml")
                   for seed in (0, 1)]
        assert [c.seed for c in configs] == [0, 1]
        assert {c.gossip.steps for c in configs} == {combo["settings"]["gossip.steps"]}
    csv_lines = (spec.out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("gossip.steps,seeds,final_accuracy_mean_mean") and len(csv_lines) == 3
    assert "| gossip.steps | seeds | accuracy (node mean)" in (spec.out / "results.md").read_text()


def test_running_the_sweep_again_skips_the_finished_runs(finished, capsys):
    spec, _ = finished
    summaries = sorted((spec.out / "runs").glob("*/summary.json"))
    before = [p.stat().st_mtime_ns for p in summaries]
    args = ["sweep", *(a for k, v in TINY.items() for a in ("--set", config.override_text(k, v))),
            "--set", f"output='{spec.out.parent}'", "--grid", "gossip.steps=1,4", "--seeds", "2",
            "--out", str(spec.out), "--json"]
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["runs"] == 4 and document["reused"] == 4 and document["failed"] == 0
    assert [p.stat().st_mtime_ns for p in summaries] == before


def test_compare_draws_a_sweep_as_one_band_per_combination(finished, tmp_path):
    from gossipfl.plots import load_curves
    spec, _ = finished
    curves = load_curves([spec.out])
    assert [(c.label, len(c.runs)) for c in curves] == [("gossip.steps=1", 2), ("gossip.steps=4", 2)]
    assert main(["compare", str(spec.out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare_vs_round.png").stat().st_size > 10_000


def test_a_failed_run_is_reported_with_its_log_and_fails_the_sweep(tmp_path, capsys):
    base = tiny_base(tmp_path, **{"data.dataset": "auto"})
    args = ["sweep", *(a for k, v in {**TINY, "data.dataset": "auto"}.items()
                       for a in ("--set", config.override_text(k, v))),
            "--grid", f"data.path='{tmp_path / 'no-such-folder'}'", "--out", str(tmp_path / "sw"), "--quiet"]
    assert base.data.dataset == "auto"
    assert main(args) == 1
    printed = capsys.readouterr().out
    log = tmp_path / "sw" / "logs" / f"{sweep.run_name({'data.path': str(tmp_path / 'no-such-folder')}, 0)}.log"
    assert "failed" in printed and str(log) in printed
    assert "data.path" in log.read_text() and "Traceback" not in log.read_text()
    result = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert result["failed"] == 1 and result["combinations"][0]["runs"][0]["status"] == "failed"


def test_the_sweep_table_of_a_config_and_the_command_line_combine(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('rounds = 2\n[data]\ndataset = "digits"\n[sweep]\nseeds = 3\njobs = 2\n'
                    '[sweep.grid]\n"gossip.steps" = [1, 4]\ntrain.rho = [0.0, 0.05]\n')
    spec = sweep.from_command_line(str(path), ["seed=10"], grid=["train.rho=0.1"], out=str(tmp_path / "sw"))
    assert spec.variants == [{"gossip.steps": 1, "train.rho": 0.1}, {"gossip.steps": 4, "train.rho": 0.1}]
    assert spec.seeds == [10, 11, 12] and spec.jobs == 2 and spec.base.rounds == 2
    assert sweep.from_command_line(str(path), []).out == Path("runs") / "experiment-sweep"  # the same on resume
    with pytest.raises(ConfigError, match=r"\[sweep\] is read by `gossipfl sweep` only"):
        config.load(path)
    path.write_text('[sweep]\nseed = 3\n')
    with pytest.raises(ConfigError, match="unknown field sweep.seed; known fields: seeds, grid, jobs"):
        sweep.from_command_line(str(path), [])
    with pytest.raises(ConfigError, match="both set .* and swept"):
        sweep.from_command_line(None, ["gossip.steps=2"], grid=["gossip.steps=1,4"])
    with pytest.raises(ConfigError, match="seed is swept by --seeds"):
        sweep.from_command_line(None, [], grid=["seed=1,2"])


def test_an_existing_sweep_folder_of_another_config_is_refused(finished):
    spec, _ = finished
    other = sweep.make_spec(config.derive(spec.base, {"rounds": 3}), spec.variants, seeds=2, out=spec.out)
    with pytest.raises(ConfigError, match="a different base config .*rounds"):
        sweep.run_sweep(other, progress=False)


@pytest.mark.parametrize("text, key, values", [
    ("gossip.steps=1,4", "gossip.steps", [1, 4]),
    ("train.rho=0,0.05", "train.rho", [0, 0.05]),
    ("gossip.weights=metropolis,fmmc", "gossip.weights", ["metropolis", "fmmc"]),
    ("model.hidden=[16],[32,32]", "model.hidden", [[16], [32, 32]]),
    ("data.dataset='digits'", "data.dataset", ["digits"]),
])
def test_grid_values_are_read_like_set_values(text, key, values):
    assert sweep.parse_grid(text) == (key, values)


def test_grid_errors_name_the_option():
    for text in ("gossip.steps", "=1,2", "gossip.steps="):
        with pytest.raises(ConfigError, match="--grid"):
            sweep.parse_grid(text)


def test_run_names_are_stable_readable_and_distinct():
    assert sweep.run_name({"gossip.steps": 4, "train.rho": 0.05}, 2) == "gossip.steps=4,train.rho=0.05,seed=2"
    a = sweep.run_name({"gossip.weights_file": "/a b/W.json"}, 0)
    b = sweep.run_name({"gossip.weights_file": "/a_b/W.json"}, 0)
    assert a != b and "/" not in a and " " not in a
    assert sweep.run_name({"model.hidden": [16, 32]}, 0) == sweep.run_name({"model.hidden": [16, 32]}, 0)


def test_override_text_round_trips_through_the_set_parser():
    for key, value in [("train.rho", 0.05), ("model.hidden", [16, 32]), ("gossip.weights", "fmmc"),
                       ("data.path", '/x/"quoted"'), ("rounds", 3), ("train.lr", 1e-5)]:
        assert config.parse_override(config.override_text(key, value)) == (key, value)
