"""`gossipfl status` against real node processes: every live node answers with its round and its
neighbours' states, a killed one is reported unreachable, and with keys only the operator's key
(or a node's) is answered."""

import json
import signal
import time

from gossipfl.cli import main
from gossipfl.experiment import Experiment
from gossipfl.runtimes.launch import deployment, start_node
from gossipfl.runtimes.process import node_dir
from gossipfl.transport.keys import write_keys
from gossipfl.transport.status import query_status


def rounds_done(run_dir, node):
    path = node_dir(run_dir, node) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def status(capsys, run_dir, *flags):
    code = main(["status", str(run_dir), "--timeout", "1.5", *flags])
    return code, capsys.readouterr().out


def test_status_reports_every_live_node_and_marks_a_killed_one(small_config, tmp_path, processes, capsys):
    write_keys(tmp_path / "keys", range(3))
    run_dir = tmp_path / "run"
    cfg = deployment(Experiment(small_config(topology__nodes=3, rounds=100_000, deploy__deadline_s=2.0,
                                             deploy__keys=str(tmp_path / "keys"))), run_dir)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    processes += [start_node(run_dir / "config.toml", run_dir, i) for i in range(3)]
    deadline = time.monotonic() + 60
    while not all(rounds_done(run_dir, i) >= 2 for i in range(3)):
        assert time.monotonic() < deadline, "the nodes did not start"
        assert all(p.poll() is None for p in processes), (node_dir(run_dir, 0) / "node.log").read_text()[-2000:]
        time.sleep(0.1)

    code, out = status(capsys, run_dir, "--json")
    assert code == 0
    nodes = json.loads(out)["nodes"]
    assert [n["node"] for n in nodes] == [0, 1, 2] and all(n["reachable"] for n in nodes)
    for n in nodes:
        assert n["round"] >= 1 and n["rounds"] == 100_000 and n["rejected"] == {}
        assert sorted(n["liveness"]) == sorted(str(j) for j in (0, 1, 2) if j != n["node"])
        assert {row["state"] for row in n["liveness"].values()} == {"alive"}
    # Without the operator's key a keyed node does not answer.
    assert query_status({0: f"tcp://{cfg.deploy.addresses[0]}"}, 1.0) == {0: None}

    processes[2].send_signal(signal.SIGKILL)
    processes[2].wait(10)
    deadline = time.monotonic() + 20
    while True:
        code, out = status(capsys, run_dir, "--json")
        nodes = json.loads(out)["nodes"]
        if all(n["reachable"] and n["liveness"]["2"]["state"] == "suspected" for n in nodes[:2]):
            break
        assert time.monotonic() < deadline, out
    assert code == 1 and nodes[2] == {"node": 2, "address": cfg.deploy.addresses[2], "reachable": False}
    code, text = status(capsys, run_dir)
    lines = text.splitlines()
    assert code == 1 and lines[-1] == "2 of 3 nodes answered"
    assert "UNREACHABLE" in lines[4] and "suspected 2" in lines[2] and "live" in lines[3]
