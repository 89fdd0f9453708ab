"""Node processes over real ZeroMQ sockets on loopback: equivalence with the in-process engine,
start-up failures, a node killed with SIGKILL and resumed, a clean stop on SIGTERM."""

import json
import signal
import socket
import time

import numpy as np
import pytest

from gossipfl.config import ExperimentConfig
from gossipfl.experiment import Experiment
from gossipfl.runtimes.launch import LaunchError, deployment, launch, start_node, stop_all
from gossipfl.runtimes.process import node_dir
from gossipfl.runtimes.sim import Simulation
from process_helpers import deployed, node_pids, read_rows, wait_for


def test_launch_matches_the_in_process_engine(small_config, tmp_path):
    cfg = small_config(topology__nodes=4, rounds=3, engine="nodes")
    summary = launch(cfg, tmp_path / "launch", progress=False)
    assert summary["rounds"] == 3 and summary["runtime"] == "launch"
    lines = [json.loads(line) for line in (tmp_path / "launch" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert all(line["missing"] == 0 and line["rejected"] == {} for line in lines)
    assert "round 2 done: loss" in (node_dir(tmp_path / "launch", 3) / "node.log").read_text()  # per-round INFO
    sim = Simulation(cfg, run_dir=tmp_path / "sim", progress=False)
    sim_summary = sim.run()
    for i, vector in enumerate(sim.vectors()):
        final = np.load(node_dir(tmp_path / "launch", i) / "final.npy", allow_pickle=False)
        np.testing.assert_allclose(final, vector.numpy(), rtol=0, atol=1e-6)
    assert summary["final_accuracy_mean"] == pytest.approx(sim_summary["final_accuracy_mean"], abs=1e-9)
    assert summary["bytes_sent_total"] == sim_summary["bytes_sent_total"]


def test_a_node_that_cannot_start_fails_the_launch_and_stops_the_rest(small_config, tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = f"127.0.0.1:{blocker.getsockname()[1]}"
    try:
        free = deployment(Experiment(small_config(topology__nodes=3)), tmp_path / "probe").deploy.addresses
        cfg = small_config(topology__nodes=3, rounds=50, deploy__addresses=[free[0], taken, free[2]],
                           deploy__startup_s=60.0)
        start = time.monotonic()
        with pytest.raises(LaunchError, match=r"(?s)node 1 exited with code 2.*deploy.addresses\[1\] = "
                                              rf"'{taken}': cannot listen there"):
            launch(cfg, tmp_path / "run", progress=False)
        assert time.monotonic() - start < 60
        assert not node_pids(tmp_path / "run"), "the other nodes must be stopped, not left running"
    finally:
        blocker.close()


def test_killed_node_costs_its_neighbours_a_deadline_and_rejoins_with_resume(small_config, tmp_path, processes):
    run_dir = tmp_path / "run"
    # Without failure detection, so that every step pays the deadline and the others are still
    # running when node 1 is back (with it, they finish the 12 rounds before node 1 has started).
    cfg, path = deployed(small_config(topology__nodes=4, rounds=12, train__local_steps=30, gossip__steps=1,
                                      deploy__deadline_s=1.0, deploy__checkpoint_every=1,
                                      deploy__failure_detection=False), run_dir)
    processes += [start_node(path, run_dir, i) for i in range(4)]
    wait_for(lambda: len(read_rows(run_dir, 1)) >= 2, 90, "node 1 to finish two rounds")
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait(10)
    wait_for(lambda: any(r["missing"] for r in read_rows(run_dir, 0)), 60, "node 0 to miss node 1")
    processes.append(start_node(path, run_dir, 1, resume=True))
    for proc, node in ((processes[0], 0), (processes[2], 2), (processes[3], 3), (processes[4], 1)):
        assert proc.wait(120) == 0, (node_dir(run_dir, node) / "node.log").read_text()[-2000:]
    rows = read_rows(run_dir, 1)
    assert rows[-1]["round"] == 11  # finished the run
    resumed_at = [b["round"] for a, b in zip(rows, rows[1:]) if b["round"] != a["round"] + 1]
    assert resumed_at, "node 1 should have skipped the rounds it was down for"
    for i in (0, 2):  # node 1's neighbours left it out while it was down, and finished
        assert read_rows(run_dir, i)[-1]["round"] == 11
        assert sum(r["missing"] for r in read_rows(run_dir, i)) >= 1
    assert all(r["missing"] == 0 for r in read_rows(run_dir, 3)[:2])


def test_sigterm_stops_a_node_cleanly_with_a_summary(small_config, tmp_path, processes):
    run_dir = tmp_path / "run"
    cfg, path = deployed(small_config(topology__nodes=3, rounds=200, train__local_steps=30,
                                      deploy__deadline_s=1.0), run_dir)
    processes += [start_node(path, run_dir, i) for i in range(3)]
    wait_for(lambda: len(read_rows(run_dir, 0)) >= 2, 90, "node 0 to finish two rounds")
    processes[0].send_signal(signal.SIGTERM)
    assert processes[0].wait(30) == 0
    summary = json.loads((node_dir(run_dir, 0) / "summary.json").read_text())
    assert summary["stopped_early"] and 2 <= summary["rounds_completed"] < 200
    assert (node_dir(run_dir, 0) / "final.npy").exists()
    assert processes[1].poll() is None  # the others carry on without it


def test_poisson_gossip_in_node_processes_matches_the_engine(small_config, tmp_path):
    cfg = small_config(topology__nodes=4, rounds=2, gossip__schedule="poisson", gossip__rates="optimal",
                       gossip__poisson_time=2.0, gossip__weights="fmmc", engine="nodes")
    launch(cfg, tmp_path / "launch", progress=False)
    sim = Simulation(cfg, run_dir=tmp_path / "sim", progress=False)
    sim.run()
    assert len(sim.experiment.plan(0).exchanges) > 0
    for i, vector in enumerate(sim.vectors()):
        final = np.load(node_dir(tmp_path / "launch", i) / "final.npy", allow_pickle=False)
        np.testing.assert_allclose(final, vector.numpy(), rtol=0, atol=1e-6)


def test_launch_with_curve_keys_runs_encrypted_and_authenticated(small_config, tmp_path):
    from gossipfl.transport.keys import write_keys
    write_keys(tmp_path / "keys", range(3))
    cfg = small_config(topology__nodes=3, rounds=2, deploy__keys=str(tmp_path / "keys"))
    summary = launch(cfg, tmp_path / "run", progress=False)
    assert summary["rounds"] == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["missing"] == 0 and line["rejected"] == {} for line in lines)


def test_an_attacker_process_is_caught_by_its_neighbours_filters(small_config, tmp_path):
    cfg = small_config(topology__nodes=4, rounds=4, byzantine__attack="gaussian", byzantine__nodes=[2],
                       byzantine__options={"sigma": 1.0}, robust__filters=["clipped_gossip"])
    summary = launch(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "complete" and summary["attackers"] == [2]
    assert [s["node"] for s in summary["suspected"]] == [2]
    assert summary["suspects_precision"] == 1.0 and summary["suspects_recall"] == 1.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["flagged"] > 0 and lines[-1]["nodes_reporting"] == 4
