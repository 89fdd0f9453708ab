"""The run folder's status record: running, then complete, interrupted or failed; versions and host."""

import json
import subprocess
import sys

import pytest

from gossipfl import config, rundir
from gossipfl.rundir import RunDirError, RunWriter


def writer(tmp_path, name="run"):
    w = RunWriter(tmp_path / name, config.from_dict({"data": {"dataset": "digits"}}))
    w.log({"round": 0, "train_loss": 1.0, "accuracy_mean": 0.5, "accuracy_min": 0.4, "accuracy_max": 0.6})
    return w


def test_a_run_is_running_then_complete_with_versions_and_host(tmp_path):
    w = writer(tmp_path)
    info = rundir.read_run_info(w.dir)
    assert info["status"] == "running" and rundir.read_status(w.dir) == "running"
    assert info["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert info["torch"] and info["gossipfl"] and info["host"]
    summary = w.write_summary(nodes=16)
    w.close()
    assert summary["status"] == "complete" and summary["final_accuracy_mean"] == 0.5
    assert json.loads((w.dir / "summary.json").read_text())["status"] == "complete"
    assert rundir.read_status(w.dir) == "complete" and "ended" in rundir.read_run_info(w.dir)


def test_interrupt_keeps_the_rounds_done_and_fail_records_why(tmp_path):
    a, b = writer(tmp_path, "a"), writer(tmp_path, "b")
    assert a.interrupt()["rounds"] == 1
    assert rundir.read_status(a.dir) == "interrupted"
    b.fail(RuntimeError("disk full"))
    assert rundir.read_status(b.dir) == "failed"
    assert rundir.read_run_info(b.dir)["error"] == "RuntimeError: disk full"


def test_a_run_whose_process_died_without_a_word_reads_as_interrupted(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    w = writer(tmp_path)
    rundir.write_status(w.dir, "running", pid=int(dead.stdout))
    assert rundir.read_status(w.dir) == "interrupted"


def test_recording_status_settles_only_a_run_still_running(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(ValueError), rundir.recording_status(w.dir):
        raise ValueError("bad")
    assert rundir.read_status(w.dir) == "failed"
    w2 = writer(tmp_path, "b")
    w2.interrupt()
    with pytest.raises(RuntimeError), rundir.recording_status(w2.dir):
        raise RuntimeError("after the engine recorded its end")
    assert rundir.read_status(w2.dir) == "interrupted"


def test_claim_refuses_a_folder_with_something_in_it(tmp_path):
    assert rundir.claim_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    rundir.claim_run_dir(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="--out .*full exists and is not empty"):
        rundir.claim_run_dir(tmp_path / "full")


def test_find_runs_searches_below_but_not_inside_run_folders(tmp_path):
    for name in ("a", "sweep/runs/x", "sweep/runs/y"):
        writer(tmp_path, name).close()
    (tmp_path / "a" / "nodes" / "node-0").mkdir(parents=True)
    (tmp_path / "a" / "nodes" / "node-0" / "metrics.jsonl").write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in rundir.find_runs(tmp_path)] == [
        "a", "sweep/runs/x", "sweep/runs/y"]
    assert rundir.describe_run(tmp_path / "sweep/runs/x", tmp_path)["name"] == "sweep/runs/x"
