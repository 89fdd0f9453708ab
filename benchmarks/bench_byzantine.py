"""Byzantine robustness matrix: honest nodes' final accuracy under each attack (rows) with each
filter (columns), from one command over simulations/byzantine.toml, run by gossipfl.sweep.

Rows: no attack, then each attack with 10% and with 25% of the nodes attacking (placed at random
from the seed). Columns: plain averaging and each filter. One seed per cell; then the attack-free
row and the best filter of each attack row get seeds 1 and 2 as well (mean and spread). Also
tabulated: the suspected-peers precision and recall of each cell, and where each filter falls
more than 5 points below the attack-free run.

    python benchmarks/bench_byzantine.py [--out DIR] [--jobs 2] [--rounds 30] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, write

from gossipfl import config, sweep
from gossipfl.report import markdown_table

BASE = Path(__file__).resolve().parents[1] / "simulations" / "byzantine.toml"
ATTACKS = ("sign_flip", "gaussian", "label_flip", "alie", "ipm", "dissensus", "free_rider")
FRACTIONS = (0.1, 0.25)
FILTERS = ("plain", "median", "trimmed_mean", "krum", "clipped_gossip", "balance", "bristle")
# Parameters sized for up to 25% attackers on a 6-regular graph (a node sees 6 senders, 1.5 of them
# Byzantine on average, at times 3): each filter assumes up to two Byzantine neighbours.
OPTIONS: dict[str, dict[str, Any]] = {"trimmed_mean": {"b": 2}, "krum": {"f": 2, "m": 3},
                                      "clipped_gossip": {"delta": 0.3}, "bristle": {"closest": 3, "random": 1}}
ATTACK_OPTIONS: dict[str, dict[str, Any]] = {"gaussian": {"sigma": 0.3}}
SEEDS = 3
WITHIN = 0.05


def variant(attack: str | None, fraction: float, name: str) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if attack:
        settings.update({"byzantine.attack": attack, "byzantine.fraction": fraction})
        if attack in ATTACK_OPTIONS:
            settings["byzantine.options"] = ATTACK_OPTIONS[attack]
    if name != "plain":
        settings["robust.filters"] = [name]
        if name in OPTIONS:
            settings["robust.options"] = {name: OPTIONS[name]}
    return settings


def rows_of_matrix() -> list[tuple[str | None, float]]:
    return [(None, 0.0)] + [(attack, fraction) for attack in ATTACKS for fraction in FRACTIONS]


def cell(runs: list[sweep.RunOutcome]) -> dict[str, Any]:
    done = [r.summary for r in runs if r.status == "complete" and r.summary]
    accuracy = [s["final_accuracy_mean"] for s in done]
    precision = [s["suspects_precision"] for s in done if s.get("suspects_precision") is not None]
    recall = [s["suspects_recall"] for s in done if s.get("suspects_recall") is not None]
    return {"accuracy": statistics.fmean(accuracy) if accuracy else None,
            "spread": statistics.stdev(accuracy) if len(accuracy) > 1 else None, "seeds": len(accuracy),
            "weakest": statistics.fmean(s["final_accuracy_min"] for s in done) if done else None,
            "precision": statistics.fmean(precision) if precision else None,
            "recall": statistics.fmean(recall) if recall else None}


def text(c: dict[str, Any]) -> str:
    if c["accuracy"] is None:
        return "failed"
    return f"{c['accuracy']:.3f}" + (f" ± {c['spread']:.3f}" if c["spread"] is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "byzantine-sweep"), help="the sweep folder (resumable)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = config.load_config(str(BASE), args.set)
    matrix = {(attack, fraction, name): variant(attack, fraction, name)
              for attack, fraction in rows_of_matrix() for name in FILTERS}
    first = sweep.run_sweep(sweep.make_spec(base, list(matrix.values()), seeds=1, out=args.out, jobs=args.jobs))
    results = {key: cell([r for r in first.runs if r.settings == settings]) for key, settings in matrix.items()}
    best = {row: max(FILTERS, key=lambda name: results[(*row, name)]["accuracy"] or -1.0) for row in rows_of_matrix()}
    again = [matrix[(None, 0.0, name)] for name in FILTERS] + [matrix[(*row, best[row])] for row in rows_of_matrix()[1:]]
    second = sweep.run_sweep(sweep.make_spec(base, again, seeds=SEEDS, out=args.out, jobs=args.jobs))
    for key, settings in matrix.items():
        if settings in again:
            results[key] = cell([r for r in second.runs if r.settings == settings])
    clean = {name: results[(None, 0.0, name)]["accuracy"] for name in FILTERS}
    print(report(results, best, clean))
    print(write("byzantine", {"base": str(BASE), "overrides": args.set, "filters": FILTERS, "options": OPTIONS,
                              "attack_options": ATTACK_OPTIONS, "seeds_best": SEEDS,
                              "cells": [{"attack": a or "none", "fraction": f, "filter": name, **c}
                                        for (a, f, name), c in results.items()],
                              "best": {f"{a}@{f}": name for (a, f), name in best.items()}}))


def report(results: dict, best: dict, clean: dict[str, float]) -> str:
    reference = clean["plain"]
    table, suspects, failures = [], [], []
    for attack, fraction in rows_of_matrix():
        label = "none" if attack is None else f"{attack} {fraction:.0%}"
        row = {"attack": label}
        for name in FILTERS:
            c = results[(attack, fraction, name)]
            row[name] = text(c) + (" *" if best[(attack, fraction)] == name else "")
            if attack is not None and c["accuracy"] is not None and c["accuracy"] < clean[name] - WITHIN:
                failures.append(f"{name} under {label}: {c['accuracy']:.3f} vs {clean[name]:.3f} attack-free")
        table.append(row)
        if attack is not None:
            suspects.append({"attack": label, **{name: "" if results[(attack, fraction, name)]["precision"] is None else
                             f"{results[(attack, fraction, name)]['precision']:.2f} / "
                             f"{results[(attack, fraction, name)]['recall']:.2f}" for name in FILTERS if name != "plain"}})
    worst = {name: min(results[(a, f, name)]["accuracy"] or 0.0 for a, f in rows_of_matrix()[1:]) for name in FILTERS}
    default = max(FILTERS[1:], key=lambda name: worst[name])
    lines = ["Honest nodes' mean final accuracy (* = the row's best filter; ± = std over 3 seeds)", "",
             markdown_table(table, ["attack", *FILTERS]), "",
             f"attack-free reference (plain averaging): {reference:.3f}; each attack's best filter within 5 points: "
             + ", ".join(f"{'yes' if (results[(*row, best[row])]['accuracy'] or 0.0) >= reference - WITHIN else 'NO'} "
                         f"({row[0]} {row[1]:.0%})" for row in rows_of_matrix()[1:]), "",
             f"recommended default: {default} (worst cell {worst[default]:.3f}, "
             f"{reference - worst[default]:+.3f} below the attack-free run)", "",
             "Suspected peers, precision / recall (threshold byzantine.suspect_threshold)", "",
             markdown_table(suspects, ["attack", *FILTERS[1:]]), "", "Where filters fall more than 5 points:",
             *(f"- {line}" for line in failures)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
