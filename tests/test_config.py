from pathlib import Path

import pytest

from gossipfl import config
from gossipfl.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("data, message", [
    ({"data": {"dataset": "cifar"}}, "data.dataset = 'cifar' is not allowed; choose one of: auto, fashion-mnist"),
    ({"train": {"lr": -0.1}}, "train.lr = -0.1 must be > 0"),
    ({"train": {"lr": "fast"}}, "train.lr = 'fast' has the wrong type"),
    ({"train": {"momentum": 1.5}}, "train.momentum = 1.5 must lie in"),
    ({"gossip": {"steps": 0}}, "gossip.steps = 0 must be >= 1"),
    ({"gossip": {"merge": "median"}}, "gossip.merge = 'median' is not allowed; choose one of: mean, variance_corrected"),
    ({"topology": {"kind": "hypercube"}}, "topology.kind = 'hypercube' is not allowed"),
    ({"topology": {"nodes": True}}, "topology.nodes = True has the wrong type"),
    ({"model": {"hidden": [64, -1]}}, "model.hidden"),
    ({"rounds": 0}, "rounds = 0 must be >= 1"),
    ({"gossip": {"stepz": 2}}, "unknown field gossip.stepz"),
    ({"extra": {"a": 1}}, "unknown field extra"),
    ({"train": 3}, "train must be a table"),
    ({"topology": {"nodes": 1}}, "topology.nodes = 1 must be >= 2: gossip needs two or more nodes"),
    ({"sweep": {"seeds": 2}}, "[sweep] is read by `gossipfl sweep` only"),
])
def test_bad_config_fails_with_a_message_naming_the_field(data, message):
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    assert message in str(info.value)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = config.from_dict({"seed": 3, "train": {"rho": 0.0}, "model": {"hidden": [10, 20]}})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert config.load(path) == cfg


def test_quickstart_ships_in_the_package_and_in_simulations():
    shipped = config.load(ROOT / "simulations" / "quickstart.toml")
    assert shipped == config.quickstart()
    q = config.quickstart()
    assert (q.topology.kind, q.topology.nodes, q.data.partition, q.data.alpha) == ("ring", 16, "dirichlet", 0.3)
    assert q.data.dataset == "auto" and q.gossip.steps > 1 and q.train.rho > 0  # DFedSAM-MGS


def test_every_shipped_simulation_is_valid():
    from gossipfl import sweep
    for path in sorted((ROOT / "simulations").glob("*.toml")):
        if config.SWEEP_TABLE in config.read_toml(path):
            assert len(sweep.from_command_line(str(path), []).variants) > 1  # every combination validated
        else:
            config.load(path)


def test_invalid_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        config.load(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_set_overrides_are_read_as_toml_and_applied_by_dotted_key(tmp_path):
    assert config.parse_override("model.hidden=[64, 64]") == ("model.hidden", [64, 64])
    assert config.parse_override("data.dataset=digits") == ("data.dataset", "digits")  # a bare word is text
    assert config.parse_override("train.rho=0") == ("train.rho", 0)
    for bad in ("novalue", "=3", "train..rho=1"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            config.parse_override(bad)
    path = tmp_path / "c.toml"
    path.write_text("rounds = 3\n[train]\nrho = 0.1\n")
    cfg = config.load_config(path, ["train.rho=0", "gossip.steps=2"])
    assert (cfg.rounds, cfg.train.rho, cfg.gossip.steps) == (3, 0.0, 2)
    assert config.load_config(None, ["rounds=5"]).rounds == 5  # the quickstart
    with pytest.raises(ConfigError, match="train.rho.x: train.rho is not a section"):
        config.load_config(path, ["train.rho.x=1"])
    assert config.derive(cfg, {"train.lr": 0.5}).train.lr == 0.5 and cfg.train.lr != 0.5


def test_choices_come_from_the_modules_that_implement_them():
    from gossipfl.cli import WEIGHT_SCHEMES
    from gossipfl.graph import weights
    assert tuple(WEIGHT_SCHEMES) == tuple(weights.METHODS)
    with pytest.raises(config.ConfigError, match="fmmc_first_order"):  # the message lists the table
        config.from_dict({"gossip": {"weights": "fastest"}})


def test_user_filters_and_attacks_are_checked_at_load_and_run(small_config, tmp_path, monkeypatch):
    (tmp_path / "load_check_rules.py").write_text(
        "from gossipfl.algorithms.robust import FilterOutput\n"
        "calls = []\n"
        "def keep_all(batch):\n"
        "    calls.append(len(batch.received))\n"
        "    return FilterOutput(batch.received, batch.weights, batch.weights[:, 1:] * 0)\n"
        "def two_arguments(batch, extra):\n"
        "    return batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(config.ConfigError, match="robust.filters.*load_check_rules:two_arguments"):
        small_config(robust__filters=["load_check_rules:two_arguments"])
    with pytest.raises(config.ConfigError, match="byzantine.attack.*no_such_module"):
        small_config(byzantine__attack="no_such_module:f", byzantine__nodes=[1])
    from gossipfl.runtimes.sim import Simulation
    import load_check_rules
    sim = Simulation(small_config(robust__filters=["load_check_rules:keep_all"], engine="vectorized"), progress=False)
    sim.step(0)
    assert load_check_rules.calls and all(k == 2 for k in load_check_rules.calls)  # a ring: two senders per node
