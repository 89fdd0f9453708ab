"""PNG plots of a run folder: accuracy and consensus distance against round and against bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import networkx as nx

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import read_metrics  # noqa: E402

AXES = {"round": ("round", "round"), "bytes": ("bytes_sent", "model bytes sent (all nodes)")}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write accuracy_vs_{round,bytes}.png and consensus_vs_{round,bytes}.png into the run folder."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no rounds to plot")
    evaluated = [r for r in rows if "accuracy_mean" in r]
    written = []
    for axis, (key, label) in AXES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r[key] for r in evaluated]
        ax.plot(xs, [r["accuracy_mean"] for r in evaluated], label="node mean")
        ax.fill_between(xs, [r["accuracy_min"] for r in evaluated], [r["accuracy_max"] for r in evaluated],
                        alpha=0.25, label="node min-max")
        averaged = [r for r in evaluated if "accuracy_average_model" in r]  # node processes: last round only
        ax.plot([r[key] for r in averaged], [r["accuracy_average_model"] for r in averaged], "o--",
                markersize=3, label="average model")
        ax.set(xlabel=label, ylabel="test accuracy", title=run_dir.name)
        ax.legend()
        written.append(_save(fig, run_dir / f"accuracy_vs_{axis}.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        measured = [r for r in rows if "consensus_distance" in r]  # node processes: final round only
        ax.semilogy([r[key] for r in measured], [max(r["consensus_distance"], 1e-30) for r in measured], "o-")
        ax.set(xlabel=label, ylabel="consensus distance (1/n) sum ||x_i - mean||^2", title=run_dir.name)
        written.append(_save(fig, run_dir / f"consensus_vs_{axis}.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_graph(graph: nx.Graph, edge_values: Sequence[float], label: str, path: str | Path) -> Path:
    """Draw `graph` with each edge's width proportional to its value (in graph.edges order)."""
    fig, ax = plt.subplots(figsize=(6, 6))
    top = max(max(edge_values), 1e-12)
    pos = nx.kamada_kawai_layout(graph) if graph.number_of_nodes() <= 300 else nx.spring_layout(graph, seed=0)
    nx.draw_networkx(graph, pos, ax=ax, node_size=120, font_size=6,
                     width=[0.3 + 4.0 * v / top for v in edge_values], edge_color="tab:blue")
    ax.set_title(f"edge width: {label} (max {top:.3g})")
    ax.set_axis_off()
    return _save(fig, Path(path))
