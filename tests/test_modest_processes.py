"""MoDeST in node processes over real ZeroMQ sockets: a launched run against `gossipfl simulate`
of the same config, a run whose nodes are killed with SIGKILL mid-run, and hostile models. (Refusing
fedavg and churn schedules in processes, exit 2, is a bad-input case of test_cli.)"""

import json
import os
import signal
import threading

import pytest
import torch

from gossipfl.algorithms.sampling import View
from gossipfl.runtimes.launch import launch
from gossipfl.runtimes.process import NodeProcess, node_dir, tcp
from gossipfl.runtimes.sampled_process import KINDS, TRAINED, ModestLoop
from gossipfl.runtimes.sim import Simulation
from gossipfl.rundir import read_metrics
from gossipfl.transport import Message
from gossipfl.transport.zmq import ZmqTransport
from process_helpers import deployed, kill_nodes_of, node_pids, wait_for

FAST_PINGS = {"sampling__ping_timeout_s": 1.0, "sampling__ping_interval_s": 0.25, "sampling__silence_s": 60.0,
              "deploy__startup_s": 20.0}


def modest(small_config, **overrides):
    return small_config(**{"sampling__kind": "modest", "sampling__sample_size": 3, "train__local_steps": 20,
                           "train__lr": 0.1, "train__rho": 0.0, "engine": "nodes", **FAST_PINGS, **overrides})


def node_lines(run_dir, n):
    return [json.loads(line) for i in range(n) if (path := node_dir(run_dir, i) / "metrics.jsonl").exists()
            for line in path.read_text().splitlines()]


def test_a_launched_modest_run_completes_every_round_close_to_the_simulation(small_config, tmp_path):
    cfg = modest(small_config, topology__nodes=6, rounds=12)
    summary = launch(cfg, tmp_path / "launch", progress=False)
    assert summary["status"] == "complete" and summary["dead_nodes"] == []
    rows = read_metrics(tmp_path / "launch")
    assert [r["round"] for r in rows] == list(range(12))
    assert all(len(r["aggregators"]) == 1 and 1 <= len(r["sample"]) <= 3 for r in rows), rows
    lines = node_lines(tmp_path / "launch", 6)
    assert {line["role"] for line in lines} == {"trained", "aggregated"}
    for r in range(11):  # each round's aggregator handed its aggregate to the trainers of the next
        aggregator = next(line for line in lines if line["round"] == r and line["role"] == "aggregated")
        trainers = {line["node"] for line in lines if line["round"] == r + 1 and line["role"] == "trained"}
        assert trainers <= set(aggregator["recipients"]), (r, aggregator, trainers)
    for i in range(6):  # every node ended its run at the last round's `done`
        assert json.loads((node_dir(tmp_path / "launch", i) / "summary.json").read_text())["rounds_completed"] == 12

    sim = Simulation(cfg, run_dir=tmp_path / "sim", progress=False)
    sim_summary = sim.run()
    simulated = read_metrics(tmp_path / "sim")[-1]["accuracy_global_model"]
    launched = summary["final_accuracy_global_model"]
    assert launched > 0.6 and simulated > 0.6, (launched, simulated)
    assert launched == pytest.approx(simulated, abs=0.15)  # ping timing may pick other peers than the simulation
    # Models only (control messages carry no payload); the simulation also sends the last
    # aggregate on, which processes replace by `done`.
    assert 0.7 * sim_summary["bytes_sent_total"] <= summary["bytes_sent_total"] <= 1.1 * sim_summary["bytes_sent_total"]


def test_killed_trainers_and_aggregators_are_skipped_and_the_run_completes(small_config, tmp_path):
    run_dir, n, rounds = tmp_path / "run", 6, 18
    # A short start-up grace: the survivors may never have heard from the victims before.
    cfg = modest(small_config, topology__nodes=n, rounds=rounds, deploy__startup_s=5.0,
                 sampling__ping_timeout_s=0.5, sampling__ping_interval_s=0.1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(launch(cfg, run_dir, progress=False)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 4, 120,
                 "four rounds")
        newest = read_metrics(run_dir)[-1]
        victims = sorted({newest["aggregators"][0], *(set(newest["sample"]) - set(newest["aggregators"]))})[:2]
        for victim in victims:  # what holds the run now: the newest aggregator, and a trainer
            pids = node_pids(run_dir, victim)
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
        thread.join(150)
        assert not thread.is_alive(), "the launch did not finish"
    finally:
        kill_nodes_of(run_dir)
        thread.join(30)

    assert result["status"] == "complete" and result["dead_nodes"] == victims, result
    last_seen = max(line["round"] for line in node_lines(run_dir, n) if line["node"] in victims)
    assert last_seen < rounds - 8, last_seen  # killed mid-run: the last rounds ran without them
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(rounds)) and result["rounds"] == rounds
    assert sum(r["skipped"] for r in rows if r["round"] > last_seen) > 0  # the survivors pinged the dead in vain
    assert result["final_accuracy_global_model"] > 0.5  # it learned (chance: 0.1) with a third of the nodes gone
    for i in set(range(n)) - set(victims):
        summary = json.loads((node_dir(run_dir, i) / "summary.json").read_text())
        assert summary["rounds_completed"] == rounds and not summary["stopped_early"]


def test_a_model_with_a_malformed_or_foreign_view_or_a_round_past_the_run_is_dropped(small_config, tmp_path):
    cfg, _ = deployed(modest(small_config, topology__nodes=3, rounds=4), tmp_path)
    process = NodeProcess(cfg, 0, tmp_path)
    size = process.node.vector.numel()
    impostor = ZmqTransport(1, tcp(cfg.deploy.addresses[1]), {0: tcp(cfg.deploy.addresses[0])}, process.layout, size,
                            kinds=KINDS, asynchronous=True)
    try:
        with (tmp_path / "metrics.jsonl").open("w") as metrics:
            loop = ModestLoop(process, metrics, 0.0)

            def send(round_index, extra, until):
                impostor.send(0, Message(TRAINED, 1, round_index, 0, torch.ones(size), extra))
                wait_for(lambda: (loop.take_in(), until())[1], 20, "node 0 to take the message in")

            send(0, {"active": "everyone"}, lambda: process.transport.rejected["bad_view"] == 1)
            send(0, View.of_members([0, 1, 2, 99]).to_extra(), lambda: process.transport.rejected["bad_view"] == 2)
            heard = loop.heard_at
            send(cfg.rounds, View.of_members([0, 1, 2]).to_extra(), lambda: loop.heard_at > heard)
            assert loop.buffer.models == {}  # a round past the run's last claims nothing
            send(1, View.of_members([0, 1, 2]).to_extra(), lambda: loop.buffer.models)
            assert loop.buffer.round == 1 and list(loop.buffer.models) == [1]
            assert 99 not in loop.view.records
    finally:
        impostor.close()
        process.close()
