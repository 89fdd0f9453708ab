"""Benchmark optimised gossip weights against the heuristics, on rings, tori, random geometric and
Erdos-Renyi graphs: FMMC by SDP (n <= 256) and by the first-order method (n <= 2048).

For each graph: solve times, SLEM of FMMC (SDP), of the first-order method, of Metropolis and of
max-degree weights, the spectral gap of FMMC relative to Metropolis, and the gossip rounds
x <- W x needed to bring 16-dimensional random vectors per node to 1e-3 of their starting
distance from consensus, for FMMC and for Metropolis weights from the same start.

    python benchmarks/bench_sdp.py [--quick] [--out benchmarks/results/sdp.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import networkx as nx
import numpy as np

from gossipfl.graph import first_order, mixing, sdp, topology

FAMILIES = ("ring", "torus", "random_geometric", "erdos_renyi")
SDP_SIZES = (16, 32, 64, 128, 256)
FIRST_ORDER_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_LIMIT = 64
SDP_BUDGET_SECONDS = 120.0
SDP_GROWTH_PER_DOUBLING = 8.0  # SCS: one n x n eigendecomposition per iteration, and more iterations
CONSENSUS_TARGET = 1e-3
VECTOR_DIM = 16


def build(family: str, n: int, seed: int = 0) -> nx.Graph:
    """Connected with high probability: radius 1.2 sqrt(2 log n / n), p = 2 log n / n."""
    return topology.build(family, n, seed=seed, radius=1.2 * math.sqrt(2 * math.log(n) / n),
                          p=2 * math.log(n) / n)


def first_order_iters(n: int) -> int:
    """Fewer steps on big graphs, where each needs Lanczos runs on a 1000s-node matrix."""
    return 1000 if n <= 64 else 500 if n <= 256 else 200 if n <= 1024 else 100


def consensus_rounds(w: np.ndarray, start: np.ndarray, target: float = CONSENSUS_TARGET) -> int:
    """Rounds t of x <- W x until ||x_t - mean|| <= target ||x_0 - mean||, for symmetric W.

    Exact from W's eigendecomposition, ||W^t x_0c||^2 = sum_i lambda_i^(2t) (u_i^T x_0c)^2, so a
    2048-ring needing millions of rounds costs one eigh instead of millions of products.
    """
    values, vectors = np.linalg.eigh(w)
    energy = ((vectors.T @ (start - start.mean(axis=0))) ** 2).sum(axis=1)
    squares, total = values**2, energy.sum()

    def reached(t: int) -> bool:
        return float(np.sum(energy * squares**t)) <= target**2 * total

    high = 1
    while not reached(high):
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return high


def sdp_skip_reason(previous: dict | None) -> str | None:
    """Skip an SDP expected to pass the budget: the same family's previous size, times the growth."""
    if previous is None:
        return None
    if "sdp_seconds" not in previous:
        return previous.get("sdp_status")
    if previous["sdp_seconds"] * SDP_GROWTH_PER_DOUBLING <= SDP_BUDGET_SECONDS:
        return None
    return (f"SDP skipped: n={previous['n']} took {previous['sdp_seconds']:.0f} s, "
            f"x{SDP_GROWTH_PER_DOUBLING:.0f} per doubling passes {SDP_BUDGET_SECONDS:.0f} s")


def measure(family: str, n: int, run_sdp: bool, skip: str | None) -> dict:
    graph = build(family, n)
    row: dict = {"family": family, "n": n, "edges": graph.number_of_edges()}
    metropolis = mixing.metropolis(graph)
    row["slem_metropolis"] = mixing.slem(metropolis)
    row["slem_max_degree"] = mixing.slem(mixing.max_degree(graph))
    candidates = []
    if run_sdp and skip is None:
        result = sdp.fmmc(graph)
        row.update(sdp_solver=result.solver, sdp_status=result.status, sdp_seconds=result.seconds,
                   slem_fmmc=result.slem)
        candidates.append(result)
    elif run_sdp:
        row["sdp_status"] = skip
    iters = first_order_iters(n)
    large = first_order.fmmc_first_order(graph, iters=iters)
    row.update(first_order_iters=iters, first_order_seconds=large.seconds, slem_first_order=large.slem)
    best = min(candidates + [large], key=lambda result: result.slem)
    row["gap_ratio_vs_metropolis"] = (1 - best.slem) / (1 - row["slem_metropolis"])
    start = np.random.default_rng(n).standard_normal((n, VECTOR_DIM))
    row["rounds_fmmc"] = consensus_rounds(best.matrix, start)
    row["rounds_metropolis"] = consensus_rounds(metropolis, start)
    return row


def field(key: str, spec: str) -> Callable[[dict], str]:
    return lambda row: format(row[key], spec) if key in row else "-"


COLUMNS: tuple[tuple[str, int, Callable[[dict], str]], ...] = (
    ("graph", -17, field("family", "s")), ("n", 5, field("n", "d")), ("edges", 6, field("edges", "d")),
    ("sdp s", 6, field("sdp_seconds", ".1f")), ("solver", 8, field("sdp_solver", "s")),
    ("fo s", 6, field("first_order_seconds", ".1f")), ("FMMC", 10, field("slem_fmmc", ".7f")),
    ("1st-order", 10, field("slem_first_order", ".7f")), ("Metropolis", 10, field("slem_metropolis", ".7f")),
    ("max-degree", 10, field("slem_max_degree", ".7f")), ("gap x", 5, field("gap_ratio_vs_metropolis", ".2f")),
    ("rounds", 8, field("rounds_fmmc", "d")), ("(Metrop)", 8, field("rounds_metropolis", "d")),
)


def table_line(cells: list[str]) -> str:
    return " ".join(text.ljust(-width) if width < 0 else text.rjust(width)
                    for text, (_, width, _) in zip(cells, COLUMNS))


def print_row(row: dict) -> None:
    note = row.get("sdp_status", "optimal")
    print(table_line([render(row) for _, _, render in COLUMNS]) + ("" if note == "optimal" else f"  {note}"),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only graphs up to {QUICK_LIMIT} nodes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sdp.json")
    args = parser.parse_args()
    limit = QUICK_LIMIT if args.quick else max(FIRST_ORDER_SIZES)
    print("SLEM of FMMC by SDP, of first-order FMMC, of Metropolis and of max-degree weights. gap x: spectral gap\n"
          "of the better FMMC answer over Metropolis'. rounds: x <- W x to 1e-3 of the start distance, FMMC and\n"
          "Metropolis.")
    print(table_line([header for header, _, _ in COLUMNS]))
    rows = []
    for family in FAMILIES:
        previous = None
        for n in (size for size in FIRST_ORDER_SIZES if size <= limit):
            run_sdp = n in SDP_SIZES
            row = measure(family, n, run_sdp, sdp_skip_reason(previous) if run_sdp else None)
            previous = row if run_sdp else previous
            print_row(row)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quick": args.quick, "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "consensus_target": CONSENSUS_TARGET,
            "vector_dim": VECTOR_DIM, "sdp_budget_seconds": SDP_BUDGET_SECONDS}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
