"""Runtimes: how the algorithm core runs: many Nodes in one process, one node per OS process, a
launcher of node processes."""

import os
import signal
import subprocess
import time
from typing import Iterable

RESTART_POLICIES = ("never", "on-failure")  # what `gossipfl launch` does when a node process dies


def single_thread_env() -> dict[str, str]:
    """The environment for a child process that shares this machine with others: one BLAS/OpenMP
    thread (torch's own threads follow the config's `threads`, 1 by default), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
