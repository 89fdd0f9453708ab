"""Memory of one node process: peak RSS per node, MLP and small CNN, on Fashion-MNIST.

Two ways to run the same experiment (4 nodes on a ring, 2 rounds, evaluated at the end, one torch
thread each, all on this machine):

- launch: `gossipfl launch`, where every node loads the whole data set;
- deploy: `gossipfl deploy init` with loopback hosts, then each node started from its own
  deployment file as on a host (`gossipfl node --config node-I/node.toml`), reading its shard.

Peak RSS is each node process's VmHWM, read from /proc while it runs (see PeakWatcher).
`--label` names the code measured; the results of each label are kept side by side in
results/footprint.json, so running this at an older checkout (`--modes launch`: that checkout has
no `deploy init`) gives the "before" column.

    python benchmarks/bench_footprint.py [--modes launch,deploy] [--label after] [--nodes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, write

from gossipfl import config
from gossipfl.report import markdown_table
from gossipfl.runtimes import single_thread_env, stop_all
from gossipfl.runtimes.launch import free_loopback_addresses, launch

MODELS = {"mlp": {}, "cnn": {"model.name": "cnn"}}


def experiment(name: str, nodes: int) -> dict:
    """The quickstart at `nodes` nodes and 2 rounds, with the model `name`, as a config dict of the
    fields set (`deploy init` picks its small-host eval.batch_size where none is set; launch keeps 2000)."""
    quickstart = config.tomllib.loads((Path(config.__file__).parent / "quickstart.toml").read_text())  # as written;
    return config.apply_overrides(quickstart, {  # (not config.config_dict: older checkouts lack it)
        "rounds": 2, "topology.nodes": nodes, "deploy.checkpoint_every": 0, "eval.every": 2,
        "name": f"footprint-{name}", **MODELS[name]})


class PeakWatcher(threading.Thread):
    """Peak RSS (VmHWM) of every node process whose command line or working folder lies under
    `workdir`, read from /proc every 50 ms while they run: the same measure for any checkout,
    also for one whose nodes report getrusage's ru_maxrss, which counts the launcher's memory
    at fork. It misses at most the last 50 ms of a node (its summary and final vector)."""

    def __init__(self, workdir: Path):
        super().__init__(daemon=True)
        self.workdir, self.peaks, self.done = str(workdir), {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    argv = (proc / "cmdline").read_bytes().split(b"\0")
                    if b"node" not in argv or not (self.workdir.encode() in b" ".join(argv)
                                                   or os.readlink(proc / "cwd").startswith(self.workdir)):
                        continue
                    hwm = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                               if line.startswith("VmHWM:"))
                except (OSError, StopIteration, ValueError):
                    continue
                self.peaks[proc.name] = max(self.peaks.get(proc.name, 0), hwm / 1024)

    def stop(self) -> list[float]:
        self.done.set()
        self.join()
        return list(self.peaks.values())


def accuracies(run_dir: Path, nodes: int) -> list[float]:
    return [json.loads((run_dir / "nodes" / f"node-{i}" / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"]
            for i in range(nodes)]


def run_launch(raw: dict, nodes: int, workdir: Path) -> Path:
    cfg = config.from_dict(raw)
    launch(cfg, workdir / "launch", progress=False)
    return workdir / "launch"


def run_deploy(raw: dict, nodes: int, workdir: Path) -> Path:
    from gossipfl.deploy.bundle import init_deployment, node_file
    graph = workdir / "ring.edgelist"
    graph.write_text("".join(f"{i} {(i + 1) % nodes}\n" for i in range(nodes)))
    hosts = workdir / "hosts.txt"
    hosts.write_text("\n".join(free_loopback_addresses(nodes)) + "\n")
    out = init_deployment(raw, graph, hosts, workdir / "deploy")
    procs = [subprocess.Popen([sys.executable, "-m", "gossipfl", "node", "--config", node_file(i)], cwd=out,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=single_thread_env())
             for i in range(nodes)]
    try:
        if any(p.wait(600) for p in procs):
            raise RuntimeError("a node process failed")
    finally:
        stop_all(procs)
    return out / "runs" / raw["name"]


MODES = {"launch": run_launch, "deploy": run_deploy}


def eval_batch(run_dir: Path) -> int:
    """eval.batch_size of a run: from the launcher's config.toml, or from a deployment's node file."""
    path = run_dir / "config.toml"
    if not path.exists():
        path = run_dir.parent.parent / "node-0" / "node.toml"
    return config.load(path).eval.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="launch,deploy", help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--label", default="after", help="name of the code measured (e.g. before, after)")
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    rows = []
    for mode in args.modes.split(","):
        for name in MODELS:
            with tempfile.TemporaryDirectory() as workdir:
                started, watcher = time.perf_counter(), PeakWatcher(Path(workdir).resolve())
                watcher.start()
                run_dir = MODES[mode](experiment(name, args.nodes), args.nodes, Path(workdir))
                rss, accuracy, batch = watcher.stop(), accuracies(run_dir, args.nodes), eval_batch(run_dir)
                assert len(rss) == args.nodes, f"watched {len(rss)} node processes"
            rows.append({"label": args.label, "mode": mode, "model": name, "nodes": args.nodes, "eval_batch": batch,
                         "rss_mb_median": round(statistics.median(rss), 1), "rss_mb_max": round(max(rss), 1),
                         "accuracy_mean": round(statistics.mean(accuracy), 4),
                         "wall_s": round(time.perf_counter() - started, 1)})
            print(markdown_table(rows[-1:], list(rows[-1])), flush=True)
    previous = RESULTS / "footprint.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else {}
    runs[args.label] = rows
    print(markdown_table([r for label in runs for r in runs[label]], list(rows[0])))
    print("wrote", write("footprint", {"args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
