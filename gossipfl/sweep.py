"""Sweeps: every combination of settings, each over several seeds, each run as its own
`gossipfl simulate` process, and a table of final metrics per combination (mean and spread).

The sweep folder holds base.toml (the experiment every run starts from), sweep.json (the plan:
combinations and their run folders, read by `gossipfl compare`), runs/NAME/ (one run folder per
combination and seed, NAME built from the settings, so the same run always lands in the same
folder), logs/NAME.log (each run's output) and results.csv, results.json, results.md.
A run already complete in its folder is not run again: an interrupted sweep resumes.

Torch-free: this process only plans, starts and reads runs.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import config
from .config import ConfigError, ExperimentConfig
from .report import markdown_table
from .rundir import read_status, read_summary
from .runtimes import single_thread_env, stop_all

SWEEP_KEYS = ("seeds", "grid", "jobs")
BASE_FILE, PLAN_FILE = "base.toml", "sweep.json"  # plots.SWEEP_FILE reads the plan
# summary.json field: column title in the tables
METRICS = {"final_accuracy_mean": "accuracy (node mean)", "final_accuracy_min": "weakest node",
           "final_accuracy_average_model": "average model", "final_consensus_distance": "consensus distance",
           "wall_seconds": "seconds"}
POLL_S = 0.2


@dataclass
class SweepSpec:
    """What to run: the base experiment, the settings of each combination, the seeds."""

    base: ExperimentConfig
    variants: list[dict[str, Any]]  # dotted keys -> values, one dict per combination
    seeds: list[int]
    out: Path
    jobs: int = 1


@dataclass
class RunOutcome:
    settings: dict[str, Any]
    seed: int
    dir: Path
    log: Path
    status: str = "pending"  # then complete, failed or interrupted
    reused: bool = False     # complete before this sweep started
    summary: dict[str, Any] | None = None


@dataclass
class SweepResult:
    spec: SweepSpec
    runs: list[RunOutcome]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status != "complete"]

    def combinations(self) -> list[dict[str, Any]]:
        """Per combination: its settings, runs, and mean/std/min/max of each final metric over seeds."""
        out = []
        for settings in self.spec.variants:
            runs = [r for r in self.runs if r.settings == settings]
            done = [r.summary for r in runs if r.status == "complete" and r.summary]
            metrics = {key: spread([s[key] for s in done if s.get(key) is not None]) for key in METRICS}
            out.append({"settings": settings, "complete": len(done), "runs": [self.run_record(r) for r in runs],
                        "metrics": metrics, "failed": [str(r.log) for r in runs if r.status != "complete"]})
        return out

    def run_record(self, run: RunOutcome) -> dict[str, Any]:
        return {"seed": run.seed, "dir": str(run.dir), "log": str(run.log), "status": run.status,
                "reused": run.reused}

    def document(self) -> dict[str, Any]:
        return {"sweep": str(self.spec.out), "seeds": self.spec.seeds, "keys": setting_keys(self.spec.variants),
                "runs": len(self.runs), "complete": len(self.runs) - len(self.failed),
                "reused": sum(r.reused for r in self.runs), "failed": len(self.failed),
                "combinations": self.combinations(), "files": self.files}

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per combination: settings, seeds done, metric_mean/_std/_min/_max, failed logs."""
        keys, base = setting_keys(self.spec.variants), config.flat_fields(self.spec.base.to_dict())
        rows = []
        for combo in self.combinations():
            row: dict[str, Any] = {k: combo["settings"].get(k, base.get(k)) for k in keys}
            row["seeds"] = f"{combo['complete']}/{len(self.spec.seeds)}"
            for key, s in combo["metrics"].items():
                row.update({f"{key}_{stat}": s[stat] for stat in ("mean", "std", "min", "max")})
            row["failed"] = " ".join(combo["failed"])
            rows.append(row)
        return rows

    def markdown(self) -> str:
        keys = setting_keys(self.spec.variants)
        table = []
        for row in self.rows():
            line = {k: json.dumps(row[k]) if not isinstance(row[k], str) else row[k] for k in keys}
            line["seeds"], line["failed (log)"] = row["seeds"], row["failed"]
            for key, title in METRICS.items():
                line[title] = spread_text({s: row[f"{key}_{s}"] for s in ("mean", "std", "min", "max")})
            table.append(line)
        reused = sum(r.reused for r in self.runs)
        head = (f"sweep {self.spec.out}: {len(self.runs)} runs ({reused} complete before this call), "
                f"{len(self.failed)} failed; mean ± std [min, max] over seeds {format_seeds(self.spec.seeds)}")
        columns = [*keys, "seeds", *METRICS.values()] + (["failed (log)"] if self.failed else [])
        return head + "\n\n" + markdown_table(table, columns)


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def spread_text(s: Mapping[str, float | None]) -> str:
    if s["mean"] is None:  # no complete run recorded it: the seeds and failed columns say why
        return "n/a"
    if s["std"] is None:
        return f"{s['mean']:.4g}"
    return f"{s['mean']:.4g} ± {s['std']:.2g} [{s['min']:.4g}, {s['max']:.4g}]"


def format_seeds(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)) \
        else ", ".join(map(str, seeds))


def setting_keys(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for v in variants for k in v))


# ------------------------------------------------------------------------------------ planning


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """`gossip.steps=1,4` -> ("gossip.steps", [1, 4]); values are read as TOML like --set values
    (`model.hidden=[16],[32,32]`), bare words as strings (`gossip.weights=metropolis,fmmc`)."""
    key, _ = config.parse_override(text, option="--grid")
    raw = text.partition("=")[2]
    values = config.parse_value(f"[{raw}]")
    if not isinstance(values, list):
        values = [config.parse_value(v.strip()) for v in raw.split(",")]
    if not values or values == [""]:
        raise ConfigError(f"--grid {text!r}: give one or more values, e.g. {key}=1,4")
    return key, values


def grid_variants(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def make_spec(base: ExperimentConfig, variants: Sequence[Mapping[str, Any]], seeds: int = 1,
              out: str | Path | None = None, jobs: int = 1) -> SweepSpec:
    """Check every combination now (a typo fails here, not after an hour of runs); seeds are
    base.seed, base.seed + 1, ..., base.seed + seeds - 1."""
    variants = [dict(v) for v in variants] or [{}]
    if seeds < 1 or jobs < 1:
        raise ConfigError(f"a sweep needs seeds >= 1 and jobs >= 1 (got seeds={seeds}, jobs={jobs})")
    for settings in variants:
        if "seed" in settings:
            raise ConfigError("seed is swept by --seeds (or [sweep] seeds), not by the grid")
        try:
            config.derive(base, settings)
        except ConfigError as exc:
            raise ConfigError(f"sweep combination {run_name(settings, base.seed)}: {exc}") from None
    names = [run_name(v, 0) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError("the sweep lists the same combination twice")
    out = Path(out) if out else Path(base.output) / f"{base.name}-sweep"
    return SweepSpec(base, variants, list(range(base.seed, base.seed + seeds)), out, jobs)


def from_command_line(path: str | None, overrides: Sequence[str], grid: Sequence[str] = (),
                      seeds: int | None = None, jobs: int | None = None, out: str | None = None) -> SweepSpec:
    """`gossipfl sweep`: the config's [sweep] table (seeds, grid, jobs), then the command line's
    --grid (replacing a key's values), --seeds and --jobs on top of it."""
    data = config.read_toml(path) if path else config.quickstart().to_dict()
    table = data.pop(config.SWEEP_TABLE, {})
    if not isinstance(table, dict) or set(table) - set(SWEEP_KEYS):
        unknown = sorted(set(table) - set(SWEEP_KEYS)) if isinstance(table, dict) else ["(not a table)"]
        raise ConfigError(f"unknown field sweep.{unknown[0]}; known fields: {', '.join(SWEEP_KEYS)}")
    values = config.flat_fields(table.get("grid", {}))
    for key, listed in values.items():
        if not isinstance(listed, list) or not listed:
            raise ConfigError(f"sweep.grid.{key} = {listed!r} must be a non-empty list of values")
    values.update(parse_grid(text) for text in grid)
    fixed = dict(config.parse_override(text) for text in overrides)
    clash = sorted(set(fixed) & set(values))
    if clash:
        raise ConfigError(f"{clash[0]} is both set (--set) and swept (--grid); keep one")
    base = config.from_dict(config.apply_overrides(data, fixed))
    return make_spec(base, grid_variants(values), seeds or _count(table, "seeds"), out, jobs or _count(table, "jobs"))


def _count(table: Mapping[str, Any], key: str) -> int:
    value = table.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"sweep.{key} = {value!r} must be an integer >= 1")
    return value


def run_name(settings: Mapping[str, Any], seed: int) -> str:
    """A stable folder name: gossip.steps=4,train.rho=0.05,seed=0; characters a shell or file
    system would trip on become _, and then a hash of the exact settings keeps names distinct."""
    text = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items())
    text = f"{text},seed={seed}" if text else f"seed={seed}"
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe != text or len(safe) > 150:
        safe = f"{safe[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


# ------------------------------------------------------------------------------------ running


def prepare_folder(spec: SweepSpec) -> Path:
    """Create the sweep folder, or check that an existing one was made from the same base config."""
    out, text = spec.out, spec.base.to_toml()
    base_path = out / BASE_FILE
    if base_path.is_file():
        before = config.flat_fields(config.tomllib.loads(base_path.read_text()))
        now = config.flat_fields(config.tomllib.loads(text))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{out} holds a sweep of a different base config (it differs in "
                              f"{', '.join(changed[:5])}); give a new --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not a sweep folder; give a new folder")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    base_path.write_text(text)
    return base_path


def plan(spec: SweepSpec) -> list[RunOutcome]:
    return [RunOutcome(settings, seed, spec.out / "runs" / run_name(settings, seed),
                       spec.out / "logs" / f"{run_name(settings, seed)}.log")
            for settings in spec.variants for seed in spec.seeds]


def write_plan(spec: SweepSpec, runs: Sequence[RunOutcome]) -> None:
    combos = [{"settings": v, "runs": [{"seed": r.seed, "dir": str(r.dir.relative_to(spec.out))}
                                       for r in runs if r.settings == v]} for v in spec.variants]
    (spec.out / PLAN_FILE).write_text(json.dumps({"base": BASE_FILE, "seeds": spec.seeds,
                                                  "combinations": combos}, indent=1) + "\n")


def resumable(run: RunOutcome) -> bool:
    """An interrupted attempt that left a checkpoint continues from it instead of starting over."""
    return read_status(run.dir) == "interrupted" and any((run.dir / "checkpoints").glob("checkpoint-*.json"))


def command(base_path: Path, run: RunOutcome) -> list[str]:
    """The child: plain `gossipfl simulate` with --set overrides, whatever engine the config picks
    (or `simulate --resume` of an interrupted attempt); no plots per run (`gossipfl compare SWEEP`
    draws them all; `gossipfl plot RUN` one run)."""
    quiet = ["--quiet", "--no-plot"]
    if run.dir.exists() and resumable(run):
        return [sys.executable, "-m", "gossipfl", "simulate", "--resume", str(run.dir), *quiet]
    sets = [a for k, v in {**run.settings, "seed": run.seed}.items() for a in ("--set", config.override_text(k, v))]
    return [sys.executable, "-m", "gossipfl", "simulate", str(base_path), *sets, "--out", str(run.dir), *quiet]


def run_sweep(spec: SweepSpec, progress: bool = True) -> SweepResult:
    """Run what is not complete yet, up to spec.jobs at a time, then write the results files."""
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    base_path = prepare_folder(spec)
    runs = plan(spec)
    write_plan(spec, runs)
    for run in runs:
        if run.dir.is_dir() and read_status(run.dir) == "complete":
            run.status, run.reused, run.summary = "complete", True, read_summary(run.dir)
    pending = [r for r in runs if not r.reused]
    say(f"sweep {spec.out}: {len(runs)} runs, {len(runs) - len(pending)} complete already, "
        f"{len(pending)} to run, {spec.jobs} at a time")
    active: dict[subprocess.Popen, tuple[RunOutcome, float]] = {}
    todo, finished = len(pending), 0
    try:
        while pending or active:
            while pending and len(active) < spec.jobs:
                run = pending.pop(0)
                if run.dir.exists() and not resumable(run):  # a failed attempt: start again from scratch
                    shutil.rmtree(run.dir)
                with run.log.open("w") as log:
                    active[subprocess.Popen(command(base_path, run), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=single_thread_env())] = (run, time.time())
            for proc in [p for p in active if p.poll() is not None]:
                run, started = active.pop(proc)
                settle(run, proc.returncode)
                finished += 1
                accuracy = (run.summary or {}).get("final_accuracy_mean")
                say(f"[{finished}/{todo}] {run.status:<11} {run.dir.name}"
                    + (f"  accuracy {accuracy:.4f}" if accuracy is not None else f"  (exit {proc.returncode}; "
                       f"log {run.log})") + f"  {time.time() - started:.0f} s")
            time.sleep(POLL_S)
    finally:  # Ctrl-C or an error here: SIGINT lets the runs still going record themselves as interrupted
        stop_all(active, grace=10.0, sig=signal.SIGINT)
    result = SweepResult(spec, runs)
    result.files = write_results(result)
    return result


def settle(run: RunOutcome, returncode: int) -> None:
    status = read_status(run.dir) if run.dir.is_dir() else "failed"
    run.status = "complete" if returncode == 0 and status == "complete" else \
        "interrupted" if status == "interrupted" else "failed"
    run.summary = read_summary(run.dir) if run.status == "complete" else None


def write_results(result: SweepResult) -> dict[str, str]:
    out = result.spec.out
    paths = {"csv": out / "results.csv", "json": out / "results.json", "markdown": out / "results.md"}
    rows = result.rows()
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    files = {k: str(p) for k, p in paths.items()}
    paths["json"].write_text(json.dumps({**result.document(), "files": files}, indent=1) + "\n")
    paths["markdown"].write_text(result.markdown() + "\n")
    return files

