"""Engines side by side: the Node engine, the vectorized engine and the single-model ceiling.

Task (gossipy's, and the issue's): Fashion-MNIST split IID, MLP 784-128-10 or the small CNN,
K local SGD steps of batch 32 (plain SGD, lr 0.05) and one gossip step on an 8-regular graph per
round. A node-update is one node's round (K steps and one gossip step); samples/s counts the
real samples trained on. The ceiling is one model fed the same samples as one batch of N x 32:
what any engine could reach if N models cost as little as one. A plain loop of N torch modules
with torch.optim.SGD and per-tensor neighbour averaging is measured at N = 100, the per-node
baseline the Node engine must beat. Every measurement runs in a fresh process (peak memory per
configuration), all in one run on the same machine.

    python benchmarks/bench_engines.py [--sizes 16,64,256,1024,4096] [--models mlp,cnn] [--steps 1,5]
        [--rounds 3] [--node-engine-max 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from common import write

from gossipfl.report import markdown_table as table

N_PLAIN_LOOP = 100


def task(model: str, n: int, k: int, engine: str, device: str, topology: str = "random_regular") -> Any:
    from gossipfl import config
    return config.from_dict({
        "name": "bench-engines", "seed": 0, "rounds": 1_000, "engine": engine, "device": device,
        "data": {"dataset": "fashion-mnist", "partition": "iid"},
        "topology": {"kind": topology, "nodes": n, "degree": 8},
        "model": {"name": model, "hidden": [128]},
        "train": {"local_steps": k, "batch_size": 32, "lr": 0.05, "lr_decay": 1.0, "momentum": 0.0,
                  "weight_decay": 0.0, "rho": 0.0},
        "gossip": {"steps": 1, "weights": "metropolis"},
        "eval": {"every": 1_000},
    })


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: seconds per round after one warm-up round."""
    import torch
    from gossipfl.allocation import reuse_large_allocations
    reuse_large_allocations()  # the same allocator policy for every path measured
    torch.set_num_threads(spec["threads"])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if spec["path"] == "ceiling":
        seconds, samples = ceiling(spec)
    elif spec["path"] == "plain_loop":
        seconds, samples = plain_loop(spec)
    else:
        from gossipfl.runtimes.sim import Simulation
        sim = Simulation(task(spec["model"], spec["n"], spec["k"], spec["path"], spec["device"],
                              spec.get("topology", "random_regular")), progress=False)
        sim.step(0)
        sync(spec["device"])
        start = time.perf_counter()
        for r in range(1, 1 + spec["rounds"]):
            sim.step(r)
        sync(spec["device"])
        seconds = (time.perf_counter() - start) / spec["rounds"]
        samples = sum(min(32, len(p)) for p in sim.experiment.parts) * spec["k"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**spec, "seconds_per_round": seconds, "node_updates_per_s": spec["n"] / seconds,
            "samples_per_s": samples / seconds, "peak_rss_mb": peak / 1024,
            "rss_per_node_kb": (peak - base_rss) / spec["n"]}


def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def ceiling(spec: dict[str, Any]) -> tuple[float, int]:
    """One model, K steps on the same samples as all N nodes' first-round batches at once."""
    import torch
    import torch.nn.functional as F
    from gossipfl.algorithms.train import local_batches
    from gossipfl.experiment import Experiment
    experiment = Experiment(task(spec["model"], spec["n"], spec["k"], "vectorized", spec["device"]))
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    model = experiment.build_model(0).module.to(device)
    x_all, y_all = experiment.dataset.train_inputs().to(device), experiment.dataset.y_train.to(device)
    steps = [torch.cat([torch.from_numpy(p)[local_batches(0, i, 1, len(p), spec["k"], 32)[s]]
                        for i, p in enumerate(experiment.parts)]).to(device) for s in range(spec["k"])]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)

    def run() -> None:
        for idx in steps:
            opt.zero_grad()
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    run()
    sync(spec["device"])
    start = time.perf_counter()
    for _ in range(spec["rounds"]):
        run()
    sync(spec["device"])
    return (time.perf_counter() - start) / spec["rounds"], sum(len(s) for s in steps)


def plain_loop(spec: dict[str, Any]) -> tuple[float, int]:
    """N torch modules, torch.optim.SGD each, then each averages its tensors with its ring
    neighbours': the straightforward per-node simulator (gossipy's structure)."""
    import torch
    import torch.nn.functional as F
    from gossipfl.algorithms.train import local_batches
    from gossipfl.experiment import Experiment
    experiment = Experiment(task(spec["model"], spec["n"], spec["k"], "nodes", "cpu", topology="ring"))
    n = spec["n"]
    modules = [experiment.build_model(i).module for i in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in modules]
    data = [(experiment.dataset.train_inputs(torch.from_numpy(p)), experiment.dataset.y_train[torch.from_numpy(p)])
            for p in experiment.parts]

    def run(r: int) -> None:
        for i, (module, opt, (x, y)) in enumerate(zip(modules, opts, data)):
            for idx in local_batches(0, i, r, len(y), spec["k"], 32):
                opt.zero_grad()
                F.cross_entropy(module(x[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            snapshot = [[p.clone() for p in m.parameters()] for m in modules]
            for i, module in enumerate(modules):
                for t, p in enumerate(module.parameters()):
                    p.copy_((snapshot[i][t] + snapshot[i - 1][t] + snapshot[(i + 1) % n][t]) / 3)
    run(0)
    start = time.perf_counter()
    for r in range(1, 1 + spec["rounds"]):
        run(r)
    return (time.perf_counter() - start) / spec["rounds"], sum(min(32, len(y)) for _, y in data) * spec["k"]


def in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    try:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16,64,256,1024,4096")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--steps", default="1,5", help="local steps K per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--node-engine-max", type=int, default=1024, help="largest N run on the Node engine")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = []
    common = {"rounds": args.rounds, "device": args.device, "threads": args.threads}
    for model in args.models.split(","):
        for k in map(int, args.steps.split(",")):
            rows.append(in_subprocess({"path": "plain_loop", "model": model, "n": N_PLAIN_LOOP, "k": k, **common},
                                      args.timeout))
            rows.append(in_subprocess({"path": "nodes", "model": model, "n": N_PLAIN_LOOP, "k": k,
                                       "topology": "ring", **common}, args.timeout))
            for n in map(int, args.sizes.split(",")):
                paths = ["vectorized", "ceiling"] + (["nodes"] if n <= args.node_engine_max else [])
                for path in paths:
                    rows.append(in_subprocess({"path": path, "model": model, "n": n, "k": k, **common}, args.timeout))
                    print(table(rows[-1:], ["path", "model", "k", "n", "node_updates_per_s", "error"]), flush=True)
    summary = ratios(rows)
    columns = ["model", "k", "n", "plain_loop", "nodes", "vectorized", "ceiling", "nodes_vs_plain_loop", "vectorized_vs_nodes",
               "vectorized_vs_ceiling", "vectorized_rss_per_node_kb", "nodes_rss_per_node_kb"]
    print(table(summary, columns))
    print(write("engines", {"rows": rows, "summary": summary}))


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, K, N, topology): node-updates/s of each path and the ratios the goals name."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["model"], r["k"], r["n"])
        g = groups.setdefault(key, {"model": r["model"], "k": r["k"], "n": r["n"]})
        g[r["path"]] = r["node_updates_per_s"]
        g[f"{r['path']}_rss_per_node_kb"] = r["rss_per_node_kb"]
    for g in groups.values():
        if "vectorized" in g and "nodes" in g:
            g["vectorized_vs_nodes"] = g["vectorized"] / g["nodes"]
        if "vectorized" in g and "ceiling" in g:
            g["vectorized_vs_ceiling"] = g["vectorized"] / g["ceiling"]
        if "plain_loop" in g and "nodes" in g:
            g["nodes_vs_plain_loop"] = g["nodes"] / g["plain_loop"]
    return list(groups.values())


if __name__ == "__main__":
    main()
