"""Runtimes: how the algorithm core runs: many Nodes in one process, one node per OS process, a
launcher of node processes."""

import os


def single_thread_env() -> dict[str, str]:
    """The environment for a child process that shares this machine with others: one BLAS/OpenMP
    thread (torch's own threads follow the config's `threads`, 1 by default), unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
