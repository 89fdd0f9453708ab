"""Model exchange throughput between two OS processes, sender -> receiver, over tcp loopback and ipc.

Variants, each moving float32 vectors of 0.3, 10 and 45 MB:
  raw       pyzmq zero-copy multipart send of the bytes; the receiver does not look at them (baseline)
  gossipfl  wire.encode + ZmqTransport.send -> ZmqTransport.receive + wire.decode with full
            validation (checksum, finiteness, header checks)
  pickle    the peers' pickle-based path: torch.save of a torch state_dict of the same total size
            -> torch.load(weights_only=True) (decentralizepy and p2pfl pickle their models; the
            receiver here uses torch's safe loader, since nothing from another process is unpickled)

The sender streams messages with at most WINDOW unacknowledged, so both processes stay busy;
throughput is bytes over the time from the first timed send to the last acknowledgement. Both
processes call `reuse_large_allocations()`, as node processes should (--glibc-default: don't). Each
process also reports its CPU time (all threads, libzmq's included) over the timed messages: on a
shared machine wall-clock rates swing with the background load, CPU per message much less.
Trials of the three variants interleave and the table reports medians. A second table breaks the
validation cost down per pass over the payload, in one process.

    python benchmarks/bench_exchange.py [--repeats 5] [--sizes 0.3,10,45] [--transports tcp,ipc]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import io
import platform
import queue
import socket
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gossipfl.transport import wire  # noqa: E402
from gossipfl.transport.base import Message  # noqa: E402
from gossipfl.allocation import reuse_large_allocations  # noqa: E402
from gossipfl.transport.zmq import ZmqTransport  # noqa: E402

VARIANTS = ("raw", "gossipfl", "pickle")
WINDOW = 2                 # unacknowledged messages in flight
WARMUP = 2                 # untimed messages per trial (connection setup, first touch of buffers)
BYTES_PER_TRIAL = 200e6    # sets the number of timed messages per trial
LAYOUT = "bench-layout-000"
RESULTS = Path(__file__).resolve().parent / "results" / "exchange.json"


def messages_per_trial(count: int) -> int:
    return int(min(600, max(6, BYTES_PER_TRIAL / (4 * count))))


def state_dict_of(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model-like state_dict: eight tensors, each with its own storage (pickling a view would
    pickle the whole shared storage), that together hold the vector's elements."""
    return {f"layer{i}.weight": c.clone() for i, c in enumerate(torch.tensor_split(vector, 8))}


# --- one side of one variant: sockets plus a send or a receive of message i ---

def open_receiver(variant: str, count: int, endpoints: dict[str, str], context: zmq.Context):
    if variant == "gossipfl":
        transport = ZmqTransport(1, endpoints["data"], {0: endpoints["sender"]}, LAYOUT, count,
                                 deadline_s=30, context=context)

        def receive(i: int) -> None:
            if 0 not in transport.receive("model", 0, i, {0}):
                raise RuntimeError(f"message {i} did not arrive; rejected: {dict(transport.rejected)}")
        return receive, transport.close
    data = context.socket(zmq.ROUTER)
    data.linger, data.rcvtimeo = 0, 30_000
    data.bind(endpoints["data"])

    def receive(i: int) -> None:
        frames = data.recv_multipart(copy=False)
        if variant == "pickle":
            torch.load(io.BytesIO(frames[-1].buffer), weights_only=True)
    return receive, data.close


def serialised(model: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def open_sender(variant: str, vector: torch.Tensor, endpoints: dict[str, str], context: zmq.Context):
    """(send(i), connect(), close()); connect runs once the receiver is bound."""
    if variant == "gossipfl":
        transport = ZmqTransport(0, endpoints["sender"], {1: endpoints["data"]}, LAYOUT, vector.numel(),
                                 context=context)
        # A new Message per send, as a node makes one per gossip step, so every send is encoded.
        return (lambda i: transport.send(1, Message("model", 0, 0, i, vector)),
                lambda: None, transport.close)
    data = context.socket(zmq.DEALER)
    data.linger = 0
    if variant == "raw":
        payload = wire.payload_view(vector)
        send = lambda i: data.send_multipart([b"h" * 120, payload], copy=False)  # noqa: E731
    else:
        model = state_dict_of(vector)
        send = lambda i: data.send_multipart([b"h", serialised(model)], copy=False)  # noqa: E731
    return send, lambda: data.connect(endpoints["data"]), data.close


# --- the two processes ---

def receiver(trials, endpoints, barrier, results, tune_allocator) -> None:
    torch.set_num_threads(1)
    if tune_allocator:
        reuse_large_allocations()
    for index, (variant, count, n) in enumerate(trials):
        context = zmq.Context()
        ack = context.socket(zmq.PUSH)
        ack.linger = 5000  # the last acknowledgement must leave before close
        receive, close = open_receiver(variant, count, endpoints, context)
        barrier.wait()
        ack.connect(endpoints["ack"])
        cpu = 0.0
        for i in range(WARMUP + n):
            receive(i)
            ack.send(b"")
            if i == WARMUP - 1:
                cpu = time.process_time()
        results.put((index, "receiver_cpu_s", time.process_time() - cpu))
        close()
        ack.close()
        context.term()


def sender(trials, endpoints, barrier, results, tune_allocator) -> None:
    torch.set_num_threads(1)
    if tune_allocator:
        reuse_large_allocations()
    for index, (variant, count, n) in enumerate(trials):
        vector = torch.randn(count, generator=torch.Generator().manual_seed(count))
        context = zmq.Context()
        ack = context.socket(zmq.PULL)
        ack.linger, ack.rcvtimeo = 0, 30_000
        ack.bind(endpoints["ack"])
        send, connect, close = open_sender(variant, vector, endpoints, context)
        barrier.wait()
        connect()
        start = cpu = 0.0
        for i in range(WARMUP + n + WINDOW):
            if i >= WINDOW:
                ack.recv()
            if i == WARMUP + WINDOW - 1:  # warm-up acknowledged; the window is still full
                start, cpu = time.perf_counter(), time.process_time()
            if i < WARMUP + n:
                send(i)
        # Between `start` and the last acknowledgement, exactly the n timed messages completed.
        results.put((index, "wall_s", time.perf_counter() - start))
        results.put((index, "sender_cpu_s", time.process_time() - cpu))
        close()
        ack.close()
        context.term()


# --- orchestration ---

def endpoints_for(kind: str, scratch: str) -> dict[str, str]:
    names = ("data", "ack", "sender")
    if kind == "ipc":
        return {name: f"ipc://{scratch}/{name}.ipc" for name in names}
    sockets = [socket.socket() for _ in names]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return {name: f"tcp://127.0.0.1:{s.getsockname()[1]}" for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


def run_trials(kind: str, trials: list[tuple[str, int, int]], tune_allocator: bool) -> list[dict[str, float]]:
    """Run `trials` in one sender and one receiver process; per trial wall_s and CPU seconds."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    measured: list[dict[str, float]] = [{} for _ in trials]
    with tempfile.TemporaryDirectory(prefix="gossipfl-bench-") as scratch:
        endpoints = endpoints_for(kind, scratch)
        processes = [ctx.Process(target=role, args=(trials, endpoints, barrier, results, tune_allocator))
                     for role in (receiver, sender)]
        try:
            for p in processes:
                p.start()
            for _ in range(3 * len(trials)):
                while True:
                    try:
                        index, name, value = results.get(timeout=1)
                        break
                    except queue.Empty:
                        if any(p.exitcode not in (None, 0) for p in processes):
                            raise RuntimeError(f"a {kind} benchmark process failed") from None
                measured[index][name] = value
            for p in processes:
                p.join(timeout=60)
        finally:
            for p in processes:
                if p.is_alive():
                    p.kill()
                p.join()
    return measured


def exchange_rows(kind: str, sizes: list[float], repeats: int, tune_allocator: bool) -> list[dict]:
    trials = [(variant, int(mb * 1e6 / 4), messages_per_trial(int(mb * 1e6 / 4)))
              for _ in range(repeats) for mb in sizes for variant in VARIANTS]
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for (variant, count, n), m in zip(trials, run_trials(kind, trials, tune_allocator)):
        runs.setdefault((variant, count), []).append(
            {"mb_s": n * count * 4 / m["wall_s"] / 1e6,
             "cpu_ms_per_message": (m["sender_cpu_s"] + m["receiver_cpu_s"]) / n * 1e3})
    rows = []
    for mb in sizes:
        count = int(mb * 1e6 / 4)
        row = {"transport": kind, "size_mb": mb, "messages_per_trial": messages_per_trial(count)}
        for v in VARIANTS:
            row[f"{v}_mb_s"] = round(statistics.median(r["mb_s"] for r in runs[(v, count)]))
            row[f"{v}_cpu_ms"] = round(statistics.median(r["cpu_ms_per_message"] for r in runs[(v, count)]), 3)
            row[f"{v}_runs_mb_s"] = [round(r["mb_s"]) for r in runs[(v, count)]]
        for v in ("gossipfl", "pickle"):
            row[f"{v}_over_raw"] = round(row[f"{v}_mb_s"] / row["raw_mb_s"], 2)
            row[f"{v}_over_raw_by_cpu"] = round(row["raw_cpu_ms"] / row[f"{v}_cpu_ms"], 2)
        rows.append(row)
    return rows


def hot_path(sizes: list[float], repeats: int = 9) -> list[dict]:
    """CPU milliseconds of each pass the gossipfl path makes (or could make) over one vector."""
    torch.set_num_threads(1)
    rows = []
    for mb in sizes:
        count = int(mb * 1e6 / 4)
        x, warm = torch.randn(count), torch.empty(count)
        view = wire.payload_view(x)
        message = Message("model", 0, 0, 0, x)
        frames = [bytes(f) if i == 0 else bytearray(f) for i, f in enumerate(wire.encode(message, LAYOUT))]
        passes = {
            "crc32": lambda: zlib.crc32(view),
            "adler32": lambda: zlib.adler32(view),
            "checksum (xxh3, used)": lambda: wire.checksum(view),
            "finite check (sum, used)": lambda: wire.all_finite(x),
            "isfinite().all()": lambda: torch.isfinite(x).all(),
            "copy into reused buffer": lambda: warm.copy_(x),
            "copy into fresh buffer": lambda: torch.empty(count).copy_(x),
            "encode (all)": lambda: wire.encode(message, LAYOUT),
            "decode (all)": lambda: wire.decode(frames, LAYOUT, count, 4 * count),
        }
        row = {"size_mb": mb}
        for name, run in passes.items():
            times = []
            for _ in range(repeats):
                t = time.process_time()
                run()
                times.append(time.process_time() - t)
            row[name] = round(statistics.median(times) * 1e3, 3)
        rows.append(row)
    return rows


def print_tables(rows: list[dict], passes: list[dict], load: float, repeats: int, tune_allocator: bool) -> None:
    allocator = "reuse_large_allocations()" if tune_allocator else "glibc default"
    print(f"load average at start {load:.2f}; medians of {repeats} trials; window {WINDOW}; allocator: {allocator}")
    print(f"{'link':5}{'MB':>6}{'raw MB/s':>10}{'gossipfl':>10}{'pickle':>8}{'g/raw':>7}{'p/raw':>7}"
          f"   {'CPU ms/msg: raw':>16}{'gossipfl':>10}{'pickle':>9}{'g/raw':>7}{'p/raw':>7}")
    for r in rows:
        print(f"{r['transport']:5}{r['size_mb']:>6}{r['raw_mb_s']:>10}{r['gossipfl_mb_s']:>10}{r['pickle_mb_s']:>8}"
              f"{r['gossipfl_over_raw']:>7}{r['pickle_over_raw']:>7}   {r['raw_cpu_ms']:>16}{r['gossipfl_cpu_ms']:>10}"
              f"{r['pickle_cpu_ms']:>9}{r['gossipfl_over_raw_by_cpu']:>7}{r['pickle_over_raw_by_cpu']:>7}")
    print("(g/raw by CPU = raw CPU per message / gossipfl CPU per message, sender + receiver)")
    print("\nCPU ms per pass over one vector, in one process:")
    names = [k for k in passes[0] if k != "size_mb"]
    print(f"{'MB':>6}" + "".join(f"{n:>{max(10, len(n) + 2)}}" for n in names))
    for p in passes:
        print(f"{p['size_mb']:>6}" + "".join(f"{p[n]:>{max(10, len(n) + 2)}}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="0.3,10,45", help="MB, comma-separated")
    parser.add_argument("--transports", default="tcp,ipc")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's mmap of every allocation over 32 MiB (page faults on each large frame)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_allocator = not args.glibc_default
    if tune_allocator:
        reuse_large_allocations()
    sizes = [float(s) for s in args.sizes.split(",")]
    load = os.getloadavg()[0]
    rows = [row for kind in args.transports.split(",")
            for row in exchange_rows(kind, sizes, args.repeats, tune_allocator)]
    passes = hot_path(sizes)
    print_tables(rows, passes, load, args.repeats, tune_allocator)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "load_average_at_start": load},
        "window": WINDOW, "repeats": args.repeats, "reuse_large_allocations": tune_allocator,
        "exchange": rows, "cpu_ms_per_pass": passes,
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
