"""Asynchronous gossip on the virtual clock of `gossipfl simulate`."""

import json

import pytest
import torch

from gossipfl.config import ConfigError
from gossipfl.runtimes.sim import Simulation, choose_engine

TIMING = {"round_seconds", "train_seconds", "wall_seconds"}


def run(config, tmp_path, name):
    sim = Simulation(config, run_dir=tmp_path / name, progress=False)
    sim.run()
    lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return sim, [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def test_the_async_simulation_is_deterministic_for_a_seed(small_config, tmp_path):
    cfg = small_config(rounds=4, gossip__schedule="async", timing__compute_spread=0.5, timing__latency_s=0.3,
                       timing__latency_spread=0.5)
    a, lines_a = run(cfg, tmp_path, "a")
    b, lines_b = run(cfg, tmp_path, "b")
    assert lines_a == lines_b and torch.equal(a.vectors(), b.vectors())
    c, lines_c = run(small_config(rounds=4, seed=5, gossip__schedule="async", timing__compute_spread=0.5,
                                  timing__latency_s=0.3, timing__latency_spread=0.5), tmp_path, "c")
    assert lines_c[-1]["train_loss"] != lines_a[-1]["train_loss"]
    assert a.engine_name == "nodes" and lines_a[-1]["bytes_sent"] > 0


def test_each_node_keeps_its_own_pace(small_config):
    sim = Simulation(small_config(rounds=4, gossip__schedule="async", timing__slow=[2], timing__slow_factor=4.0),
                     progress=False)
    for r in range(4):
        sim.step(r)
    rounds = sim.engine.local_round.tolist()
    fast = [k for i, k in enumerate(rounds) if i != 2]
    assert all(k == fast[0] for k in fast) and fast[0] >= 3
    assert rounds[2] == fast[0] // 4  # the straggler trains a quarter as often; nobody waits for it


def test_vectors_arrive_after_their_latency(small_config):
    """With links slower than a whole run, nobody ever hears from anyone: models stay apart."""
    cfg = dict(rounds=4, gossip__schedule="async", gossip__init="independent", train__local_steps=0)
    near = Simulation(small_config(**cfg, timing__latency_s=0.1), progress=False)
    far = Simulation(small_config(**cfg, timing__latency_s=100.0), progress=False)
    x0 = far.vectors()
    for r in range(4):
        near.step(r)
        far.step(r)
    assert torch.equal(far.vectors(), x0)
    assert not torch.equal(near.vectors(), x0)


def test_the_vectorized_engine_refuses_async_and_auto_picks_nodes(small_config):
    assert choose_engine(small_config(gossip__schedule="async"))[0] == "nodes"
    with pytest.raises(ConfigError, match="schedule = 'async' needs engine = 'nodes'"):
        choose_engine(small_config(gossip__schedule="async", engine="vectorized"))


def test_slow_nodes_must_exist(small_config):
    with pytest.raises(ConfigError, match="timing.slow"):
        Simulation(small_config(gossip__schedule="async", timing__slow=[17]), progress=False)


def test_attackers_and_filters_run_on_the_virtual_clock(small_config, tmp_path):
    cfg = small_config(rounds=3, gossip__schedule="async", byzantine__attack="sign_flip", byzantine__options={"scale": 5.0},
                       byzantine__nodes=[1], robust__filters=["clipped_gossip"])
    sim, lines = run(cfg, tmp_path, "attacked")
    summary = json.loads((tmp_path / "attacked" / "summary.json").read_text())
    assert summary["attackers"] == [1] and lines[-1]["flagged"] > 0
    assert {(o, s) for o, s in sim.engine.observations()} >= {(0, 1), (2, 1)}
