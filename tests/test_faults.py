"""`gossipfl launch` against real faults: a node process killed with SIGKILL mid-run, restarted
with --restart on-failure and killed again, and an asynchronous run with one slow node."""

import os
import signal
import statistics
import threading
import time

from gossipfl.runtimes.launch import launch
from process_helpers import kill_nodes_of, node_pids, read_rows, wait_for

DEADLINE = 2.0


def launched(cfg, run_dir, **options):
    """Run `launch` in a thread; returns the thread and a dict that receives its summary."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(launch(cfg, run_dir, progress=False, **options)),
                              daemon=True)
    thread.start()
    return thread, result


def end_launch(run_dir, thread):
    """Cleanup, pass or fail: SIGTERM (a node that exits 0 is not restarted) and wait for the
    launch, then SIGKILL whatever is left until no node of the run is running."""
    stop(run_dir)
    thread.join(30)
    end = time.monotonic() + 30
    while (thread.is_alive() or node_pids(run_dir)) and time.monotonic() < end:
        kill_nodes_of(run_dir)
        thread.join(1)


def kill(run_dir, node):
    pids = node_pids(run_dir, node)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)


def stop(run_dir):
    """End the run: SIGTERM stops each node after its current step, and the launch completes."""
    for pid in node_pids(run_dir):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # it ended meanwhile
            pass


def test_a_killed_node_costs_two_deadlines_at_most_is_restarted_readmitted_and_reported_when_it_stays_dead(
        small_config, tmp_path):
    run_dir = tmp_path / "run"
    # Rounds of tens of ms, not a few: a resumed node rejoins one round ahead of its neighbours'
    # newest claim, and loses that race if they finish a round before it has trained one.
    cfg = small_config(topology__nodes=4, rounds=100_000, gossip__steps=2, deploy__deadline_s=DEADLINE,
                       deploy__checkpoint_every=1, train__local_steps=12)
    thread, summary = launched(cfg, run_dir, restart="on-failure", max_restarts=1)
    try:
        wait_for(lambda: len(read_rows(run_dir, 1)) >= 3, 90, "node 1 to finish three rounds")
        kill(run_dir, 1)  # restarted with --resume (the one restart allowed)
        wait_for(lambda: len(node_pids(run_dir, 1)) == 1, 30, "the launcher to restart node 1")
        done = len(read_rows(run_dir, 1))
        wait_for(lambda: len(read_rows(run_dir, 1)) > done, 90, "node 1 to finish a round after its restart")
        back = len(read_rows(run_dir, 0))
        wait_for(lambda: any(r["liveness"]["1"]["state"] == "alive" and r["missing"] == 0
                             for r in read_rows(run_dir, 0)[back:]), 30, "node 0 to readmit node 1 and merge it")

        before = read_rows(run_dir, 0)
        kill(run_dir, 1)  # stays dead: no restart left
        wait_for(lambda: len(read_rows(run_dir, 0)) >= len(before) + 15, 60, "node 0 to run 15 rounds without 1")
        stop(run_dir)
        thread.join(60)
        assert not thread.is_alive(), "launch did not finish"
    finally:
        end_launch(run_dir, thread)

    assert summary["status"] == "complete" and summary["dead_nodes"] == [1] and summary["restarts"] == 1
    assert [(e["event"], e["node"]) for e in summary["node_events"]] == [("died", 1), ("restarted", 1), ("died", 1)]
    usual = statistics.median(r["round_seconds"] for r in before[-8:])
    after = read_rows(run_dir, 0)[len(before):len(before) + 15]
    extra = sum(max(0.0, r["round_seconds"] - usual) for r in after)
    jitter = 0.5  # the other 14 rounds' ordinary variation around the median, summed
    assert extra <= 2 * DEADLINE + jitter, (extra, usual, [round(r["round_seconds"], 2) for r in after])
    assert after[-1]["liveness"]["1"]["state"] == "suspected"
    tail = [r["round_seconds"] for r in after[-5:]]
    assert statistics.median(tail) < usual + 0.5 * DEADLINE, (tail, usual)  # back to the usual length


def test_in_async_gossip_a_slow_node_does_not_slow_its_neighbours(small_config, tmp_path):
    run_dir = tmp_path / "run"
    cfg = small_config(topology__nodes=3, rounds=100_000, train__local_steps=20, gossip__schedule="async",
                       deploy__deadline_s=DEADLINE, timing__slow=[2], timing__slow_factor=6.0)
    thread, _ = launched(cfg, run_dir)
    try:
        wait_for(lambda: len(read_rows(run_dir, 2)) >= 4, 90, "the slow node to finish four rounds")
        stop(run_dir)
        thread.join(60)
        assert not thread.is_alive(), "launch did not finish"
    finally:
        end_launch(run_dir, thread)

    def seconds(node, field):  # median over the rounds after the first (start-up)
        return statistics.median(r[field] for r in read_rows(run_dir, node)[1:])

    def rate(node):  # rounds per second after the first round (processes start at different times)
        rows = read_rows(run_dir, node)
        return (len(rows) - 1) / (rows[-1]["wall_seconds"] - rows[0]["wall_seconds"])

    slow = seconds(2, "round_seconds")
    for node in (0, 1):  # their rounds are their own work (train, merge, send), not the slow node's pace
        fast = seconds(node, "round_seconds")
        assert fast < 1.5 * seconds(node, "train_seconds") + 0.05 and fast < slow / 3, (fast, slow)
        assert rate(node) > 2 * rate(2), (rate(node), rate(2))
