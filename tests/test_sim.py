import json

import numpy as np
import pytest
import torch

from gossipfl.runtimes.sim import Simulation

TIMING = {"round_seconds", "train_seconds", "wall_seconds"}
ENGINES = pytest.mark.parametrize("engine", ["nodes", "vectorized"])


def stacked(sim):
    return sim.vectors().double().numpy()


@ENGINES
def test_same_seed_gives_the_same_metrics(small_config, tmp_path, engine):
    runs = []
    for k in range(2):
        sim = Simulation(small_config(engine=engine), run_dir=tmp_path / f"r{k}", progress=False)
        sim.run()
        lines = [json.loads(line) for line in (tmp_path / f"r{k}" / "metrics.jsonl").read_text().splitlines()]
        runs.append([{key: v for key, v in line.items() if key not in TIMING} for line in lines])
    assert runs[0] == runs[1]
    other = Simulation(small_config(seed=2, engine=engine), run_dir=tmp_path / "r2", progress=False)
    other.run()
    assert json.loads((tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"] != \
        runs[0][-1]["train_loss"]


@ENGINES
def test_q_gossip_steps_equal_one_step_with_w_to_the_q(small_config, engine):
    for q in (1, 3):
        sim = Simulation(small_config(train__local_steps=0, gossip__steps=q, gossip__init="independent",
                                      engine=engine), progress=False)
        x0 = stacked(sim).copy()
        sim.step(0)
        expected = np.linalg.matrix_power(sim.experiment.mixing, q) @ x0
        np.testing.assert_allclose(stacked(sim), expected, atol=2e-6)


@ENGINES
def test_doubly_stochastic_gossip_preserves_the_average(small_config, engine):
    for weights in ("metropolis", "max_degree", "best_constant"):
        sim = Simulation(small_config(train__local_steps=0, gossip__weights=weights, gossip__init="independent",
                                      topology__kind="erdos_renyi", topology__nodes=8, engine=engine), progress=False)
        x0 = stacked(sim).copy()
        for r in range(3):
            sim.step(r)
        np.testing.assert_allclose(stacked(sim).mean(axis=0), x0.mean(axis=0), atol=1e-6)
        assert np.linalg.norm(stacked(sim) - stacked(sim).mean(0)) < np.linalg.norm(x0 - x0.mean(0))


@ENGINES
def test_identical_models_stay_identical(small_config, engine):
    sim = Simulation(small_config(train__local_steps=0, gossip__steps=3, engine=engine), progress=False)
    x0 = stacked(sim).copy()
    assert np.all(x0 == x0[0])
    sim.step(0)
    x1 = stacked(sim)
    assert np.all(x1 == x1[0])
    np.testing.assert_allclose(x1[0], x0[0], atol=1e-7)


def test_q1_is_dfedsam_local_sam_training_then_one_mixing_step(small_config):
    cfg = small_config(gossip__steps=1, train__rho=0.05, engine="nodes")
    sim, reference = Simulation(cfg, progress=False), Simulation(cfg, progress=False)
    w = reference.experiment.mixing
    for r in range(2):
        sim.step(r)
        for node in reference.nodes:
            node.train(r)
        mixed = w @ stacked(reference)
        for node, row in zip(reference.nodes, mixed):
            node.vector.copy_(torch.from_numpy(row).float())
    np.testing.assert_allclose(stacked(sim), stacked(reference), atol=1e-5)


@ENGINES
def test_run_writes_the_run_folder(small_config, tmp_path, engine):
    sim = Simulation(small_config(rounds=4, eval__every=2, engine=engine), run_dir=tmp_path / "run", progress=False)
    summary = sim.run()
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.jsonl", "summary.json"} <= files
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    assert "accuracy_mean" in lines[1] and "accuracy_mean" not in lines[0]
    assert "consensus_distance" in lines[1] and "consensus_distance" not in lines[0]
    for key in ("round", "train_loss", "bytes_sent", "wall_seconds", "rolled_back"):
        assert key in lines[0]
    assert lines[-1]["bytes_sent"] > lines[0]["bytes_sent"] > 0
    n, d = 6, sim.vectors().shape[1]
    assert lines[0]["bytes_sent"] == n * 2 * 2 * d * 4  # nodes x neighbours x gossip steps x bytes
    for key in ("final_accuracy_mean", "final_accuracy_min", "rounds", "bytes_sent_total", "wall_seconds"):
        assert summary[key] is not None
    assert summary["rounds"] == 4
    assert 0.0 <= summary["final_accuracy_min"] <= summary["final_accuracy_mean"] <= 1.0
    resolved = (tmp_path / "run" / "config.toml").read_text()
    assert 'dataset = "digits"' in resolved
    assert summary["engine"] == engine


@ENGINES
def test_nodes_learn_on_digits(small_config, tmp_path, engine):
    sim = Simulation(small_config(rounds=15, train__local_steps=10, engine=engine), run_dir=tmp_path / "run",
                     progress=False)
    summary = sim.run()
    assert summary["final_accuracy_mean"] > 0.8


@ENGINES
def test_an_interrupted_simulation_resumes_to_the_same_final_parameters(small_config, tmp_path, engine):
    import signal
    import subprocess
    import sys
    import time

    from gossipfl import checkpoint
    from gossipfl.runtimes.sim import CHECKPOINTS

    cfg = small_config(rounds=8, engine=engine, robust__guard="on", deploy__checkpoint_every=2,
                       train__local_steps=60)
    whole = Simulation(cfg, run_dir=tmp_path / "whole", progress=False)
    whole.run()
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    proc = subprocess.Popen([sys.executable, "-m", "gossipfl", "simulate", str(path), "--out", str(tmp_path / "cut"),
                             "--quiet", "--no-plot"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "cut" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, "the run ended before it could be cut"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, proc.stderr.read()
    finally:
        proc.kill()
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 3 <= summary["rounds"] < 8
    resumed = Simulation.resume(tmp_path / "cut", progress=False)
    assert resumed.start_round % 2 == 0 and resumed.start_round < 8
    assert resumed.run()["status"] == "complete"
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(8))
    layout = whole.layout
    final = checkpoint.load_latest(tmp_path / "cut" / CHECKPOINTS, layout)
    assert final.round == 7
    assert torch.equal(final.vector, checkpoint.load_latest(tmp_path / "whole" / CHECKPOINTS, layout).vector)
    expected = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["bytes_sent_total"] == expected["bytes_sent_total"]


def test_a_nan_vector_over_the_memory_transport_is_dropped_and_counted_as_over_zeromq(small_config):
    from gossipfl.transport.base import Message
    sim = Simulation(small_config(engine="nodes"), progress=False)
    sender, receiver = sim.nodes[0], sim.nodes[1]
    poisoned = sender.vector.clone()
    poisoned[3] = float("nan")
    before = receiver.vector.clone()
    sender.transport.send(1, Message("model", 0, 0, 0, poisoned))
    sender.transport.send(1, Message("model", 0, 0, 1, sender.vector[:10].clone()))  # wrong length
    assert receiver.transport.rejected == {"non_finite": 1, "bad_length": 1}
    receiver.receive_and_merge(0, 0)
    assert torch.equal(receiver.vector, before) and torch.isfinite(receiver.vector).all()
