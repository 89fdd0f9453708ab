"""Runtimes: how the algorithm core runs: many Nodes in one process, one node per OS process, a
launcher of node processes."""

import os
import signal
import subprocess
import time
from typing import Iterable

RESTART_POLICIES = ("never", "on-failure")  # what `gossipfl launch` does when a node process dies
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # read by the BLAS and OpenMP
                                                                                   # libraries when they load


def cap_threads(threads: int) -> None:
    """Hold this process to `threads` CPU threads: torch's intra-op and inter-op pools and the BLAS
    libraries (numpy's OpenBLAS, MKL). The libraries read the limit from the environment when they
    load, so a node process calls this before importing torch or numpy (a Pi 4 has 4 cores; several
    node processes on one machine want 1 each)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)  # allowed once, before any inter-op work: a fresh process


def single_thread_env() -> dict[str, str]:
    """The environment for a child process that shares this machine with others: one BLAS/OpenMP
    thread (torch's own threads follow the config's `threads`, 1 by default), unbuffered output."""
    return {**os.environ, **{name: "1" for name in THREAD_VARIABLES}, "PYTHONUNBUFFERED": "1"}


def stop_all(procs: Iterable[subprocess.Popen], grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to every live process, then SIGKILL what is still running after `grace` seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
