"""The run folder: config.toml (the config as resolved), metrics.jsonl (a line per round),
summary.json, and run.json: how the run stands (running, then complete, failed or interrupted)
and what ran it (gossipfl, torch and Python versions, host). Torch-free, so listing and plotting
runs stays fast.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .config import ExperimentConfig, tomllib
from .errors import UserError

RUN_INFO = "run.json"
STATUSES = ("running", "complete", "failed", "interrupted")


class RunDirError(UserError, ValueError):
    """A folder that is not a run folder, or one a new run must not write into."""


def new_run_dir(parent: str | Path, name: str) -> Path:
    """runs/NAME-YYYYmmdd-HHMMSS, with a numeric suffix if that exists already."""
    stem = Path(parent) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = stem, 1
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return path


def claim_run_dir(path: str | Path) -> Path:
    """Refuse a folder that exists and is not empty, so that no run is overwritten or appended to."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"--out {path} exists and is not empty; give a new folder, or leave out --out "
                          f"for a fresh OUTPUT/NAME-TIMESTAMP folder")
    return path


def versions() -> dict[str, Any]:
    """What ran a run: package versions, Python, host. Torch's version is read without importing it."""
    torch = sys.modules.get("torch")
    try:
        torch_version = torch.__version__ if torch is not None else metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"gossipfl": __version__, "torch": torch_version, "python": platform.python_version(),
            "host": socket.gethostname(), "platform": platform.platform(), "pid": os.getpid(),
            "argv": sys.argv}


def read_run_info(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_status(run_dir: str | Path, status: str, **fields: Any) -> dict[str, Any]:
    """Record the run's state in run.json, replaced atomically so a reader never sees half a file."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    run_dir = Path(run_dir)
    info = {**(read_run_info(run_dir) or {}), **fields, "status": status}
    if status != "running":
        info["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    scratch = run_dir / f".{RUN_INFO}.tmp"
    scratch.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(scratch, run_dir / RUN_INFO)
    return info


def read_status(run_dir: str | Path) -> str:
    """complete, failed, interrupted or running; a run recorded as running whose process is gone
    (killed, host rebooted) is interrupted. Folders from before run.json: complete with a summary."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if info is None:
        return "complete" if (run_dir / "summary.json").is_file() else "interrupted"
    status = info.get("status")
    if status == "complete" and not (run_dir / "summary.json").is_file():
        return "interrupted"
    if status == "running" and info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        return "interrupted"
    return status if status in STATUSES else "interrupted"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextmanager
def recording_status(run_dir: str | Path) -> Iterator[None]:
    """Around an engine's run(): a Ctrl-C or an exception that ends it leaves run.json saying
    interrupted or failed, unless the engine already recorded how it ended."""
    try:
        yield
    except KeyboardInterrupt:
        _settle(run_dir, "interrupted")
        raise
    except BaseException as exc:
        _settle(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _settle(run_dir: str | Path, status: str, **fields: Any) -> None:
    info = read_run_info(run_dir)
    if info is not None and info.get("status") == "running":
        write_status(run_dir, status, **fields)


class RunWriter:
    """Writes one run folder; metrics lines are flushed as they come, so a crash keeps them.

    run.json says "running" from the start; `write_summary` ends the run as complete, `interrupt`
    as interrupted (with the summary of the rounds done), `fail` as failed."""

    def __init__(self, run_dir: str | Path, cfg: ExperimentConfig, keep_rounds: int = 0):
        """`keep_rounds` > 0 continues a resumed run: its metrics lines of rounds before that are
        kept and later ones (written after the checkpoint it resumes from) dropped."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(cfg.to_toml())
        kept = [r for r in read_metrics(self.dir) if r["round"] < keep_rounds] if keep_rounds else []
        self._metrics = (self.dir / "metrics.jsonl").open("w")
        self.last: dict[str, Any] = {}
        for record in kept:
            self.log(record)
        write_status(self.dir, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), **versions())

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self.last = record

    def write_summary(self, status: str = "complete", **extra: Any) -> dict[str, Any]:
        summary = {
            "status": status,
            "final_accuracy_mean": self.last.get("accuracy_mean"),
            "final_accuracy_min": self.last.get("accuracy_min"),
            "final_accuracy_max": self.last.get("accuracy_max"),
            "final_accuracy_average_model": self.last.get("accuracy_average_model"),
            "final_accuracy_global_model": self.last.get("accuracy_global_model"),  # a sampled run's newest aggregate
            "final_consensus_distance": self.last.get("consensus_distance"),
            "rounds": self.last.get("round", -1) + 1,
            "bytes_sent_total": self.last.get("bytes_sent"),
            "wall_seconds": self.last.get("wall_seconds"),
            **extra,
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_status(self.dir, status)
        return summary

    def interrupt(self, **extra: Any) -> dict[str, Any]:
        """End the run as interrupted: the summary of the rounds done, status interrupted."""
        return self.write_summary("interrupted", **extra)

    def fail(self, error: BaseException | str) -> None:
        """End the run as failed, recording why in run.json (no summary: its numbers would mislead)."""
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        write_status(self.dir, "failed", error=text)

    def close(self) -> None:
        self._metrics.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds recorded so far; a last line still being written (or cut by a crash) is left out."""
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config.toml as a plain dict (not validated: old runs stay readable)."""
    return tomllib.loads((Path(run_dir) / "config.toml").read_text())


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.toml").is_file() and ((path / "metrics.jsonl").is_file() or (path / RUN_INFO).is_file())


def checked_run_dir(path: str | Path) -> Path:
    """`path` if it is a run folder with at least one round, else RunDirError saying what it is."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such folder")
    if not is_run_dir(path):
        raise RunDirError(f"{path} is not a run folder (it has no config.toml and metrics.jsonl)")
    if not (path / "metrics.jsonl").is_file() or not read_metrics(path):
        raise RunDirError(f"{path} has no rounds recorded yet")
    return path


def find_runs(root: str | Path) -> list[Path]:
    """Run folders at or under `root` (a run folder's own subfolders, e.g. nodes/, are not searched)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders.sort()
        if is_run_dir(folder):
            found.append(Path(folder))
            subfolders.clear()
    return found


def describe_run(run_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """What `gossipfl runs` lists: name, start date, status, key settings, rounds, final accuracy."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir) or {}
    cfg = read_config(run_dir)
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    evaluated = [r for r in rows if r.get("accuracy_mean") is not None]
    started = info.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S",
                                                   time.localtime((run_dir / "config.toml").stat().st_mtime))
    topo, gossip, train = cfg.get("topology", {}), cfg.get("gossip", {}), cfg.get("train", {})
    settings = {"dataset": cfg.get("data", {}).get("dataset"), "nodes": topo.get("nodes"),
                "topology": topo.get("file") or topo.get("kind"), "model": cfg.get("model", {}).get("name"),
                "gossip.steps": gossip.get("steps"), "train.rho": train.get("rho"),
                "gossip.weights": gossip.get("weights"), "gossip.merge": gossip.get("merge"),
                "gossip.schedule": gossip.get("schedule")}
    return {"run": str(run_dir), "name": str(run_dir.relative_to(root)) if root and run_dir != Path(root)
            else run_dir.name, "started": started, "status": read_status(run_dir), "settings": settings,
            "rounds_done": len(rows), "rounds": cfg.get("rounds"),
            "final_accuracy": evaluated[-1]["accuracy_mean"] if evaluated else None,
            "versions": {k: info.get(k) for k in ("gossipfl", "torch", "python", "host")} if info else None}
