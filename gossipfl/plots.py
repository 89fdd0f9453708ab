"""Figures of run folders: one run (`gossipfl plot`), several runs and sweeps overlaid
(`gossipfl compare`), and graphs with edge weights. Torch-free.

A curve is one run, or one sweep combination whose seeds are averaged: its band is the nodes'
min-max accuracy for a single run and the min-max over seeds for a combination.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .config import flat_fields  # noqa: E402
from .report import byte_unit  # noqa: E402
from .rundir import RunDirError, checked_run_dir, read_config, read_metrics, read_status  # noqa: E402

if TYPE_CHECKING:
    import networkx as nx

# file stem: (metrics key, axis label, log scale)
METRICS = {
    "accuracy": ("accuracy_mean", "test accuracy (node mean)", False),
    "loss": ("train_loss", "training loss (node mean)", False),
    "local_accuracy": ("accuracy_local_mean", "local test accuracy (node mean)", False),
    "consensus": ("consensus_distance", "consensus distance (mean ||x_i - x̄||²)", True),
}
X_AXES = {"round": "round", "bytes": "bytes_sent", "time": "wall_seconds"}
TIME_UNITS = ((3600.0, "h"), (60.0, "min"), (1.0, "s"))
IGNORED_IN_LEGEND = ("name", "output", "threads", "gossip.weights_file")  # and deploy.*: how, not what
SWEEP_FILE = "sweep.json"  # written by gossipfl.sweep: its combinations and their run folders


@dataclass
class Curve:
    """One line of a figure: the metrics rows of one run, or of each seed of a sweep combination."""

    source: Path
    runs: list[list[dict[str, Any]]]
    config: dict[str, Any]  # flattened ("gossip.steps": 4); without seed for a combination
    label: str = ""

    def points(self, key: str, x_key: str) -> tuple[list[float], list[float], list[float], list[float]] | None:
        """x, mean y, band low, band high over the rounds where every run recorded `key`."""
        by_round = [{r["round"]: r for r in rows if r.get(key) is not None} for rows in self.runs]
        rounds = sorted(set.intersection(*(set(b) for b in by_round)))
        if not rounds:
            return None
        xs, ys, lows, highs = [], [], [], []
        for k in rounds:
            rows = [b[k] for b in by_round]
            values = [r[key] for r in rows]
            xs.append(k + 1 if x_key == "round" else sum(r[x_key] for r in rows) / len(rows))
            ys.append(sum(values) / len(values))
            if len(rows) == 1 and key == "accuracy_mean":
                lows.append(rows[0].get("accuracy_min", values[0]))
                highs.append(rows[0].get("accuracy_max", values[0]))
            else:
                lows.append(min(values))
                highs.append(max(values))
        return xs, ys, lows, highs


def run_curve(run_dir: Path) -> Curve:
    run_dir = checked_run_dir(run_dir)
    return Curve(run_dir, [read_metrics(run_dir)], flat_fields(read_config(run_dir)))


def sweep_curves(sweep_dir: Path) -> list[Curve]:
    """One curve per combination of a sweep folder, over its complete runs."""
    try:
        plan = json.loads((sweep_dir / SWEEP_FILE).read_text())
        combinations = [[sweep_dir / run["dir"] for run in c["runs"]] for c in plan["combinations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{sweep_dir}/{SWEEP_FILE} cannot be read: {exc}") from None
    curves = []
    for dirs in combinations:
        done = [d for d in dirs if d.is_dir() and read_status(d) == "complete"]
        if done:
            config = flat_fields(read_config(done[0]))
            config.pop("seed", None)
            curves.append(Curve(sweep_dir, [read_metrics(d) for d in done], config))
    if not curves:
        raise RunDirError(f"{sweep_dir}: no complete runs in this sweep yet")
    return curves


def load_curves(paths: Sequence[str | Path]) -> list[Curve]:
    curves: list[Curve] = []
    for path in map(Path, paths):
        curves += sweep_curves(path) if (path / SWEEP_FILE).is_file() else [run_curve(path)]
    label_by_difference(curves)
    return curves


def label_by_difference(curves: list[Curve]) -> None:
    """Label each curve by the config fields whose values differ between the curves."""
    keys = sorted({k for c in curves for k in c.config})
    differing = [k for k in keys if k not in IGNORED_IN_LEGEND and not k.startswith("deploy.")
                 and len({json.dumps(c.config.get(k)) for c in curves}) > 1]
    for c in curves:
        c.label = ", ".join(f"{k}={_text(c.config.get(k))}" for k in differing) or c.source.name
    labels = [c.label for c in curves]
    for c in curves:
        if labels.count(c.label) > 1:
            c.label = f"{c.label} ({c.source.name})" if c.label != c.source.name else str(c.source)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _x_scale(curves: Sequence[Curve], axis: str) -> tuple[float, str]:
    """(divisor, axis label) with units readable at the largest x of these curves."""
    if axis == "round":
        return 1.0, "round"
    largest = max((row.get(X_AXES[axis]) or 0 for c in curves for rows in c.runs for row in rows), default=0)
    if axis == "bytes":
        size, unit = byte_unit(largest)
        return size, f"model bytes sent, all nodes ({unit})"
    size, unit = next(((s, u) for s, u in TIME_UNITS if largest >= 2 * s), TIME_UNITS[-1])
    return size, f"wall time ({unit})"


def draw(ax: plt.Axes, curves: Sequence[Curve], metric: str, axis: str, label: str | None = None) -> bool:
    """One panel: each curve's mean line and band; False if no curve recorded this metric."""
    key, ylabel, log = METRICS[metric]
    divisor, xlabel = _x_scale(curves, axis)
    drawn = False
    for curve in curves:
        pts = curve.points(key, X_AXES[axis])
        if pts is None:
            continue
        xs = [x / divisor for x in pts[0]]
        floor = 1e-30 if log else float("-inf")  # consensus can reach exactly 0 with a common init
        line, = ax.plot(xs, [max(y, floor) for y in pts[1]], "o-" if len(xs) < 3 else "-", markersize=3,
                        label=label or curve.label)
        if pts[2] != pts[1] or pts[3] != pts[1]:
            ax.fill_between(xs, [max(y, floor) for y in pts[2]], [max(y, floor) for y in pts[3]],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if log and drawn else "linear")
    if axis == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not drawn:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    return drawn


def compare(paths: Sequence[str | Path], out: str | Path | None = None, fmt: str = "png") -> list[Path]:
    """Write compare_vs_{round,bytes,time}.FMT: four panels each, every curve overlaid."""
    curves = load_curves(paths)
    out = Path(out) if out else Path(paths[0]) if len(paths) == 1 else Path("compare")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for axis in X_AXES:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        for ax, metric in zip(axes.flat, METRICS):
            draw(ax, curves, metric, axis)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2), fontsize=8, frameon=False)
        fig.suptitle("bands: node min-max for a single run, seed min-max for a sweep combination", fontsize=9)
        fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 1) // 2), 1, 0.97))
        written.append(_save(fig, out / f"compare_vs_{axis}.{fmt}", tight=False))
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write {accuracy,consensus,loss}_vs_{round,bytes}.png into the run folder. The accuracy plot
    adds the average model and the nodes' accuracy on their own (local) test slices."""
    curve = run_curve(Path(run_dir))
    curve.label = "node mean (band: node min-max)"
    written = []
    for axis in ("round", "bytes"):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, [curve], "accuracy", axis)
        divisor = _x_scale([curve], axis)[0]
        for key, style, label in (("accuracy_average_model", "o--", "average model"),
                                  ("accuracy_global_model", "s-", "newest aggregate (sampled runs)"),
                                  ("accuracy_local_mean", ":", "node mean on local test slices")):
            pts = curve.points(key, X_AXES[axis])
            if pts:
                ax.plot([x / divisor for x in pts[0]], pts[1], style, markersize=3, label=label)
        ax.set(ylabel="test accuracy", title=curve.source.name)
        ax.legend(fontsize=8)
        written.append(_save(fig, curve.source / f"accuracy_vs_{axis}.png"))
        for metric in ("consensus", "loss"):
            fig, ax = plt.subplots(figsize=(6, 4))
            draw(ax, [curve], metric, axis)
            ax.set(title=curve.source.name)
            written.append(_save(fig, curve.source / f"{metric}_vs_{axis}.png"))
    return written


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_graph(graph: nx.Graph, edge_values: Sequence[float], label: str, path: str | Path) -> Path:
    """Draw `graph` with each edge's width proportional to its value (in graph.edges order)."""
    import networkx as nx
    fig, ax = plt.subplots(figsize=(6, 6))
    top = max(max(edge_values), 1e-12)
    pos = nx.kamada_kawai_layout(graph) if graph.number_of_nodes() <= 300 else nx.spring_layout(graph, seed=0)
    nx.draw_networkx(graph, pos, ax=ax, node_size=120, font_size=6,
                     width=[0.3 + 4.0 * v / top for v in edge_values], edge_color="tab:blue")
    ax.set_title(f"edge width: {label} (max {top:.3g})")
    ax.set_axis_off()
    return _save(fig, Path(path))
